"""Property tests of `regroup` on random batches, against a naive per-row reference.

Copies stay within their segment (a position's segment: the answers that end before it), so
the reference matches each item only against partners of its own segment.

The reference below is written from the specification (METHOD.md, issue 2, the lead's decisions)
with plain Python loops and float64 cosines; it shares no code with the implementation.
Examples whose outcome would hinge on a near-tie (a score within 1e-4 of tau, two scores of a
row within 1e-4 of each other, or two cosines competing for an argmax within 1e-4) are
discarded: fp32 and fp64 may legitimately order those differently. Exact ties and their rules
are covered by the golden cases.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attanchor.anchoring import AnchorConfig, regroup
from tests.anchoring.hashref import ref_slot

P = -100
MARGIN = 1e-4
TEXT_FAMILY = ("text_into_image", "random", "append")
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


# ---------------------------------------------------------------- random batches

@st.composite
def batches(draw):
    """A collated-like batch: rows of token kinds S(text) I(image) C(candidate) A(answer)."""
    n_rows = draw(st.integers(1, 3))
    kinds = [draw(st.text(alphabet="SIICCA", min_size=0, max_size=9)) for _ in range(n_rows)]
    assume(any(kinds))
    width = max(len(k) for k in kinds)
    side = draw(st.sampled_from(["right", "left"]))
    if any(not k for k in kinds) and all(len(k) in (0, width) for k in kinds):
        # An empty row next to only full rows leaves the padding side undetermined.
        kinds = [k or "S" for k in kinds]
    d = draw(st.sampled_from([2, 3, 4, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    with_labels = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(n_rows, width, d, generator=gen)  # padding holds garbage too
    attn = torch.zeros(n_rows, width, dtype=torch.long)
    img = torch.zeros(n_rows, width, dtype=torch.bool)
    cand = torch.zeros(n_rows, width, dtype=torch.bool)
    labels = torch.full((n_rows, width), P, dtype=torch.long)
    for b, row in enumerate(kinds):
        off = width - len(row) if side == "left" else 0
        for i, k in enumerate(row):
            attn[b, off + i] = 1
            img[b, off + i] = k == "I"
            cand[b, off + i] = k == "C"
            if k == "A":
                labels[b, off + i] = int(torch.randint(0, 50, (), generator=gen))
    return embeds, attn, img, cand, (labels if with_labels else None), side


@st.composite
def configs(draw, strategies=("text_into_image", "image_into_text", "random", "append")):
    strategy = draw(st.sampled_from(strategies))
    if draw(st.booleans()):
        sel = {"threshold": draw(st.sampled_from([-1.0, -0.3, 0.0, 0.2, 0.5, 0.8]))}
    else:  # dyadic fractions: rho * n is exact in every precision
        sel = {"threshold": None,
               "top_fraction": draw(st.sampled_from([0.125, 0.25, 0.5, 0.75, 1.0]))}
    max_anchors = draw(st.one_of(st.none(), st.integers(0, 3)))
    pause = draw(st.integers(0, 2)) if strategy == "image_into_text" else 0
    return AnchorConfig(strategy=strategy, max_anchors=max_anchors, pause_tokens=pause,
                        seed=draw(st.integers(0, 1000)), **sel)


# ---------------------------------------------------------------- the naive reference

def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def _best(embeds, b, item, partners):
    """(s, partner position, near-tie gap) of one item against its partner positions."""
    cs = [_cos(embeds[b, item], embeds[b, p]) for p in partners]
    s = max(cs)
    gap = min((s - c for c in cs if c != s), default=math.inf)
    return s, partners[cs.index(s)], gap  # index(): first maximum = lowest position


def _select(items, score, cfg, margins):
    if cfg.threshold is not None:
        kept = [i for i in items if score[i] >= cfg.threshold]
        margins += [abs(score[i] - cfg.threshold) for i in items]
    else:
        k = math.ceil(cfg.top_fraction * len(items))
        kept = sorted(items, key=lambda i: (-score[i], i))[:k]
    if cfg.max_anchors is not None:
        kept = sorted(kept, key=lambda i: (-score[i], i))[: cfg.max_anchors]
    vals = sorted(score.values())
    margins += [b - a for a, b in zip(vals, vals[1:])]
    return sorted(kept)


def segments(attn, labels, b) -> dict[int, int]:
    """Segment of each real position of row b: answers (runs of labels) ended before it."""
    seg, n, prev = {}, 0, False
    for p in range(attn.shape[1]):
        sup = bool(attn[b, p]) and labels is not None and int(labels[b, p]) != P
        if prev and not sup:
            n += 1
        seg[p], prev = n, sup
    return seg


def reference(embeds, attn, img, cand, labels, cfg):
    """Per row: list of (origin, inserted, host, similarity); plus the row's selected items.

    Random placements are not predicted: for `random` the hosts are None.
    """
    rows, chosen_rows, margins = [], [], [math.inf]
    for b in range(embeds.shape[0]):
        real = [p for p in range(embeds.shape[1]) if attn[b, p]]
        seg = segments(attn, labels, b)
        imgs = [p for p in real if img[b, p]]
        cands = [p for p in real if cand[b, p]]
        after = {p: [] for p in real}
        chosen = []
        items, partners = (cands, imgs) if cfg.strategy in TEXT_FAMILY else (imgs, cands)
        mine = {i: [q for q in partners if seg[q] == seg[i]] for i in items}
        items = [i for i in items if mine[i]]  # no partner in its segment: never a copy
        best = {i: _best(embeds, b, i, mine[i]) for i in items}
        margins += [g for _, _, g in best.values()]
        if items:
            chosen = _select(items, {i: v[0] for i, v in best.items()}, cfg, margins)
        for i in chosen:
            if cfg.strategy == "image_into_text":
                after[best[i][1]].append((i, best[i][0]))
            else:
                host = {"text_into_image": best[i][1], "append": mine[i][-1], "random": None}
                after.setdefault(host[cfg.strategy], []).append((i, best[i][0]))
        if not real:  # an empty row stays all padding: no pause tokens either
            rows.append([])
            chosen_rows.append([])
            continue
        supervised = [p for p in real if labels is not None and labels[b, p] != P]
        pause_at = supervised[0] if supervised else None
        seq = []
        for p in real:
            if p == pause_at:
                seq += [(-1, True, -1, math.nan)] * cfg.pause_tokens
            seq.append((p, False, -1, math.nan))
            seq += [(o, True, p, s) for o, s in sorted(after[p])]  # original order
        if pause_at is None:
            seq += [(-1, True, -1, math.nan)] * cfg.pause_tokens
        rows.append(seq)
        chosen_rows.append(chosen)
    return rows, chosen_rows, min(margins)


def _side(attn) -> str:
    return "left" if any(r[0] == 0 and r.any() for r in attn) else "right"


def _real_cols(out, b):
    return torch.nonzero(out.attention_mask[b]).flatten().tolist()


# ---------------------------------------------------------------- properties

@SETTINGS
@given(batch=batches(), cfg=configs(("text_into_image", "image_into_text", "append")))
def test_matches_naive_reference(batch, cfg):
    embeds, attn, img, cand, labels, _ = batch
    pause = torch.arange(embeds.shape[2], dtype=torch.float32) + 0.5
    rows, _, margin = reference(embeds, attn, img, cand, labels, cfg)
    assume(margin > MARGIN)
    out = regroup(embeds, attn, img, cand, labels, cfg, pause_embedding=pause)
    width = max(len(r) for r in rows)
    assert out.inputs_embeds.shape == (embeds.shape[0], width, embeds.shape[2])
    left = _side(attn) == "left"
    for b, seq in enumerate(rows):
        n, npad = len(seq), width - len(seq)
        padded = [(-1, False, -1, math.nan)] * npad
        full = padded + seq if left else seq + padded
        assert out.origin[b].tolist() == [e[0] for e in full]
        assert out.inserted[b].tolist() == [e[1] for e in full]
        assert out.host[b].tolist() == [e[2] for e in full]
        assert out.attention_mask[b].tolist() == ([0] * npad + [1] * n if left
                                                  else [1] * n + [0] * npad)
        assert out.position_ids[b].tolist() == ([0] * npad + list(range(n)) if left
                                                else list(range(width)))
        torch.testing.assert_close(out.similarity[b], torch.tensor([e[3] for e in full]),
                                   equal_nan=True, atol=1e-5, rtol=0,
                                   check_dtype=False)
        assert int(out.num_anchors[b]) == sum(e[1] and e[0] >= 0 for e in seq)
        for j, (o, ins, _, _) in enumerate(full):
            want = embeds[b, o] if o >= 0 else (pause if ins else torch.zeros(embeds.shape[2]))
            assert torch.equal(out.inputs_embeds[b, j], want)
        if labels is None:
            assert out.labels is None
        else:
            assert out.labels[b].tolist() == [P if ins or o < 0 else int(labels[b, o])
                                              for o, ins, _, _ in full]


@SETTINGS
@given(batch=batches(), cfg=configs())
def test_structure(batch, cfg):
    """Order, hosts, counts and labels: the invariants every strategy keeps."""
    embeds, attn, img, cand, labels, _ = batch
    pause = torch.zeros(embeds.shape[2])
    _, chosen, margin = reference(embeds, attn, img, cand, labels, cfg)
    assume(margin > MARGIN)
    out = regroup(embeds, attn, img, cand, labels, cfg, pause_embedding=pause)
    for b in range(embeds.shape[0]):
        o, ins, h = out.origin[b].tolist(), out.inserted[b].tolist(), out.host[b].tolist()
        real = _real_cols(out, b)
        # the baseline's real tokens, in order, none missing
        assert [o[j] for j in real if not ins[j]] == torch.nonzero(attn[b]).flatten().tolist()
        copies = [j for j in real if ins[j] and o[j] >= 0]
        assert len(copies) == int(out.num_anchors[b]) == len(chosen[b])
        assert sorted(o[j] for j in copies) == chosen[b]  # random: same tokens as t2i
        pauses = [j for j in real if ins[j] and o[j] < 0]
        assert len(pauses) == cfg.pause_tokens * bool(real)
        for j in copies:
            src, host = o[j], h[j]
            assert bool(img[b, src] if cfg.strategy == "image_into_text" else cand[b, src])
            assert bool(cand[b, host] if cfg.strategy == "image_into_text" else img[b, host])
            if labels is not None:
                assert int(labels[b, src]) == P  # a labelled token is never copied
                assert int(out.labels[b, j]) == P
            assert int(out.attention_mask[b, j]) == 1
            k = j - 1  # right after its host, or after earlier copies of the same host
            while ins[k] and o[k] >= 0 and h[k] == host:
                assert o[k] < src  # original order among copies of one host
                k -= 1
            assert not ins[k] and o[k] == host
            assert torch.equal(out.inputs_embeds[b, j], embeds[b, src])
        if labels is not None:  # labels of original tokens unchanged
            assert [int(out.labels[b, j]) for j in real if not ins[j]] == \
                [int(labels[b, o[j]]) for j in real if not ins[j]]


@SETTINGS
@given(batch=batches(), cfg=configs(("random",)), epoch=st.integers(0, 2**31 - 1),
       ids=st.lists(st.integers(-2**63, 2**63 - 1), min_size=3, max_size=3))
def test_random_is_a_function_of_seed_sample_and_epoch(batch, cfg, epoch, ids):
    embeds, attn, img, cand, labels, _ = batch
    sid = torch.tensor(ids[:embeds.shape[0]])
    first = regroup(embeds, attn, img, cand, labels, cfg, sample_index=sid, epoch=epoch)
    again = regroup(embeds, attn, img, cand, labels, cfg, sample_index=sid.clone(), epoch=epoch)
    for field in ("origin", "host", "inserted", "position_ids", "attention_mask", "inputs_embeds"):
        assert torch.equal(getattr(first, field), getattr(again, field)), field
    default = regroup(embeds, attn, img, cand, labels, cfg)
    rows = regroup(embeds, attn, img, cand, labels, cfg, sample_index=torch.arange(len(embeds)))
    assert torch.equal(default.origin, rows.origin) and torch.equal(default.host, rows.host)


@SETTINGS
@given(batch=batches(), cfg=configs(("random",)), epoch=st.integers(0, 50),
       ids=st.lists(st.integers(0, 2**40), min_size=3, max_size=3))
def test_random_placement_follows_documented_draw(batch, cfg, epoch, ids):
    """host of a selected candidate = image ref_slot(seed, sample, epoch, offset, n) of the n
    image tokens of its segment, offset = its position counted from the row's first token."""
    embeds, attn, img, cand, labels, _ = batch
    _, chosen, margin = reference(embeds, attn, img, cand, labels, cfg)
    assume(margin > MARGIN)
    sid = ids[:embeds.shape[0]]
    out = regroup(embeds, attn, img, cand, labels, cfg, sample_index=torch.tensor(sid),
                  epoch=epoch)
    for b in range(embeds.shape[0]):
        real = torch.nonzero(attn[b]).flatten().tolist()
        seg = segments(attn, labels, b)
        want = {}
        for n in chosen[b]:
            imgs = [p for p in real if img[b, p] and seg[p] == seg[n]]
            want[n] = imgs[ref_slot(cfg.seed, sid[b], epoch, n - real[0], len(imgs))]
        copies = out.inserted[b] & (out.origin[b] >= 0)
        got = dict(zip(out.origin[b][copies].tolist(), out.host[b][copies].tolist()))
        assert got == want


@SETTINGS
@given(batch=batches(), cfg=configs(), chunk=st.sampled_from([1, 2, 7, 64]))
def test_chunked_similarity_gives_the_same_result(batch, cfg, chunk):
    # The (B, candidates, M) similarity is computed in chunks above a memory bound; the bound
    # (keyword `max_similarity_elements`) must not change any result.
    embeds, attn, img, cand, labels, _ = batch
    assume(reference(embeds, attn, img, cand, labels, cfg)[2] > MARGIN)
    pause = torch.ones(embeds.shape[2])
    whole = regroup(embeds, attn, img, cand, labels, cfg, pause)
    parts = regroup(embeds, attn, img, cand, labels, cfg, pause, max_similarity_elements=chunk)
    for field in ("inputs_embeds", "origin", "host", "inserted", "position_ids", "num_anchors"):
        assert torch.equal(getattr(whole, field), getattr(parts, field)), field
    torch.testing.assert_close(whole.similarity, parts.similarity, equal_nan=True)


@SETTINGS
@given(batch=batches())
def test_none_is_identity(batch):
    embeds, attn, img, cand, labels, side = batch
    out = regroup(embeds, attn, img, cand, labels, AnchorConfig(strategy="none"))
    B, width = attn.shape
    assert torch.equal(out.inputs_embeds, embeds)
    assert out.origin.tolist() == [list(range(width))] * B
    assert not out.inserted.any() and (out.host == -1).all() and (out.num_anchors == 0).all()
    assert torch.equal(out.attention_mask, attn)
    assert out.labels is None if labels is None else torch.equal(out.labels, labels)
    for b in range(B):
        n = int(attn[b].sum())
        assert out.position_ids[b].tolist() == (
            [0] * (width - n) + list(range(n)) if _side(attn) == "left" else list(range(width)))


@SETTINGS
@given(batch=batches(), cfg=configs(("text_into_image", "image_into_text", "random", "append")),
       tau=st.sampled_from([1.0001, 1.5, 2.0]))
def test_threshold_above_one_inserts_nothing(batch, cfg, tau):
    embeds, attn, img, cand, labels, _ = batch
    cfg = AnchorConfig(strategy=cfg.strategy, threshold=tau, max_anchors=cfg.max_anchors)
    out = regroup(embeds, attn, img, cand, labels, cfg)
    assert out.inputs_embeds.shape == embeds.shape  # one row is always full here
    assert (out.num_anchors == 0).all() and not out.inserted.any()
    assert torch.equal(out.attention_mask, attn)
    real = attn.bool()
    assert torch.equal(out.origin[real], torch.nonzero(real)[:, 1])
    assert torch.equal(out.inputs_embeds[real], embeds[real])
    if labels is not None:
        assert torch.equal(out.labels[real], labels[real])


@SETTINGS
@given(batch=batches(), cfg=configs())
def test_gradients_reach_every_copy(batch, cfg):
    embeds, attn, img, cand, labels, _ = batch
    x = embeds.clone().requires_grad_(True)
    out = regroup(x, attn, img, cand, labels, cfg, pause_embedding=torch.ones(embeds.shape[2]))
    weight = torch.randn(out.inputs_embeds.shape, generator=torch.Generator().manual_seed(1))
    (out.inputs_embeds * weight).sum().backward()
    want = torch.zeros_like(embeds)
    for b, row in enumerate(out.origin.tolist()):
        for j, o in enumerate(row):
            if o >= 0:
                want[b, o] += weight[b, j]
    torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["text_into_image", "image_into_text", "append"])
def test_half_precision_selects_like_fp32(dtype, strategy):
    # Values exactly representable in 16 bits: the fp32 cosine is the same, so the selection is.
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randint(-4, 5, (3, 12, 4), generator=gen).float()
    embeds[embeds.abs().sum(-1) == 0] = 1.0
    attn = torch.ones(3, 12, dtype=torch.long)
    attn[1, 9:] = 0
    img = torch.zeros(3, 12, dtype=torch.bool)
    img[:, 1:5] = True
    cand = torch.zeros(3, 12, dtype=torch.bool)
    cand[:, 5:9] = True
    cfg = AnchorConfig(strategy=strategy, threshold=0.3)
    ref = regroup(embeds, attn, img, cand, None, cfg)
    out = regroup(embeds.to(dtype), attn, img, cand, None, cfg)
    assert out.inputs_embeds.dtype == dtype
    assert torch.equal(out.origin, ref.origin) and torch.equal(out.host, ref.host)
    assert ref.num_anchors.sum() > 0
    assert torch.equal(out.inputs_embeds.float(), ref.inputs_embeds)


def test_top_fraction_decimal_rho_is_not_inflated_by_float_error():
    # ceil(0.1 * 30) is 3; in float64 0.1 * 30 == 3.0000000000000004, whose ceil is 4.
    d, n_cand = 4, 30
    embeds = torch.randn(1, 2 + n_cand, d, generator=torch.Generator().manual_seed(0))
    attn = torch.ones(1, 2 + n_cand, dtype=torch.long)
    img = torch.zeros(1, 2 + n_cand, dtype=torch.bool)
    img[0, :2] = True
    cand = ~img
    cfg = AnchorConfig(threshold=None, top_fraction=0.1)
    assert regroup(embeds, attn, img, cand, None, cfg).num_anchors.tolist() == [3]
