"""Position-only arms: hand-checked ids, and the tiny LLaVA run and generated under them.

Golden values are written from the module's definition (rings / rows), not from the code:
``T`` text, ``I`` image, ``.`` padding.
"""

from __future__ import annotations

import pytest
import torch

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.anchoring.positions import (
    POSITION_MODES,
    infer_grid,
    position_only_forward,
    position_only_generate,
    position_only_ids,
)
from tests.train import IMAGE_TOKEN_ID, N_IMAGE_TOKENS, tiny_llava_config

C, K = "compress_image_positions", "concentric_image_positions"


def masks(*rows: str) -> tuple[torch.Tensor, torch.Tensor]:
    attn = torch.tensor([[ch != "." for ch in r] for r in rows]).long()
    img = torch.tensor([[ch == "I" for ch in r] for r in rows])
    return attn, img


def test_worked_example_grid_2():
    attn, img = masks("TIIIITT")
    assert position_only_ids(attn, img, C, 2).tolist() == [[0, 1, 1, 2, 2, 3, 4]]
    assert position_only_ids(attn, img, K, 2).tolist() == [[0, 1, 1, 1, 1, 2, 3]]
    assert position_only_ids(attn, img, K).tolist() == [[0, 1, 1, 1, 1, 2, 3]]  # grid inferred


def test_grid_4_rings_and_rows():
    attn, img = masks("T" + "I" * 16 + "T")
    # Ring of each patch of a 4 x 4 image, row-major: the centre 2 x 2 is ring 1.
    rings = [0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert position_only_ids(attn, img, K).tolist() == [[0, *[1 + r for r in rings], 3]]
    rows = [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert position_only_ids(attn, img, C).tolist() == [[0, *rows, 5]]


def test_grid_3_has_one_centre_patch():
    attn, img = masks("TT" + "I" * 9 + "T")
    assert position_only_ids(attn, img, K).tolist() == [[0, 1, 2, 2, 2, 2, 3, 2, 2, 2, 2, 4]]
    assert position_only_ids(attn, img, C).tolist() == [[0, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5]]


def test_padding_sides_and_two_images():
    # Left padding: pads get 0, the row then counts from 0 (HF generate's convention).
    attn, img = masks("..TIIIIT", "TIIIITTT")
    assert position_only_ids(attn, img, C, 2).tolist() == [[0, 0, 0, 1, 1, 2, 2, 3],
                                                           [0, 1, 1, 2, 2, 3, 4, 5]]
    # Right padding: pads count on after the last real id.
    attn, img = masks("TIIIIT..")
    assert position_only_ids(attn, img, K, 2).tolist() == [[0, 1, 1, 1, 1, 2, 3, 4]]
    # Two 2 x 2 images back to back are one run of two images; a second run after text.
    attn, img = masks("T" + "I" * 8 + "T" + "I" * 4 + "T")
    assert position_only_ids(attn, img, C, 2).tolist() == [
        [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 7, 7, 8]]
    assert position_only_ids(attn, img, K, 2).tolist() == [
        [0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4, 5]]


@pytest.mark.parametrize("mode", POSITION_MODES)
def test_without_images_ids_are_the_baseline(mode):
    attn, img = masks("..TTTT", "TTTTTT")
    ids = position_only_ids(attn, img, mode)
    assert ids.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]


def test_errors_name_the_problem():
    attn, img = masks("TIIIT")
    with pytest.raises(ValueError, match="not whole 2 x 2"):
        position_only_ids(attn, img, C, 2)
    with pytest.raises(ValueError, match="lengths \\[3\\]"):
        infer_grid(img)
    with pytest.raises(ValueError, match="allowed are"):
        position_only_ids(attn, img, "shuffle", 2)
    attn, img = masks("TIIII")
    attn[0, 1] = 0
    with pytest.raises(ValueError, match="padding"):
        position_only_ids(attn, img, C, 2)


def test_strategy_names_are_config_strategies():
    for mode in POSITION_MODES:
        assert AnchorConfig(strategy=mode).strategy == mode


# -- the tiny LLaVA under these ids ------------------------------------------------------------

def tiny_anchored(mode: str) -> AnchoredVLM:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config()).eval()
    return AnchoredVLM(model, AnchorConfig(strategy=mode))


def prompts() -> dict[str, torch.Tensor]:
    """Two left-padded prompts ``<s> <image>*64 words``; row 1 has two pads. Grid 8 x 8."""
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.full((2, 1), 1), torch.full((2, N_IMAGE_TOKENS), IMAGE_TOKEN_ID),
                     torch.randint(10, 290, (2, 6), generator=g)], dim=1)
    attn = torch.ones_like(ids)
    ids = torch.cat([torch.zeros((2, 2), dtype=torch.long), ids], dim=1)
    attn = torch.cat([torch.zeros((2, 2), dtype=torch.long), attn], dim=1)
    ids[0, :2], attn[0, :2] = torch.tensor([1, 20]), 1  # row 0: two more words, no padding
    ids[0, 2] = 21
    return {"input_ids": ids, "attention_mask": attn,
            "pixel_values": torch.randn(2, 3, 64, 64, generator=g)}


@pytest.mark.parametrize("mode", POSITION_MODES)
def test_forward_is_hf_forward_at_these_ids(mode):
    anchored, b = tiny_anchored(mode), prompts()
    pos = position_only_ids(b["attention_mask"], b["input_ids"] == IMAGE_TOKEN_ID, mode)
    span = {C: 8, K: 4}[mode]  # 8 x 8 grid: 8 rows, 4 rings
    assert int(pos[1, -1]) == 1 + span + 5  # <s>, the image's ids, then 6 words
    with torch.no_grad():
        ours = position_only_forward(anchored, mode, **b).logits
        hf = anchored.model(**b, position_ids=pos).logits
        base = anchored.model(**b).logits
    real = b["attention_mask"].bool()
    torch.testing.assert_close(ours[real], hf[real], rtol=1e-5, atol=1e-5)
    assert (ours[real] - base[real]).abs().max() > 1e-3  # the ids reach the rotary embedding


@pytest.mark.parametrize("mode", POSITION_MODES)
def test_cached_generation_equals_a_cache_free_loop(mode):
    """HF generate with explicit prefill ids and its own continuation (last + 1 per token)
    gives the same logits as re-running the whole sequence at every step without a cache."""
    anchored, b = tiny_anchored(mode), prompts()
    steps = 4
    with torch.no_grad():
        out = position_only_generate(anchored, mode, **b, max_new_tokens=steps, do_sample=False,
                                     pad_token_id=0, eos_token_id=None, output_logits=True,
                                     return_dict_in_generate=True)
        embeds, img = anchored.baseline_embeds(b["input_ids"], b["pixel_values"])
        attn = b["attention_mask"]
        pos = position_only_ids(attn, img, mode)
        table = anchored.model.get_input_embeddings()
        tokens, logits = [], []
        for _ in range(steps):
            step = anchored.model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos,
                                  use_cache=False).logits[:, -1]  # (B, V)
            nxt = step.argmax(dim=-1)
            tokens.append(nxt), logits.append(step)
            embeds = torch.cat([embeds, table(nxt)[:, None]], dim=1)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    assert out.sequences.tolist() == torch.stack(tokens, dim=1).tolist()
    for got, want in zip(out.logits, logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", POSITION_MODES)
def test_position_only_arms_are_active_whatever_the_selection_fields(mode):
    # A threshold above 1 or a zero cap means "no copies" for anchoring arms; these arms make
    # no copies anyway and still change the model's input.
    assert AnchorConfig(strategy=mode, threshold=2.0).active
    assert AnchorConfig(strategy=mode, max_anchors=0).active


@pytest.mark.parametrize("mode", POSITION_MODES)
def test_anchored_vlm_routes_position_only_arms(mode):
    """AnchoredVLM.forward / generate with these strategies are the position-only paths:
    the same logits and tokens, and no copies are recorded."""
    anchored, b = tiny_anchored(mode), prompts()
    with torch.no_grad():
        ours = anchored(b["input_ids"], b["pixel_values"], b["attention_mask"]).logits
        want = position_only_forward(anchored, mode, **b).logits
        gen = anchored.generate(b["input_ids"], b["pixel_values"], b["attention_mask"],
                                max_new_tokens=3, do_sample=False, pad_token_id=0,
                                eos_token_id=None)
        gen_want = position_only_generate(anchored, mode, **b, max_new_tokens=3,
                                          do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, want)
    assert gen.tolist() == gen_want.tolist()
    assert anchored.last_anchor_counts.tolist() == [0, 0]


def test_position_only_arms_refuse_other_families():
    from transformers import LlavaNextForConditionalGeneration

    from attanchor.data.tiny_next import tiny_next_config

    model = LlavaNextForConditionalGeneration(tiny_next_config(64))
    anchored = AnchoredVLM(model, AnchorConfig(strategy=POSITION_MODES[0]))
    ids = torch.ones((1, 3), dtype=torch.long)
    with pytest.raises(ValueError, match="llava family only, not 'llava_next'"):
        anchored(ids, None, torch.ones_like(ids))
