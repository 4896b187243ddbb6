"""regroup on edge rows: empty rows, rows without candidates or images, over-padded batches.

Uses the golden batch of test_regroup_golden (B=2, d=4, M=3)."""

from __future__ import annotations

import pytest
import torch

from attanchor.anchoring import AnchorConfig, regroup
from tests.anchoring.test_regroup_golden import KINDS, LABELS, ROW0, ROW1, F, P, build, pos_ids


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("strategy", ["text_into_image", "image_into_text", "random", "append"])
def test_empty_row_stays_padding(side, strategy):
    embeds, attn, img, cand, labels = build([(ROW1, KINDS[1], LABELS[1]), ((), "", ())], side)
    out = regroup(embeds, attn, img, cand, labels, AnchorConfig(strategy=strategy, threshold=0.5))
    assert out.num_anchors.tolist() == [3, 0]
    assert out.origin.shape == (2, 10)  # row 0: 7 real tokens + 3 copies
    assert out.origin[1].tolist() == [-1] * 10
    assert out.inserted[1].tolist() == [F] * 10 and out.host[1].tolist() == [-1] * 10
    assert out.attention_mask[1].tolist() == [0] * 10 and out.labels[1].tolist() == [P] * 10
    assert out.position_ids[1].tolist() == (list(range(10)) if side == "right" else [0] * 10)
    assert torch.equal(out.inputs_embeds[1], torch.zeros(10, 4))
    if strategy == "text_into_image":
        assert out.origin[0].tolist() == ([0, 5, 1, 2, 3, 4, 3, 4, 5, 6] if side == "right"
                                          else [2, 7, 3, 4, 5, 6, 5, 6, 7, 8])


TEXT_ONLY = ([(0, 1, 0, 0), (1, 0, 0, 0), (0, 0, 1, 0), (1, 1, 0, 0), (0, 0, 0, 1)], "SCCCA",
             [P, P, P, P, 4])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("strategy", ["text_into_image", "image_into_text", "random", "append"])
def test_rows_without_candidates_or_without_images_get_no_copies(side, strategy):
    # row 0 has image tokens but no candidates; row 1 has candidates but no image token.
    # threshold -1 would select every candidate / image token that has a partner.
    rows = [(ROW0, "SIIISSSAA", LABELS[0]), TEXT_ONLY]
    embeds, attn, img, cand, labels = build(rows, side)
    out = regroup(embeds, attn, img, cand, labels, AnchorConfig(strategy=strategy, threshold=-1.0))
    assert out.num_anchors.tolist() == [0, 0]
    assert out.inserted.tolist() == [[F] * 9, [F] * 9]
    assert out.origin.tolist() == [list(range(9)), [0, 1, 2, 3, 4, -1, -1, -1, -1]
                                   if side == "right" else [-1, -1, -1, -1, 4, 5, 6, 7, 8]]
    assert out.labels.tolist() == [[P] * 7 + [7, 8], [P] * 4 + [4] + [P] * 4
                                   if side == "right" else [P] * 8 + [4]]
    assert out.position_ids.tolist() == pos_ids(side, [9, 5], 9)


@pytest.mark.parametrize("strategy", ["text_into_image", "image_into_text", "random", "append"])
@pytest.mark.parametrize("missing", ["no_image_in_batch", "no_candidate_in_batch"])
def test_batch_without_any_image_or_any_candidate_gets_no_copies(strategy, missing):
    rows = ([TEXT_ONLY, (ROW0[:7], "SCCCCCA", [P] * 6 + [1])] if missing == "no_image_in_batch"
            else [(ROW0, "SIIISSSAA", LABELS[0]), (ROW1, "IIISSSA", LABELS[1])])
    embeds, attn, img, cand, labels = build(rows, "right")
    out = regroup(embeds, attn, img, cand, labels, AnchorConfig(strategy=strategy, threshold=-1.0))
    assert out.num_anchors.tolist() == [0, 0] and not out.inserted.any()
    n = [len(r[0]) for r in rows]
    assert out.origin.tolist() == [list(range(k)) + [-1] * (max(n) - k) for k in n]
    assert torch.equal(out.attention_mask, attn[:, : max(n)])


@pytest.mark.parametrize("side", ["right", "left"])
def test_every_row_padded_output_is_as_long_as_the_longest_regrouped_row(side):
    # L' = longest regrouped row (10), not the input width (12).
    rows = [(ROW1, KINDS[1], LABELS[1]), (ROW1, "IIISSSA", LABELS[1])]
    embeds, attn, img, cand, labels = build(rows, side, width=12)
    out = regroup(embeds, attn, img, cand, labels, AnchorConfig(threshold=0.5))
    assert out.origin.tolist() == (
        [[0, 5, 1, 2, 3, 4, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, -1, -1, -1]] if side == "right"
        else [[5, 10, 6, 7, 8, 9, 8, 9, 10, 11], [-1, -1, -1, 5, 6, 7, 8, 9, 10, 11]])
    assert out.attention_mask.tolist() == [[1] * 10, [1] * 7 + [0] * 3 if side == "right"
                                           else [0] * 3 + [1] * 7]
    assert out.position_ids.tolist() == pos_ids(side, [10, 7], 10)
    assert out.inputs_embeds.shape == (2, 10, 4)
