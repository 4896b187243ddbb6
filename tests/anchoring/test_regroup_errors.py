"""regroup on bad input: each way the inputs can disagree raises a clear ValueError."""

from __future__ import annotations

import pytest

from attanchor.anchoring import AnchorConfig, regroup
from tests.anchoring.test_regroup_golden import make_batch

# ---------------------------------------------------------------- bad input


def _mutate(name: str, embeds, attn, img, cand, labels):
    if name == "attention_mask_shape":
        attn = attn[:, :8]
    elif name == "image_mask_shape":
        img = img[:, :8]
    elif name == "candidate_mask_shape":
        cand = cand[:1]
    elif name == "labels_shape":
        labels = labels[:, :8]
    elif name == "embeds_shape":
        embeds = embeds[:, :8]
    elif name == "embeds_2d":
        embeds = embeds[..., 0]
    elif name == "candidate_is_image":
        cand[0, 1] = True
    elif name == "candidate_on_padding":
        cand[1, 8] = True
    elif name == "image_on_padding":
        img[1, 7] = True
    elif name == "labelled_candidate":
        labels[0, 4] = 3
    elif name == "mixed_padding_sides":
        attn[0, 0] = 0  # row 0 now left padded, row 1 right padded
    elif name == "hole":
        attn[0, 7] = 0
    elif name == "both_sides_in_one_row":
        attn[0, 0] = 0
        attn[0, 8] = 0
    return embeds, attn, img, cand, labels


BAD = {
    "attention_mask_shape": "shape|size", "image_mask_shape": "shape|size",
    "candidate_mask_shape": "shape|size", "labels_shape": "shape|size",
    "embeds_shape": "shape|size", "embeds_2d": "3|dim|shape",
    "candidate_is_image": "image", "candidate_on_padding": "pad|attention",
    "image_on_padding": "pad|attention", "labelled_candidate": "label",
    "mixed_padding_sides": "pad|side", "hole": "pad|hole|contig|side",
    "both_sides_in_one_row": "pad|hole|contig|side",
}


@pytest.mark.parametrize("strategy", ["text_into_image", "image_into_text"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_a_clear_value_error(name, strategy):
    batch = _mutate(name, *make_batch("right"))
    with pytest.raises(ValueError, match=f"(?i){BAD[name]}"):
        regroup(*batch, AnchorConfig(strategy=strategy, threshold=0.5))
