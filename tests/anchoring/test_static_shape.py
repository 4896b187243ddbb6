"""Static-shape regroup: fixed width, equal to the dynamic mode, no host sync, one graph."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from attanchor.anchoring import AnchorConfig, AnchoredVLM, regroup
from attanchor.anchoring.syncs import LazyStats, count_host_syncs
from tests.anchoring.test_model import batch, tiny_llava

# The module doc's example: I_0, I_1 image tokens, T_a, T_b candidates; T_b points at I_1
# (cosine 0.995), T_a at neither (-0.707 to both: the tie goes to I_0).
EMB = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [0.1, 1.0]]])
MASK = torch.ones(1, 4, dtype=torch.long)
IMAGE = torch.tensor([[True, True, False, False]])
CAND = torch.tensor([[False, False, True, True]])


def doc_example(static: bool, **cfg):
    config = AnchorConfig(**{"threshold": 0.5, "max_anchors": 2, **cfg}, static_shape=static)
    return regroup(EMB, MASK, IMAGE, CAND, None, config)


def test_static_width_is_input_plus_cap_and_the_real_part_is_the_dynamic_output():
    dyn, st = doc_example(False), doc_example(True)
    assert dyn.origin.tolist() == [[0, 1, 3, 2, 3]]
    # Width 4 + max_anchors 2: the one copy, then one padding column.
    assert st.origin.tolist() == [[0, 1, 3, 2, 3, -1]]
    assert st.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0]]
    assert st.inserted.tolist() == [[False, False, True, False, False, False]]
    assert st.host.tolist() == [[-1, -1, 1, -1, -1, -1]]
    assert st.position_ids.tolist() == [[0, 1, 2, 3, 4, 5]]  # right pads continue the count
    assert st.inputs_embeds[0, 2].tolist() == pytest.approx([0.1, 1.0])  # T_b's copy
    assert st.inputs_embeds[0, 5].tolist() == [0.0, 0.0]
    assert st.similarity[0, 2].item() == pytest.approx(1 / math.sqrt(1.01))
    assert st.num_anchors.tolist() == [1] and st.num_dropped.tolist() == [0]


def test_left_side_puts_the_padding_first():
    config = AnchorConfig(threshold=0.5, max_anchors=2, static_shape=True)
    st = regroup(EMB, MASK, IMAGE, CAND, None, config, side="left")
    assert st.origin.tolist() == [[-1, 0, 1, 3, 2, 3]]
    assert st.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1]]
    assert st.position_ids.tolist() == [[0, 0, 1, 2, 3, 4]]  # left pads get 0 (HF generate)


def test_copies_past_the_cap_are_dropped_lowest_similarity_first_and_counted():
    # threshold -1: both candidates qualify; the cap of 1 keeps T_b (0.995), drops T_a (-0.707).
    for static in (False, True):
        r = doc_example(static, threshold=-1.0, max_anchors=1)
        assert r.origin.tolist() == [[0, 1, 3, 2, 3]]  # width 4 + 1
        assert r.num_anchors.tolist() == [1] and r.num_dropped.tolist() == [1]


def test_static_shape_needs_the_cap():
    with pytest.raises(ValueError, match="max_anchors"):
        AnchorConfig(static_shape=True)


def random_batch(side: str, B: int = 3, L: int = 12, d: int = 8, seed: int = 0):
    """Rows of [x, image x4, candidates x3, ...] with one 3-token-shorter row padded on
    ``side``; the last real token of each row is supervised when right-padded."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, L, d, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if side == "right":
        mask[1, -3:] = 0
    else:
        mask[1, :3] = 0
    image = torch.zeros(B, L, dtype=torch.bool)
    cand = torch.zeros_like(image)
    labels = torch.full((B, L), -100)
    for b in range(B):
        idx = mask[b].bool().nonzero().flatten()
        image[b, idx[1:5]] = True
        cand[b, idx[5:8]] = True
        labels[b, idx[-1]] = 7
    return emb, mask, image, cand, (labels if side == "right" else None)


CASES = [(s, p) for s in ("text_into_image", "random", "append") for p in (0,)] + \
    [("image_into_text", 0), ("image_into_text", 2)]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("strategy", "pause"), CASES)
@pytest.mark.parametrize("cap", [20, 1])  # 20: never reached; 1: reached in every row
def test_static_equals_dynamic_on_the_real_positions(strategy, pause, side, cap):
    emb, mask, image, cand, labels = random_batch(side)
    cfg = AnchorConfig(strategy=strategy, threshold=-1.0, max_anchors=cap, pause_tokens=pause)
    pause_emb = torch.randn(8) if pause else None
    kw = {"side": "left"} if side == "left" else {}
    dyn = regroup(emb, mask, image, cand, labels, cfg, pause_emb, **kw)
    static = dataclasses.replace(cfg, static_shape=True)
    # The side given, and read from the mask as a tensor (side=None).
    for st in (regroup(emb, mask, image, cand, labels, static, pause_emb, **kw),
               regroup(emb, mask, image, cand, labels, static, pause_emb)):
        assert st.origin.shape[1] == 12 + min(cap, 12) + pause
        vd, vs = dyn.attention_mask.bool(), st.attention_mask.bool()
        assert vd.sum(1).tolist() == vs.sum(1).tolist()
        for name in ("origin", "inserted", "host", "position_ids"):
            assert torch.equal(getattr(dyn, name)[vd], getattr(st, name)[vs]), name
        assert torch.equal(dyn.inputs_embeds[vd], st.inputs_embeds[vs])
        assert torch.equal(dyn.num_anchors, st.num_anchors)
        assert torch.equal(dyn.num_dropped, st.num_dropped)
        if labels is not None:
            assert torch.equal(dyn.labels[vd], st.labels[vs])
        # The similarity matmul runs over L queries instead of the packed few: fp32 noise.
        torch.testing.assert_close(dyn.similarity[vd], st.similarity[vs], equal_nan=True,
                                   atol=1e-6, rtol=1e-6)
        assert (st.inputs_embeds[~vs] == 0).all()  # padding columns are zero
        edge = vs[:, -1] if side == "left" else vs[:, 0]
        assert edge.all()  # padding stays on its side
    # 20 is never reached here (3 candidates, 4 images), 1 always: 2 or 3 dropped a row.
    dropped = {20: [0, 0, 0], 1: [3, 3, 3] if strategy == "image_into_text" else [2, 2, 2]}
    assert dyn.num_dropped.tolist() == dropped[cap]


def test_static_regroup_makes_no_host_sync_and_the_dynamic_one_does():
    emb, mask, image, cand, labels = random_batch("right")
    cfg = AnchorConfig(threshold=None, top_fraction=0.5, max_anchors=4)
    with count_host_syncs() as dyn:
        regroup(emb, mask, image, cand, labels, cfg)
    with count_host_syncs() as st:
        regroup(emb, mask, image, cand, labels, dataclasses.replace(cfg, static_shape=True))
    assert st.total == 0, st.by_site
    # The dynamic mode's value checks, padding side, packed widths and output width.
    assert dyn.total >= 4 and "regroup.py" in " ".join(dyn.by_site)


def compiled_regroup(cfg: AnchorConfig, backend: str, side: str | None):
    def run(emb, mask, image, cand, labels):
        r = regroup(emb, mask, image, cand, labels, cfg, side=side)
        return r.inputs_embeds, r.origin, r.position_ids, r.num_anchors, r.num_dropped

    torch._dynamo.reset()
    return run, torch.compile(run, fullgraph=True, backend=backend)


@pytest.mark.parametrize("strategy", ["text_into_image", "random", "image_into_text"])
@pytest.mark.parametrize("side", ["right", "left", None])
def test_static_regroup_compiles_as_one_graph(strategy, side):
    """fullgraph=True raises on any graph break: a host read (``int(t)``, ``if t.any()``) or a
    value-dependent shape would be one. ``aot_eager`` also traces the backward."""
    emb, mask, image, cand, labels = random_batch("right" if side != "left" else "left")
    cfg = AnchorConfig(strategy=strategy, threshold=None, top_fraction=0.5, max_anchors=2,
                       static_shape=True)
    eager, compiled = compiled_regroup(cfg, "aot_eager", side)
    leaf = emb.clone().requires_grad_(True)
    got = compiled(leaf, mask, image, cand, labels)
    want = eager(emb, mask, image, cand, labels)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    got[0].sum().backward()
    # d(sum)/d(embeds) counts how often each position appears in the output.
    ref = emb.clone().requires_grad_(True)
    eager(ref, mask, image, cand, labels)[0].sum().backward()
    assert torch.equal(leaf.grad, ref.grad)


def test_dynamic_regroup_breaks_the_graph():
    emb, mask, image, cand, labels = random_batch("right")
    cfg = AnchorConfig(threshold=None, top_fraction=0.5, max_anchors=2)
    _, compiled = compiled_regroup(cfg, "eager", None)
    with pytest.raises(Exception, match="(?i)graph break|data.dependent|item|Unsupported"):
        compiled(emb, mask, image, cand, labels)


@pytest.mark.slow
def test_static_regroup_compiles_with_inductor():
    """The real compiler (C++ kernels on a CPU: about 30-40 s here)."""
    emb, mask, image, cand, labels = random_batch("right")
    cfg = AnchorConfig(threshold=None, top_fraction=0.5, max_anchors=2, static_shape=True)
    eager, compiled = compiled_regroup(cfg, "inductor", None)
    for g, w in zip(compiled(emb, mask, image, cand, labels), eager(emb, mask, image, cand,
                                                                        labels)):
        assert torch.equal(g, w)


def test_record_keeps_tensors_and_reads_floats_on_demand():
    """The wrapper's statistics cost no sync; they read as the floats they always were."""
    data = batch("right")
    cfg = AnchorConfig(threshold=None, top_fraction=0.5, max_anchors=2, static_shape=True)
    wrapped = AnchoredVLM(tiny_llava(), cfg)
    with torch.no_grad():
        wrapped(**data)
    r = wrapped.last_regrouped
    with count_host_syncs() as syncs:
        wrapped._record(r, data["attention_mask"])
    assert syncs.total == 0, syncs.by_site
    stats = wrapped.last_stats
    assert isinstance(stats, LazyStats)
    # Prompts of 6 and 3 words, top half: ceil(3) = 3 and ceil(1.5) = 2 chosen, cap 2.
    assert wrapped.last_anchor_counts.tolist() == [2, 2]
    assert r.num_dropped.tolist() == [1, 0]
    assert stats["anchors_mean"] == 2.0 and stats["anchors_max"] == 2.0
    n_in = 26 + 22  # rows of 1 + 16 + 6 + 3 and 1 + 16 + 3 + 2 real tokens
    assert stats["growth_pct"] == pytest.approx(100 * 4 / n_in)
    assert -1.0 <= stats["anchor_similarity_mean"] <= 1.0
    assert sorted(stats) == ["anchor_similarity_mean", "anchors_max", "anchors_mean",
                             "growth_pct"]
