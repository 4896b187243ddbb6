"""Hand-written golden cases for `regroup`, every strategy, both padding sides.

Written from the specification (METHOD.md, issue 2 and the lead's decisions), not from the
implementation. B=2, d=4, M=3 image tokens per row; embeddings are basis vectors and simple
mixes so every cosine is checkable by hand:

row 0 (9 real tokens, no padding)       row 1 (7 real tokens, 2 padding)
  S  (0,0,0,1)  text, not a candidate     I1 (1,0,0,0)
  I1 (1,0,0,0)                            I2 (1,0,0,0)   same vector as I1: argmax tie
  I2 (0,1,0,0)                            I3 (0,0,1,0)
  I3 (0,0,1,0)                            Tx (0,0,1,1)   cand: s=1/sqrt2 at I3
  Ta (0,3,0,4)  cand: s=0.6 at I2         Ty (0,0,3,4)   cand: s=0.6 at I3
  Tb (4,0,0,3)  cand: s=0.8 at I1         Tz (1,0,0,1)   cand: s=1/sqrt2 at I1 (tie I1=I2 -> I1)
  Tc (0,0,0,2)  cand: s=0 (all zero -> I1) A (0,1,0,0)   label 9
  A1 (1,1,1,1)  label 7
  A2 (1,-1,1,-1) label 8

image_into_text scores: row 0: I1 0.8 -> Tb, I2 0.6 -> Ta, I3 0 -> Ta;
row 1: I1 and I2 1/sqrt2 -> Tz, I3 1/sqrt2 -> Tx.
Right padding puts row 1 at columns 0..6; left padding at columns 2..8 (origin and host are
column indices of the input). P = -100 (no label), N = nan.
"""

from __future__ import annotations

import math

import pytest
import torch

from attanchor.anchoring import AnchorConfig, regroup
from tests.anchoring.hashref import ref_hash, ref_slot

P = -100
N = float("nan")
R2 = 1 / math.sqrt(2)
F, T = False, True
L = 9
ROW0 = [(0, 0, 0, 1), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 3, 0, 4), (4, 0, 0, 3),
        (0, 0, 0, 2), (1, 1, 1, 1), (1, -1, 1, -1)]
ROW1 = [(1, 0, 0, 0), (1, 0, 0, 0), (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 3, 4), (1, 0, 0, 1),
        (0, 1, 0, 0)]
KINDS = ["SIIICCCAA", "IIICCCA"]
LABELS = [[P] * 7 + [7, 8], [P] * 6 + [9]]
PAUSE = torch.tensor([0.5, -0.5, 0.25, 2.0])


def build(rows: list[tuple], side: str, width: int = L, with_labels: bool = True):
    """Batch of rows (vectors, kinds, labels); padding embeddings are garbage (5.0)."""
    embeds = torch.full((len(rows), width, 4), 5.0)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    img = torch.zeros(len(rows), width, dtype=torch.bool)
    cand = torch.zeros(len(rows), width, dtype=torch.bool)
    labels = torch.full((len(rows), width), P, dtype=torch.long)
    for b, (vecs, kinds, labs) in enumerate(rows):
        off = width - len(vecs) if side == "left" else 0
        for i, (v, k, lab) in enumerate(zip(vecs, kinds, labs)):
            embeds[b, off + i] = torch.tensor(v, dtype=torch.float32)
            attn[b, off + i] = 1
            img[b, off + i] = k == "I"
            cand[b, off + i] = k == "C"
            labels[b, off + i] = lab
    return embeds, attn, img, cand, (labels if with_labels else None)


def make_batch(side: str, with_labels: bool = True, labels_row1: list[int] | None = None):
    rows = [(ROW0, KINDS[0], LABELS[0]), (ROW1, KINDS[1], labels_row1 or LABELS[1])]
    return build(rows, side, L, with_labels)


def pos_ids(side: str, lengths: list[int], width: int) -> list[list[int]]:
    return [list(range(width)) if side == "right" else [0] * (width - n) + list(range(n))
            for n in lengths]


def check(out, exp: dict, embeds, labels, pause=None):
    """Compare every field against the hand-written lists; embeddings against embeds[origin]."""
    assert out.origin.dtype == torch.long and out.host.dtype == torch.long
    assert out.inserted.dtype == torch.bool and out.num_anchors.dtype == torch.long
    assert out.origin.tolist() == exp["origin"]
    assert out.inserted.tolist() == exp["inserted"]
    assert out.host.tolist() == exp["host"]
    assert out.attention_mask.tolist() == exp["attention_mask"]
    assert out.position_ids.tolist() == exp["position_ids"]
    if labels is None:
        assert out.labels is None
    else:
        assert out.labels.tolist() == exp["labels"]
    sim = out.similarity.tolist()
    for got_row, exp_row in zip(sim, exp["similarity"]):
        assert len(got_row) == len(exp_row)
        for g, e in zip(got_row, exp_row):
            assert (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e, abs=1e-6)
    assert out.inputs_embeds.shape == (2, len(exp["origin"][0]), 4)
    for b, row in enumerate(exp["origin"]):
        for j, o in enumerate(row):
            got = out.inputs_embeds[b, j]
            if o >= 0:
                want = embeds[b, o]
            elif exp["inserted"][b][j]:
                want = pause
            else:
                want = torch.zeros(4)
            assert torch.equal(got, want), (b, j, got, want)


def expect(origin, inserted, host, labels, similarity, side, lengths):
    width = len(origin[0])
    return {
        "origin": origin, "inserted": inserted, "host": host, "labels": labels,
        "similarity": similarity, "position_ids": pos_ids(side, lengths, width),
        "attention_mask": [[0 if (o < 0 and not i) else 1 for o, i in zip(orow, irow)]
                           for orow, irow in zip(origin, inserted)],
    }


def test_expect_helper_matches_hand_written_masks():
    # The helper above derives attention masks and position ids; pin it on one case by hand.
    e = expect([[0, 1, -1]], [[F, F, F]], None, None, None, "right", [2])
    assert e["attention_mask"] == [[1, 1, 0]] and e["position_ids"] == [[0, 1, 2]]
    e = expect([[-1, 0, -1]], [[F, F, T]], None, None, None, "left", [2])
    assert e["attention_mask"] == [[0, 1, 1]] and e["position_ids"] == [[0, 0, 1]]


# ---------------------------------------------------------------- strategy none (identity)

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_none_is_identity(side, with_labels):
    embeds, attn, img, cand, labels = make_batch(side, with_labels)
    out = regroup(embeds, attn, img, cand, labels, AnchorConfig(strategy="none"))
    assert torch.equal(out.inputs_embeds, embeds)  # padding garbage included: unchanged
    assert out.origin.tolist() == [list(range(9)), list(range(9))]
    assert out.inserted.tolist() == [[F] * 9, [F] * 9]
    assert out.host.tolist() == [[-1] * 9, [-1] * 9]
    assert out.num_anchors.tolist() == [0, 0]
    assert torch.isnan(out.similarity).all()
    if side == "right":
        assert out.attention_mask.tolist() == [[1] * 9, [1] * 7 + [0, 0]]
        assert out.position_ids.tolist() == [list(range(9)), list(range(9))]
        exp_labels = [[P] * 7 + [7, 8], [P] * 6 + [9, P, P]]
    else:
        assert out.attention_mask.tolist() == [[1] * 9, [0, 0] + [1] * 7]
        assert out.position_ids.tolist() == [list(range(9)), [0, 0, 0, 1, 2, 3, 4, 5, 6]]
        exp_labels = [[P] * 7 + [7, 8], [P, P] + [P] * 6 + [9]]
    if with_labels:
        assert out.labels.tolist() == exp_labels
    else:
        assert out.labels is None


# ---------------------------------------------------------------- text_into_image & controls
# Row 0 is full in the input, so its lists are the same for both sides.

T2I_THRESHOLD = {  # tau = 0.5: row 0 copies Ta, Tb; row 1 copies Tx, Ty, Tz
    "num_anchors": [2, 3],
    "row0": ([0, 1, 5, 2, 4, 3, 4, 5, 6, 7, 8], [F, F, T, F, T, F, F, F, F, F, F],
             [-1, -1, 1, -1, 2, -1, -1, -1, -1, -1, -1], [P] * 9 + [7, 8],
             [N, N, 0.8, N, 0.6, N, N, N, N, N, N]),
    "right": ([0, 5, 1, 2, 3, 4, 3, 4, 5, 6, -1], [F, T, F, F, T, T, F, F, F, F, F],
              [-1, 0, -1, -1, 2, 2, -1, -1, -1, -1, -1], [P] * 9 + [9, P],
              [N, R2, N, N, R2, 0.6, N, N, N, N, N]),
    "left": ([-1, 2, 7, 3, 4, 5, 6, 5, 6, 7, 8], [F, F, T, F, F, T, T, F, F, F, F],
             [-1, -1, 2, -1, -1, 4, 4, -1, -1, -1, -1], [P] * 10 + [9],
             [N, N, R2, N, N, R2, 0.6, N, N, N, N]),
    "lengths": [11, 10],
}
T2I_TWO = {  # top 2 of each row: row 0 Tb, Ta; row 1 Tx, Tz (both 1/sqrt2 > Ty's 0.6)
    "num_anchors": [2, 2],
    "row0": T2I_THRESHOLD["row0"],
    "right": ([0, 5, 1, 2, 3, 3, 4, 5, 6, -1, -1], [F, T, F, F, T, F, F, F, F, F, F],
              [-1, 0, -1, -1, 2, -1, -1, -1, -1, -1, -1], [P] * 8 + [9, P, P],
              [N, R2, N, N, R2, N, N, N, N, N, N]),
    "left": ([-1, -1, 2, 7, 3, 4, 5, 5, 6, 7, 8], [F, F, F, T, F, F, T, F, F, F, F],
             [-1, -1, -1, 2, -1, -1, 4, -1, -1, -1, -1], [P] * 10 + [9],
             [N, N, N, R2, N, N, R2, N, N, N, N]),
    "lengths": [11, 9],
}
T2I_ONE = {  # one per row: row 0 Tb (0.8); row 1 Tx (tie with Tz at 1/sqrt2: lower position)
    "num_anchors": [1, 1],
    "row0": ([0, 1, 5, 2, 3, 4, 5, 6, 7, 8], [F, F, T, F, F, F, F, F, F, F],
             [-1, -1, 1, -1, -1, -1, -1, -1, -1, -1], [P] * 8 + [7, 8],
             [N, N, 0.8, N, N, N, N, N, N, N]),
    "right": ([0, 1, 2, 3, 3, 4, 5, 6, -1, -1], [F, F, F, T, F, F, F, F, F, F],
              [-1, -1, -1, 2, -1, -1, -1, -1, -1, -1], [P] * 7 + [9, P, P],
              [N, N, N, R2, N, N, N, N, N, N]),
    "left": ([-1, -1, 2, 3, 4, 5, 5, 6, 7, 8], [F, F, F, F, F, T, F, F, F, F],
             [-1, -1, -1, -1, -1, 4, -1, -1, -1, -1], [P] * 9 + [9],
             [N, N, N, N, N, R2, N, N, N, N]),
    "lengths": [10, 8],
}
APPEND = {  # the threshold case's copies, in text order, after the row's last image token
    "num_anchors": [2, 3],
    "row0": ([0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8], [F, F, F, F, T, T, F, F, F, F, F],
             [-1, -1, -1, -1, 3, 3, -1, -1, -1, -1, -1], [P] * 9 + [7, 8],
             [N, N, N, N, 0.6, 0.8, N, N, N, N, N]),
    "right": ([0, 1, 2, 3, 4, 5, 3, 4, 5, 6, -1], [F, F, F, T, T, T, F, F, F, F, F],
              [-1, -1, -1, 2, 2, 2, -1, -1, -1, -1, -1], [P] * 9 + [9, P],
              [N, N, N, R2, 0.6, R2, N, N, N, N, N]),
    "left": ([-1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8], [F, F, F, F, T, T, T, F, F, F, F],
             [-1, -1, -1, -1, 4, 4, 4, -1, -1, -1, -1], [P] * 10 + [9],
             [N, N, N, N, R2, 0.6, R2, N, N, N, N]),
    "lengths": [11, 10],
}
# random, seed 0, epoch 0, sample ids 0 and 1 (the default: row index): the documented draw
# (select.placement_hash, re-implemented in plain Python by ref_slot below) picks image slot
# floor(h * 3 / 2**32) for candidate offsets 4, 5, 6 (row 0) and 3, 4, 5 (row 1, on both
# padding sides: offsets count from the row's first real token): [[2, 1, 1], [2, 0, 2]]
# (asserted below). Row 0: Ta -> I3, Tb -> I2 (Tc is not selected); row 1: Tx -> I3,
# Ty -> I1, Tz -> I3. similarity = the s_n that selected the copy.
# (Changed in issue 9: the draw was torch.rand on one (B, C) block of a shared generator, so a
# sample's placement depended on its batch-mates; it is now per sample.)
RANDOM_SEED0 = {
    "num_anchors": [2, 3],
    "row0": ([0, 1, 2, 5, 3, 4, 4, 5, 6, 7, 8], [F, F, F, T, F, T, F, F, F, F, F],
             [-1, -1, -1, 2, -1, 3, -1, -1, -1, -1, -1], [P] * 9 + [7, 8],
             [N, N, N, 0.8, N, 0.6, N, N, N, N, N]),
    "right": ([0, 4, 1, 2, 3, 5, 3, 4, 5, 6, -1], [F, T, F, F, T, T, F, F, F, F, F],
              [-1, 0, -1, -1, 2, 2, -1, -1, -1, -1, -1], [P] * 9 + [9, P],
              [N, 0.6, N, N, R2, R2, N, N, N, N, N]),
    "left": ([-1, 2, 6, 3, 4, 5, 7, 5, 6, 7, 8], [F, F, T, F, F, T, T, F, F, F, F],
             [-1, -1, 2, -1, -1, 4, 4, -1, -1, -1, -1], [P] * 10 + [9],
             [N, N, 0.6, N, N, R2, R2, N, N, N, N]),
    "lengths": [11, 10],
}

def _expected(case: dict, side: str) -> dict:
    rows = [case["row0"], case[side]]
    return expect(*[[r[k] for r in rows] for k in range(5)], side, case["lengths"])


TEXT_CASES = {
    "threshold": (AnchorConfig(threshold=0.5), T2I_THRESHOLD),
    "threshold_inclusive": (AnchorConfig(threshold=0.6), T2I_THRESHOLD),  # Ta, Ty: s == 0.6
    "top_fraction": (AnchorConfig(threshold=None, top_fraction=0.5), T2I_TWO),  # ceil(1.5) = 2
    "threshold_max2": (AnchorConfig(threshold=0.5, max_anchors=2), T2I_TWO),
    "max_anchors": (AnchorConfig(threshold=0.5, max_anchors=1), T2I_ONE),
    "top_fraction_tie": (AnchorConfig(threshold=None, top_fraction=0.25), T2I_ONE),  # ceil(.75)
    "append": (AnchorConfig(strategy="append", threshold=0.5), APPEND),
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(TEXT_CASES))
def test_text_strategies_golden(name, side):
    cfg, case = TEXT_CASES[name]
    embeds, attn, img, cand, labels = make_batch(side)
    out = regroup(embeds, attn, img, cand, labels, cfg)
    assert out.num_anchors.tolist() == case["num_anchors"]
    check(out, _expected(case, side), embeds, labels)


def test_random_draws_assumed_by_the_golden_case():
    assert [[ref_slot(0, sid, 0, off, 3) for off in offs]
            for sid, offs in ((0, (4, 5, 6)), (1, (3, 4, 5)))] == [[2, 1, 1], [2, 0, 2]]


def test_reference_hash_is_the_implementation():
    from attanchor.anchoring.select import placement_hash

    samples = [0, 1, -5, 2**40 + 3, 2**62]
    got = placement_hash(7, torch.tensor(samples), 3, torch.tensor([[0, 4, 9]] * 5))
    assert got.tolist() == [[ref_hash(7, s, 3, o) for o in (0, 4, 9)] for s in samples]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("explicit", [True, False])
def test_random_golden_seed0(side, explicit):
    # Assumes the documented draw (ref_slot): per sample, per candidate offset.
    embeds, attn, img, cand, labels = make_batch(side)
    cfg = AnchorConfig(strategy="random", threshold=0.5, seed=0)
    sample_index = torch.tensor([0, 1]) if explicit else None  # default: the row index
    out = regroup(embeds, attn, img, cand, labels, cfg, sample_index=sample_index)
    assert out.num_anchors.tolist() == RANDOM_SEED0["num_anchors"]
    check(out, _expected(RANDOM_SEED0, side), embeds, labels)


@pytest.mark.parametrize("side", ["right", "left"])
def test_random_without_draw_assumption(side):
    embeds, attn, img, cand, labels = make_batch(side)
    cfg = AnchorConfig(strategy="random", threshold=0.5, seed=3)
    outs = [regroup(embeds, attn, img, cand, labels, cfg, epoch=e) for e in range(40)]
    again = regroup(embeds, attn, img, cand, labels, cfg, epoch=7)
    assert torch.equal(again.origin, outs[7].origin) and torch.equal(again.host, outs[7].host)
    assert len({tuple(o.origin.flatten().tolist()) for o in outs}) > 1
    images = [set(torch.nonzero(img[b]).flatten().tolist()) for b in range(2)]
    used = [set(), set()]
    for out in outs:
        assert out.num_anchors.tolist() == [2, 3]  # as many as text_into_image, tau = 0.5
        for b in range(2):
            o, ins, h = out.origin[b].tolist(), out.inserted[b].tolist(), out.host[b].tolist()
            base = [x for x, i in zip(o, ins) if not i and x >= 0]
            assert base == torch.nonzero(attn[b]).flatten().tolist()
            copies = [(x, hh) for x, i, hh in zip(o, ins, h) if i]
            # the same copies as text_into_image selects: Ta, Tb / Tx, Ty, Tz
            assert sorted(x for x, _ in copies) == (
                [4, 5] if b == 0 else ([3, 4, 5] if side == "right" else [5, 6, 7]))
            for j, (x, i, hh) in enumerate(zip(o, ins, h)):
                if i:  # right after its host or after an earlier copy with the same host
                    k = j - 1
                    while ins[k] and h[k] == hh:
                        assert o[k] < x  # copies after the same image token: text order
                        k -= 1
                    assert not ins[k] and o[k] == hh and hh in images[b]
                    used[b].add(hh)
    assert used == images  # every image token receives copies in some epoch


# ---------------------------------------------------------------- image_into_text (+ pause)

I2T = {  # tau = 0.5: row 0 I1 -> Tb, I2 -> Ta; row 1 I1, I2 -> Tz (image order), I3 -> Tx
    "num_anchors": [2, 3],
    "row0": ([0, 1, 2, 3, 4, 2, 5, 1, 6, 7, 8], [F, F, F, F, F, T, F, T, F, F, F],
             [-1, -1, -1, -1, -1, 4, -1, 5, -1, -1, -1], [P] * 9 + [7, 8],
             [N, N, N, N, N, 0.6, N, 0.8, N, N, N]),
    "right": ([0, 1, 2, 3, 2, 4, 5, 0, 1, 6, -1], [F, F, F, F, T, F, F, T, T, F, F],
              [-1, -1, -1, -1, 3, -1, -1, 5, 5, -1, -1], [P] * 9 + [9, P],
              [N, N, N, N, R2, N, N, R2, R2, N, N]),
    "left": ([-1, 2, 3, 4, 5, 4, 6, 7, 2, 3, 8], [F, F, F, F, F, T, F, F, T, T, F],
             [-1, -1, -1, -1, -1, 5, -1, -1, 7, 7, -1], [P] * 10 + [9],
             [N, N, N, N, N, R2, N, N, R2, R2, N]),
    "lengths": [11, 10],
}
I2T_PAUSE = {  # + 2 pause tokens right before the first labelled token (after Tz's copies)
    "num_anchors": [2, 3],
    "row0": ([0, 1, 2, 3, 4, 2, 5, 1, 6, -1, -1, 7, 8], [F, F, F, F, F, T, F, T, F, T, T, F, F],
             [-1, -1, -1, -1, -1, 4, -1, 5, -1, -1, -1, -1, -1], [P] * 11 + [7, 8],
             [N, N, N, N, N, 0.6, N, 0.8, N, N, N, N, N]),
    "right": ([0, 1, 2, 3, 2, 4, 5, 0, 1, -1, -1, 6, -1], [F, F, F, F, T, F, F, T, T, T, T, F, F],
              [-1, -1, -1, -1, 3, -1, -1, 5, 5, -1, -1, -1, -1], [P] * 11 + [9, P],
              [N, N, N, N, R2, N, N, R2, R2, N, N, N, N]),
    "left": ([-1, 2, 3, 4, 5, 4, 6, 7, 2, 3, -1, -1, 8], [F, F, F, F, F, T, F, F, T, T, T, T, F],
             [-1, -1, -1, -1, -1, 5, -1, -1, 7, 7, -1, -1, -1], [P] * 12 + [9],
             [N, N, N, N, N, R2, N, N, R2, R2, N, N, N]),
    "lengths": [13, 12],
}


@pytest.mark.parametrize("side", ["right", "left"])
def test_image_into_text_golden(side):
    embeds, attn, img, cand, labels = make_batch(side)
    out = regroup(embeds, attn, img, cand, labels, AnchorConfig(strategy="image_into_text", threshold=0.5))
    assert out.num_anchors.tolist() == I2T["num_anchors"]
    check(out, _expected(I2T, side), embeds, labels)


@pytest.mark.parametrize("side", ["right", "left"])
def test_image_into_text_pause_golden(side):
    embeds, attn, img, cand, labels = make_batch(side)
    cfg = AnchorConfig(strategy="image_into_text", threshold=0.5, pause_tokens=2)
    out = regroup(embeds, attn, img, cand, labels, cfg, pause_embedding=PAUSE)
    assert out.num_anchors.tolist() == I2T_PAUSE["num_anchors"]  # pause tokens not counted
    check(out, _expected(I2T_PAUSE, side), embeds, labels, pause=PAUSE)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("no_supervision", ["labels_none", "row1_unlabelled"])
def test_pause_at_real_end_without_supervised_token(side, no_supervision):
    with_labels = no_supervision != "labels_none"
    embeds, attn, img, cand, labels = make_batch(side, with_labels, labels_row1=[P] * 7)
    cfg = AnchorConfig(strategy="image_into_text", threshold=0.5, pause_tokens=2)
    out = regroup(embeds, attn, img, cand, labels, cfg, pause_embedding=PAUSE)
    row0 = I2T_PAUSE["row0"] if with_labels else (
        [0, 1, 2, 3, 4, 2, 5, 1, 6, 7, 8, -1, -1], [F, F, F, F, F, T, F, T, F, F, F, T, T])
    row1 = {"right": ([0, 1, 2, 3, 2, 4, 5, 0, 1, 6, -1, -1, -1],
                      [F, F, F, F, T, F, F, T, T, F, T, T, F]),
            "left": ([-1, 2, 3, 4, 5, 4, 6, 7, 2, 3, 8, -1, -1],
                     [F, F, F, F, F, T, F, F, T, T, F, T, T])}[side]
    assert out.origin.tolist() == [row0[0], row1[0]]
    assert out.inserted.tolist() == [row0[1], row1[1]]
    assert out.attention_mask[1].tolist() == ([1] * 12 + [0] if side == "right" else [0] + [1] * 12)
    assert out.position_ids.tolist() == pos_ids(side, [13, 12], 13)
    assert out.num_anchors.tolist() == [2, 3]
    if with_labels:
        assert out.labels.tolist() == [[P] * 11 + [7, 8], [P] * 13]
    else:
        assert out.labels is None
    pause_pos = (out.origin == -1) & out.inserted
    assert pause_pos.sum(dim=1).tolist() == [2, 2]
    assert torch.equal(out.inputs_embeds[pause_pos], PAUSE.expand(4, 4))


@pytest.mark.parametrize("side", ["right", "left"])
def test_pause_ignores_labels_on_padding(side):
    # Padding carries label 0 here (garbage): the first *supervised token* is still A1 / A, so
    # the result is I2T_PAUSE; refusing such labels with a ValueError is acceptable too.
    embeds, attn, img, cand, labels = make_batch(side)
    labels[attn == 0] = 0
    cfg = AnchorConfig(strategy="image_into_text", threshold=0.5, pause_tokens=2)
    try:
        out = regroup(embeds, attn, img, cand, labels, cfg, pause_embedding=PAUSE)
    except ValueError as err:
        assert "label" in str(err)
        return
    check(out, _expected(I2T_PAUSE, side), embeds, labels, pause=PAUSE)


@pytest.mark.parametrize("shape", [(5,), (1, 4), (2, 4), ()])
def test_pause_embedding_of_wrong_shape_is_an_error(shape):
    embeds, attn, img, cand, labels = make_batch("right")
    cfg = AnchorConfig(strategy="image_into_text", threshold=0.5, pause_tokens=1)
    with pytest.raises(ValueError, match="pause"):
        regroup(embeds, attn, img, cand, labels, cfg, pause_embedding=torch.ones(shape))


def test_pause_without_pause_embedding_is_an_error():
    embeds, attn, img, cand, labels = make_batch("right")
    with pytest.raises(ValueError, match="pause"):
        regroup(embeds, attn, img, cand, labels, AnchorConfig(strategy="image_into_text", threshold=0.5, pause_tokens=1))
