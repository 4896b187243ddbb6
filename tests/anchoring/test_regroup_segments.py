"""Golden cases for segments: no copy crosses an answer (a two-turn, two-image conversation).

One row, d=4, built by hand (P = -100, labels on the answers only)::

    pos  0  1   2   3   4   5   6   7  8   9   10  11  12  13
         S  I1  I2  Ca  Cb  A1  E1  U  J1  J2  Cc  Cd  A2  E2
    seg  0  0   0   0   0   0   0   1  1   1   1   1   1   1

I = the first image (turn 1), J = the second (turn 2), C = candidates, A/E = answer and its
end-of-turn token (supervised), U = the second user marker. Vectors:
I1 (1,0,0,0), I2 (0,1,0,0), J1 (0,0,1,0), J2 (0,0,0,1); Ca (3,0,4,0): I1 0.6, J1 0.8;
Cb (0,4,0,3): I2 0.8, J2 0.6; Cc (4,0,3,0): I1 0.8, J1 0.6; Cd (0,0,0,2): J2 1.0.
Without segments Ca would go after J1 and Cc after I1 (a second-turn word inside the first
image, before the first answer); with them each word finds its own turn's image.
"""

from __future__ import annotations

import pytest
import torch

from attanchor.anchoring import AnchorConfig, regroup
from attanchor.anchoring.select import segment_ids_from_labels
from tests.anchoring.hashref import ref_slot
from tests.anchoring.test_regroup_golden import (
    KINDS,
    LABELS,
    ROW0,
    ROW1,
    N,
    P,
    build,
    check,
    expect,
)

VECS = [(0, 0, 0, 1), (1, 0, 0, 0), (0, 1, 0, 0), (3, 0, 4, 0), (0, 4, 0, 3), (1, 1, 1, 1),
        (1, -1, 1, -1), (0, 0, 1, 1), (0, 0, 1, 0), (0, 0, 0, 1), (4, 0, 3, 0), (0, 0, 0, 2),
        (1, 1, 0, 0), (-1, 1, -1, 1)]
TWO_TURNS = "SIICCAASIICCAA"
TT_LABELS = [P] * 5 + [7, 2] + [P] * 5 + [8, 2]
WIDTH = 16  # two padding columns


def batch(side: str):
    return build([(VECS, TWO_TURNS, TT_LABELS)], side, WIDTH)


def expected(origin, host, sim, side):
    """Lists written for the row at column 0 -> the expectation on ``side``. Every case
    inserts 4 copies, so the 18 outputs fill the batch: no padding left on either side, and
    left padding only shifts the input columns (origin, host) by 2."""
    off = WIDTH - 14 if side == "left" else 0
    inserted = [h >= 0 for h in host]
    labels = [P if i else TT_LABELS[o] for o, i in zip(origin, inserted)]
    origin = [o + off for o in origin]
    host = [h + off if h >= 0 else -1 for h in host]
    return expect([origin], [inserted], [host], [labels], [sim], side, [len(origin)])


T2I = (
    [0, 1, 3, 2, 4, 3, 4, 5, 6, 7, 8, 10, 9, 11, 10, 11, 12, 13],
    [-1, -1, 1, -1, 2, -1, -1, -1, -1, -1, -1, 8, -1, 9, -1, -1, -1, -1],
    [N, N, 0.6, N, 0.8, N, N, N, N, N, N, 0.6, N, 1.0, N, N, N, N])
I2T = (  # I1 -> Ca (0.6), I2 -> Cb (0.8), J1 -> Cc (0.6, not Ca's 0.8), J2 -> Cd (1.0)
    [0, 1, 2, 3, 1, 4, 2, 5, 6, 7, 8, 9, 10, 8, 11, 9, 12, 13],
    [-1, -1, -1, -1, 3, -1, 4, -1, -1, -1, -1, -1, -1, 10, -1, 11, -1, -1],
    [N, N, N, N, 0.6, N, 0.8, N, N, N, N, N, N, 0.6, N, 1.0, N, N])
# seed 0, sample 0 (the row index), epoch 0: slots [0, 1, 1, 0] of the two images of each
# candidate's segment (asserted below): Ca -> I1, Cb -> I2, Cc -> J2, Cd -> J1.
RANDOM = (
    [0, 1, 3, 2, 4, 3, 4, 5, 6, 7, 8, 11, 9, 10, 10, 11, 12, 13],
    [-1, -1, 1, -1, 2, -1, -1, -1, -1, -1, -1, 8, -1, 9, -1, -1, -1, -1],
    [N, N, 0.6, N, 0.8, N, N, N, N, N, N, 1.0, N, 0.6, N, N, N, N])
APPEND = (  # after the last image token of the word's own segment: I2, J2
    [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9, 10, 11, 10, 11, 12, 13],
    [-1, -1, -1, 2, 2, -1, -1, -1, -1, -1, -1, -1, 9, 9, -1, -1, -1, -1],
    [N, N, N, 0.6, 0.8, N, N, N, N, N, N, N, 0.6, 1.0, N, N, N, N])
# The same batch with one segment (segment_ids all 0): the crossings the segments forbid.
T2I_ONE_SEGMENT = (
    [0, 1, 10, 2, 4, 3, 4, 5, 6, 7, 8, 3, 9, 11, 10, 11, 12, 13],
    [-1, -1, 1, -1, 2, -1, -1, -1, -1, -1, -1, 8, -1, 9, -1, -1, -1, -1],
    [N, N, 0.8, N, 0.8, N, N, N, N, N, N, 0.8, N, 1.0, N, N, N, N])

CASES = {
    "text_into_image": (AnchorConfig(threshold=0.5), T2I),
    "image_into_text": (AnchorConfig(strategy="image_into_text", threshold=0.5), I2T),
    "random": (AnchorConfig(strategy="random", threshold=0.5, seed=0), RANDOM),
    "append": (AnchorConfig(strategy="append", threshold=0.5), APPEND),
}


def test_segment_ids_from_labels_hand_example():
    labels = torch.tensor([[P, P, 7, 8, P, 9], [P, 4, P, 5, 6, P]])
    attn = torch.tensor([[1] * 6, [1, 1, 1, 1, 1, 0]])
    assert segment_ids_from_labels(labels, attn).tolist() == [[0, 0, 0, 0, 1, 1],
                                                              [0, 0, 1, 1, 1, 2]]
    assert segment_ids_from_labels(None, attn).tolist() == [[0] * 6] * 2
    _, attn, _, _, labels = batch("left")
    assert segment_ids_from_labels(labels, attn).tolist() == [[0, 0] + [0] * 7 + [1] * 7]


def test_random_draws_assumed_by_the_segment_case():
    assert [ref_slot(0, 0, 0, off, 2) for off in (3, 4, 10, 11)] == [0, 1, 1, 0]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(CASES))
def test_two_turn_two_image_golden(name, side):
    cfg, case = CASES[name]
    embeds, attn, img, cand, labels = batch(side)
    out = regroup(embeds, attn, img, cand, labels, cfg)
    assert out.num_anchors.tolist() == [4]
    check_one(out, expected(*case, side), embeds, labels)


def check_one(out, exp, embeds, labels):
    """test_regroup_golden.check for a batch of one row (it indexes two rows)."""
    two = {k: v + v if isinstance(v, list) else v for k, v in exp.items()}
    doubled = type(out)(**{k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v
                           for k, v in vars(out).items()})
    check(doubled, two, torch.cat([embeds, embeds]), torch.cat([labels, labels]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_explicit_segments_override_the_labels(side):
    embeds, attn, img, cand, labels = batch(side)
    cfg = AnchorConfig(threshold=0.5)
    one = regroup(embeds, attn, img, cand, labels, cfg, segment_ids=torch.zeros_like(attn))
    check_one(one, expected(*T2I_ONE_SEGMENT, side), embeds, labels)
    # Segments given without labels (a prompt, or packed samples) act as the labels' would.
    seg = segment_ids_from_labels(labels, attn)
    given = regroup(embeds, attn, img, cand, None, cfg, segment_ids=seg)
    assert given.origin.tolist() == [[o + (2 if side == "left" else 0) for o in T2I[0]]]


def test_decreasing_segment_ids_are_an_error():
    embeds, attn, img, cand, labels = batch("right")
    seg = torch.zeros_like(attn)
    seg[0, :5] = 1
    with pytest.raises(ValueError, match="segment_ids decrease"):
        regroup(embeds, attn, img, cand, labels, AnchorConfig(threshold=0.5), segment_ids=seg)


# ---------------------------------------------------------------- random: per-sample draws

def _placements(out, row: int, first: int) -> dict[int, int]:
    """{copied offset: host offset} of one row, offsets counted from its first real token."""
    copies = out.inserted[row] & (out.origin[row] >= 0)
    return {o - first: h - first for o, h in zip(out.origin[row][copies].tolist(),
                                                 out.host[row][copies].tolist())}


def test_a_sample_gets_the_same_placement_in_another_batch():
    """Sample 11 (golden row 0) with a batch-mate, then alone-ish in another batch, at another
    row, behind left padding, next to other samples: the same hosts; epoch 1 moves them.
    Hand-checked via ref_slot (seed 0): epoch 0 slots of offsets 4, 5 are [0, 0] (Ta, Tb ->
    I1 at offset 1), epoch 1 [1, 2] (Ta -> I2, Tb -> I3)."""
    cfg = AnchorConfig(strategy="random", threshold=0.5, seed=0)
    assert [ref_slot(0, 11, e, off, 3) for e in (0, 1) for off in (4, 5)] == [0, 0, 1, 2]
    rows = [(ROW0, KINDS[0], LABELS[0]), (ROW1, KINDS[1], LABELS[1])]
    first = regroup(*build(rows, "right"), cfg, sample_index=torch.tensor([11, 22]))
    second = regroup(*build([rows[1], rows[1], rows[0]], "left", width=12), cfg,
                     sample_index=torch.tensor([22, 5, 11]))
    assert _placements(first, 0, 0) == {4: 1, 5: 1}
    assert _placements(second, 2, 3) == {4: 1, 5: 1}  # row 2 starts at column 12 - 9
    assert _placements(first, 1, 0) == _placements(second, 0, 5)  # sample 22 too
    later = regroup(*build(rows, "right"), cfg, sample_index=torch.tensor([11, 22]), epoch=1)
    assert _placements(later, 0, 0) == {4: 2, 5: 3}
