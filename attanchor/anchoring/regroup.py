"""The regrouping engine: baseline sequence in, anchored sequence out, as one index map.

Every output position copies one baseline position (its *origin*) or is a pause token or
padding. Selection (which copies, attached after which baseline position: ``select.py``) is
separate from assembly (one stable sort of keys, then gathers, here), so a new strategy is a
new selection branch and nothing else. Everything is batched tensor work: no Python loop over
tokens or rows. A copy and its host always share a segment (``select.py``): no supervised
token lies between them, so no answer sees a later turn's words or images early.

Example (B=1, d=2; ``I`` image tokens, ``T`` text, one candidate ``T_b`` that best matches
``I_1``; strategy ``text_into_image``)::

    baseline  : [I_0, I_1, T_a, T_b]        origin   : [0, 1, 3, 2, 3]
    regrouped : [I_0, I_1, T_b*, T_a, T_b]  inserted : [F, F, T, F, F]

Two turns (``A`` supervised): baseline ``[I_0, T_a, A, I_1, T_b]`` has segments
``[0, 0, 0, 1, 1]``; ``T_b`` may only be copied after ``I_1`` and ``I_1`` only after ``T_b``.

Static shape (``AnchorConfig.static_shape``): every width is fixed by the input width and the
config, so nothing is read back to the host (no ``int(n.max())``, no ``if t.any()``) and the
regroup compiles with ``torch.compile(fullgraph=True)`` and runs under CUDA graphs. The output
width is L' = L + min(max_anchors, L) + pause_tokens; the packed queries are L wide (every
position could be a candidate); the value checks of the masks (which need a host read) are
skipped; the padding side, when not given, is read as a 0-d tensor. On the real positions the
output equals the dynamic mode's; the extra columns are padding. In the example above with
``max_anchors=2``: width 4 + 2 = 6, ``origin [0, 1, 3, 2, 3, -1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attanchor.anchoring.config import AnchorConfig
from attanchor.anchoring.select import (  # noqa: F401  (best_match, pack_positions: public)
    IGNORE_INDEX,
    MAX_SIMILARITY_ELEMENTS,
    best_match,
    pack_positions,
    segment_ids_from_labels,
    select,
    select_capped,
    text_hosts,
)


@dataclass
class Regrouped:
    """The regrouped batch. All tensors are (B, L') except ``inputs_embeds`` (B, L', d) and
    ``num_anchors`` (B,).

    ``origin``: baseline position each output position copies (-1: padding, pause token).
    ``inserted``: True for every copy and pause token. ``host``: for a copy, the baseline
    position it was attached after (-1 otherwise). ``similarity``: cosine that selected a copy
    (nan elsewhere). ``num_anchors``: copies per row (pause tokens not counted).
    ``num_dropped`` (B,): copies the selection rule chose that ``max_anchors`` dropped.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor | None
    origin: Tensor
    inserted: Tensor
    host: Tensor
    similarity: Tensor
    num_anchors: Tensor
    num_dropped: Tensor | None = None


def padding_side(attention_mask: Tensor) -> str:
    """'left' or 'right' (also for a batch with no padding), read from the mask.

    Raises ValueError for holes (a 0 between 1s) or a batch that mixes both sides.
    """
    real = attention_mask.bool()
    # A valid row is a block of 1s: the number of 0->1 and 1->0 changes is at most 2.
    changes = (real[:, 1:] != real[:, :-1]).sum(dim=1)
    bad = changes > 2
    bad |= (changes == 2) & real[:, 0]  # 1..0..1: a hole
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"regroup: attention_mask rows {rows} have holes; pad on one side only")
    left = (~real[:, 0] & real.any(dim=1)).any()
    right = (~real[:, -1] & real.any(dim=1)).any()
    if left and right:
        raise ValueError("regroup: attention_mask mixes left and right padding in one batch")
    return "left" if left else "right"


def _left_padded(real: Tensor) -> Tensor:
    """0-d bool tensor, True when some row starts with padding (no host read: static mode)."""
    return (~real[:, 0] & real.any(dim=1)).any()


def _position_ids(real: Tensor, side: str | Tensor) -> Tensor:
    """Real tokens 0..n-1; right pads continue the count, left pads get 0 (as HF generate).
    ``side``: "left"/"right", or a 0-d bool tensor (True = left; static mode)."""
    B, L = real.shape
    ar = torch.arange(L, device=real.device).expand(B, L)
    if isinstance(side, str) and side == "right":
        return ar.clone()
    n_left = (~real).long().cumprod(dim=1).sum(dim=1, keepdim=True)  # leading zeros
    left = (ar - n_left).clamp(min=0)
    return left if isinstance(side, str) else torch.where(side, left, ar)


def _check(
    embeds: Tensor, attention_mask: Tensor, image_mask: Tensor, candidate_mask: Tensor,
    labels: Tensor | None, segment_ids: Tensor | None, sample_index: Tensor | None,
    values: bool = True,
) -> None:
    """Shapes always; with ``values`` also the masks' contents (host reads: not in static
    mode, whose callers validate their data once in the dynamic mode or in the pipeline)."""
    if embeds.dim() != 3:
        raise ValueError(f"regroup: embeds must be (B, L, d), got shape {tuple(embeds.shape)}")
    B, L = embeds.shape[:2]
    named = {"attention_mask": attention_mask, "image_mask": image_mask,
             "candidate_mask": candidate_mask, "labels": labels, "segment_ids": segment_ids}
    for name, t in named.items():
        if t is not None and tuple(t.shape) != (B, L):
            raise ValueError(f"regroup: {name} has shape {tuple(t.shape)}; expected ({B}, {L})")
    if sample_index is not None and tuple(sample_index.shape) != (B,):
        raise ValueError(f"regroup: sample_index has shape {tuple(sample_index.shape)}; "
                         f"expected ({B},), one stable id per row (collate's 'sample_index')")
    if not values:
        return
    real = attention_mask.bool()
    cand, img = candidate_mask.bool(), image_mask.bool()
    if (cand & img).any():
        raise ValueError("regroup: a position is both a candidate and an image token")
    if ((cand | img) & ~real).any():
        raise ValueError("regroup: candidate or image positions fall on padding")
    if labels is not None and (cand & (labels != IGNORE_INDEX)).any():
        raise ValueError(
            "regroup: a candidate carries a label; copying it would leak the answer into the "
            "image span. Build candidate masks from user-turn content only."
        )
    if segment_ids is not None:
        both = real[:, 1:] & real[:, :-1]
        if ((segment_ids[:, 1:] < segment_ids[:, :-1]) & both).any():
            raise ValueError("regroup: segment_ids decrease along a row; segments are runs "
                             "numbered in order (0, 0, 1, 1, 2, ...)")


def regroup(
    embeds: Tensor,
    attention_mask: Tensor,
    image_mask: Tensor,
    candidate_mask: Tensor,
    labels: Tensor | None,
    config: AnchorConfig,
    pause_embedding: Tensor | None = None,
    *,
    sample_index: Tensor | None = None,
    epoch: int = 0,
    segment_ids: Tensor | None = None,
    side: str | None = None,
    max_similarity_elements: int = MAX_SIMILARITY_ELEMENTS,
) -> Regrouped:
    """Regroup a baseline LLaVA sequence per ``config`` (see METHOD.md and the module doc).

    # embeds (B, L, d) -> inputs_embeds (B, L', d); masks (B, L) -> (B, L')
    Invariants: the baseline's real tokens keep their order; inserted positions carry label
    -100 and attention 1; the padding side is kept; position ids run 0..n'-1 over real tokens
    (right pads continue the count, left pads are 0); ``none`` is the identity map.
    A copy is only hosted within its own segment: ``segment_ids`` (B, L), non-decreasing along
    a row; default ``segment_ids_from_labels(labels, attention_mask)`` (+1 after each answer).
    The ``random`` control draws each placement from (``config.seed``, ``sample_index[b]``,
    ``epoch``, the candidate's offset in its sample) (``select.text_hosts``); ``sample_index``
    (B,) int64 defaults to the row index, which makes placements depend on the batch.
    ``side``: the padding side of the output; None reads it from ``attention_mask`` (a batch
    without padding counts as right-padded). Generation passes "left", so rows that gain
    different numbers of copies are padded on the left even when the input had no padding.
    With ``config.static_shape`` no host synchronisation happens (module doc, "Static shape").
    """
    static = config.static_shape
    _check(embeds, attention_mask, image_mask, candidate_mask, labels, segment_ids,
           sample_index, values=not static)
    B, L, d = embeds.shape
    dev = embeds.device
    real = attention_mask.bool()
    if side is not None and side not in ("left", "right"):
        raise ValueError(f"regroup: side={side!r}: allowed are 'left', 'right' or None")
    if static:  # no host read: a given side is trusted, else it stays a 0-d tensor
        side_of: str | Tensor = side if side is not None else _left_padded(real)
    else:
        found = padding_side(attention_mask)
        if side is None:
            side = found
        elif (~real).any() and side != found:
            raise ValueError(f"regroup: side={side!r} but attention_mask is {found}-padded")
        side_of = side
    if config.strategy == "none":
        return Regrouped(
            inputs_embeds=embeds, attention_mask=attention_mask,
            position_ids=_position_ids(real, side_of), labels=labels,
            origin=torch.arange(L, device=dev).expand(B, L).clone(),
            inserted=torch.zeros((B, L), dtype=torch.bool, device=dev),
            host=torch.full((B, L), -1, dtype=torch.long, device=dev),
            similarity=torch.full((B, L), math.nan, device=dev),
            num_anchors=torch.zeros(B, dtype=torch.long, device=dev),
            num_dropped=torch.zeros(B, dtype=torch.long, device=dev),
        )
    if config.pause_tokens and (pause_embedding is None or tuple(pause_embedding.shape) != (d,)):
        got = None if pause_embedding is None else tuple(pause_embedding.shape)
        raise ValueError(f"regroup: config.pause_tokens > 0 needs pause_embedding of shape "
                         f"({d},), got {got}")

    width = L if static else None  # static: any position may be an image or a candidate
    seg = segment_ids_from_labels(labels, attention_mask) if segment_ids is None \
        else segment_ids.long()

    rows = torch.arange(B, device=dev)[:, None]
    # Keys are the whole sequence with a mask, so the argmax is already a baseline position
    # (lowest position = lowest image/candidate index on ties); only queries are gathered.
    keys = embeds.detach()
    if config.strategy == "image_into_text":
        img_pos, img_valid = pack_positions(image_mask.bool(), width)  # (B, M)
        scores, host = best_match(keys[rows, img_pos], keys, candidate_mask.bool(),
                                  max_similarity_elements, query_segments=seg.gather(1, img_pos),
                                  key_segments=seg)
        keep, dropped = select_capped(scores, img_valid, config)
        src = img_pos
    else:
        cand_pos, cand_valid = pack_positions(candidate_mask.bool(), width)  # (B, N)
        scores, best = best_match(keys[rows, cand_pos], keys, image_mask.bool(),
                                  max_similarity_elements, query_segments=seg.gather(1, cand_pos),
                                  key_segments=seg)
        keep, dropped = select_capped(scores, cand_valid, config)
        src = cand_pos
        if sample_index is None:
            sample_index = torch.arange(B, device=dev)
        first_real = torch.where(real, torch.arange(L, device=dev), L).amin(dim=1)  # (B,)
        host = text_hosts(config.strategy, best, src, seg, image_mask.bool(), first_real,
                          sample_index.to(dev), config.seed, epoch, width=width)

    # Items: originals, copies, pause tokens. Each gets a sort key (host, sub-order).
    K = config.pause_tokens
    C = src.shape[1]
    ar = torch.arange(L, device=dev).expand(B, L)
    has_real = real.any(dim=1)
    last_real = torch.where(real, ar, -1).amax(dim=1)
    if labels is not None:
        supervised = (labels != IGNORE_INDEX) & real
        first_sup = torch.where(supervised, ar, L).amin(dim=1)
        pause_host = torch.where(supervised.any(dim=1), first_sup - 1, last_real)
    else:
        pause_host = last_real
    k_ar = torch.arange(K, device=dev).expand(B, K)
    item_host = torch.cat([ar, host, pause_host[:, None].expand(B, K)], dim=1)
    item_sub = torch.cat([torch.zeros_like(ar), 1 + src, 1 + L + k_ar], dim=1)
    item_valid = torch.cat([real, keep, has_real[:, None].expand(B, K)], dim=1)
    item_origin = torch.cat([ar, src, torch.full((B, K), -1, device=dev, dtype=torch.long)], 1)
    item_inserted = torch.cat([torch.zeros_like(real), torch.ones((B, C + K), dtype=torch.bool,
                                                                   device=dev)], dim=1)
    item_hostout = torch.cat([torch.full_like(ar, -1), host,
                              torch.full((B, K), -1, device=dev, dtype=torch.long)], dim=1)
    item_sim = torch.cat([torch.full((B, L), math.nan, device=dev), scores.float(),
                          torch.full((B, K), math.nan, device=dev)], dim=1)

    base = L + K + 2
    key = (item_host + 1) * base + item_sub
    n_out = item_valid.sum(dim=1)
    if static:
        order = _static_order(key, item_valid, n_out, L + min(int(config.max_anchors), C) + K,
                              side_of)
    else:
        pad_key = -1 if side == "left" else torch.iinfo(torch.long).max
        key = key.masked_fill(~item_valid, pad_key)
        order = torch.sort(key, dim=1, stable=True).indices  # (B, L + C + K)
        Lp = int(n_out.max()) if B else 0
        order = order[:, -Lp:] if (side == "left" and Lp) else order[:, :Lp]  # (B, L')

    valid = item_valid.gather(1, order)
    origin = item_origin.gather(1, order).masked_fill(~valid, -1)
    inserted = item_inserted.gather(1, order) & valid
    is_pause = inserted & (origin < 0)
    out_host = item_hostout.gather(1, order).masked_fill(~valid, -1)
    similarity = item_sim.gather(1, order).masked_fill(~valid, math.nan)

    # (B, L, d) -> (B, L', d): index_select carries gradients into every copy.
    flat = (origin.clamp(min=0) + rows * L).flatten()  # row-major positions in (B * L)
    out = embeds.reshape(B * L, d).index_select(0, flat)  # (B * L', d)
    # Zero the padding rows. In place is safe (index_select keeps no output for backward), on
    # the 2-D result, not a view of it: in place on a view makes autograd copy the whole base
    # back and forth (CopySlices), 5x the cost of the gather's own backward.
    if static:  # no host read: one pass over the output
        out.masked_fill_(~valid.reshape(-1, 1), 0)
    elif not valid.all():  # the dynamic mode reads back anyway: write the padding rows only
        out[~valid.reshape(-1)] = 0
    out = out.view(B, -1, d)
    if K:
        out = torch.where(is_pause[..., None], pause_embedding.to(out.dtype), out)
    out_labels = None
    if labels is not None:
        out_labels = labels.gather(1, origin.clamp(min=0)).masked_fill(
            inserted | ~valid, IGNORE_INDEX)
    return Regrouped(
        inputs_embeds=out,
        attention_mask=valid.to(attention_mask.dtype),
        position_ids=_position_ids(valid, side_of),
        labels=out_labels,
        origin=origin,
        inserted=inserted,
        host=out_host,
        similarity=similarity,
        num_anchors=(inserted & ~is_pause).sum(dim=1),
        num_dropped=dropped,
    )


def _static_order(key: Tensor, item_valid: Tensor, n_out: Tensor, width: int,
                  side: str | Tensor) -> Tensor:
    """The output's item order at a fixed ``width``: (B, T) keys -> (B, width) indices.

    Valid items first, in key order (as the dynamic mode), then invalid ones; a left-padded
    output then rotates each row right by ``width - n_out`` so its items end at the last
    column. ``n_out <= width`` by construction (the cap), so no item is cut.
    """
    key = key.masked_fill(~item_valid, torch.iinfo(torch.long).max)
    order = torch.sort(key, dim=1, stable=True).indices[:, :width]  # (B, width)
    if isinstance(side, str) and side == "right":
        return order
    shift = width - n_out  # (B,)
    if not isinstance(side, str):
        shift = torch.where(side, shift, torch.zeros_like(shift))
    col = torch.arange(width, device=key.device)
    return order.gather(1, (col[None, :] - shift[:, None]) % width)
