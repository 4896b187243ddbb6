"""The regrouping engine: baseline sequence in, anchored sequence out, as one index map.

Every output position copies one baseline position (its *origin*) or is a pause token or
padding. Selection (which copies, attached after which baseline position) is separate from
assembly (one stable sort of keys, then gathers), so a new strategy is a new selection branch
and nothing else. Everything is batched tensor work: no Python loop over tokens or rows.

Example (B=1, d=2; ``I`` image tokens, ``T`` text, one candidate ``T_b`` that best matches
``I_1``; strategy ``text_into_image``)::

    baseline  : [I_0, I_1, T_a, T_b]        origin   : [0, 1, 3, 2, 3]
    regrouped : [I_0, I_1, T_b*, T_a, T_b]  inserted : [F, F, T, F, F]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attanchor.anchoring.config import AnchorConfig

IGNORE_INDEX = -100
# Bound on the elements of one (B, queries, keys) similarity chunk: 2**26 fp32 = 256 MiB.
MAX_SIMILARITY_ELEMENTS = 2**26


@dataclass
class Regrouped:
    """The regrouped batch. All tensors are (B, L') except ``inputs_embeds`` (B, L', d) and
    ``num_anchors`` (B,).

    ``origin``: baseline position each output position copies (-1: padding, pause token).
    ``inserted``: True for every copy and pause token. ``host``: for a copy, the baseline
    position it was attached after (-1 otherwise). ``similarity``: cosine that selected a copy
    (nan elsewhere). ``num_anchors``: copies per row (pause tokens not counted).
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


def _position_ids(real: Tensor, side: str) -> Tensor:
    """Real tokens 0..n-1; right pads continue the count, left pads get 0 (as HF generate)."""
    B, L = real.shape
    ar = torch.arange(L, device=real.device).expand(B, L)
    if side == "right":
        return ar.clone()
    n_left = (~real).long().cumprod(dim=1).sum(dim=1, keepdim=True)  # leading zeros
    return (ar - n_left).clamp(min=0)


def pack_positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of True entries per row, in order, right-padded: (B, L) -> (B, K), (B, K)."""
    counts = mask.sum(dim=1)
    K = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :K]
    valid = torch.arange(K, device=mask.device) < counts[:, None]
    return order, valid


@torch.no_grad()
def best_match(
    queries: Tensor, keys: Tensor, key_valid: Tensor, max_elements: int = MAX_SIMILARITY_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Best cosine match of each query among the valid keys of its row.

    # (B, Q, d), (B, K, d) -> scores (B, Q) fp32, index (B, Q) long
    Ties go to the lowest key index; a row with no valid key scores -inf. The (B, Q, K)
    similarity is computed in chunks of queries so it never exceeds ``max_elements``.
    """
    B, Q, _ = queries.shape
    K = keys.shape[1]
    scores = torch.full((B, Q), -math.inf, device=queries.device)
    index = torch.zeros((B, Q), dtype=torch.long, device=queries.device)
    if Q == 0 or K == 0:
        return scores, index
    q = F.normalize(queries.float(), dim=-1)
    k = keys.float()
    # Scale the (B, q, K) products by 1/|k| instead of normalising the (B, K, d) keys: the
    # keys are usually the whole sequence, the products a few candidates wide.
    k_inv = 1.0 / torch.linalg.vector_norm(k, dim=-1).clamp_min(1e-12)  # (B, K)
    chunk = max(1, max_elements // max(1, B * K))
    for start in range(0, Q, chunk):  # loop over chunks only, usually a single pass
        sim = torch.bmm(q[:, start : start + chunk], k.transpose(1, 2))  # (B, q, K)
        sim = (sim * k_inv[:, None, :]).masked_fill(~key_valid[:, None, :], -math.inf)
        idx = sim.argmax(dim=-1)  # first maximum: lowest index on ties
        scores[:, start : start + chunk] = sim.gather(-1, idx[..., None]).squeeze(-1)
        index[:, start : start + chunk] = idx
    return scores, index


def _rank_desc(scores: Tensor) -> Tensor:
    """Rank of each entry in its row by descending score; ties: lower position first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


def select(scores: Tensor, valid: Tensor, config: AnchorConfig) -> Tensor:
    """Which scored items become copies: (B, Q) scores, valid -> (B, Q) bool.

    ``threshold``: s >= tau. ``top_fraction``: the ceil(rho * n_valid) best of the row.
    ``max_anchors``: then the highest scores up to the cap. Ties: lower position first.
    """
    eligible = valid & torch.isfinite(scores)
    masked = scores.masked_fill(~eligible, -math.inf)
    if config.threshold is not None:
        keep = eligible & (scores >= config.threshold)
    else:
        # The epsilon keeps float noise from rounding up: ceil(0.1 * 30) is 3, not 4.
        k = torch.ceil(valid.sum(dim=1, dtype=torch.float64) * config.top_fraction - 1e-9)
        keep = eligible & (_rank_desc(masked) < k[:, None])
    if config.max_anchors is not None:
        keep &= _rank_desc(masked.masked_fill(~keep, -math.inf)) < config.max_anchors
    return keep


def _gather_or_zeros(positions: Tensor, index: Tensor) -> Tensor:
    """positions.gather(1, index), or zeros when no row has any position (width 0); the
    selection then keeps nothing, so the placeholder host is never used."""
    if positions.shape[1] == 0:
        return torch.zeros_like(index)
    return positions.gather(1, index)


def _check(
    embeds: Tensor, attention_mask: Tensor, image_mask: Tensor, candidate_mask: Tensor,
    labels: Tensor | None,
) -> None:
    if embeds.dim() != 3:
        raise ValueError(f"regroup: embeds must be (B, L, d), got shape {tuple(embeds.shape)}")
    B, L = embeds.shape[:2]
    named = {"attention_mask": attention_mask, "image_mask": image_mask,
             "candidate_mask": candidate_mask, "labels": labels}
    for name, t in named.items():
        if t is not None and tuple(t.shape) != (B, L):
            raise ValueError(f"regroup: {name} has shape {tuple(t.shape)}; expected ({B}, {L})")
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


def regroup(
    embeds: Tensor,
    attention_mask: Tensor,
    image_mask: Tensor,
    candidate_mask: Tensor,
    labels: Tensor | None,
    config: AnchorConfig,
    pause_embedding: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    side: str | None = None,
    max_similarity_elements: int = MAX_SIMILARITY_ELEMENTS,
) -> Regrouped:
    """Regroup a baseline LLaVA sequence per ``config`` (see METHOD.md and the module doc).

    # embeds (B, L, d) -> inputs_embeds (B, L', d); masks (B, L) -> (B, L')
    Invariants: the baseline's real tokens keep their order; inserted positions carry label
    -100 and attention 1; the padding side is kept; position ids run 0..n'-1 over real tokens
    (right pads continue the count, left pads are 0); ``none`` is the identity map.
    ``generator`` (CPU) drives the ``random`` control; default: seeded with ``config.seed``.
    ``side``: the padding side of the output; None reads it from ``attention_mask`` (a batch
    without padding counts as right-padded). Generation passes "left", so rows that gain
    different numbers of copies are padded on the left even when the input had no padding.
    """
    _check(embeds, attention_mask, image_mask, candidate_mask, labels)
    B, L, d = embeds.shape
    dev = embeds.device
    real = attention_mask.bool()
    found = padding_side(attention_mask)
    if side is None:
        side = found
    elif side not in ("left", "right"):
        raise ValueError(f"regroup: side={side!r}: allowed are 'left', 'right' or None")
    elif (~real).any() and side != found:
        raise ValueError(f"regroup: side={side!r} but attention_mask is {found}-padded")
    if config.strategy == "none":
        return Regrouped(
            inputs_embeds=embeds, attention_mask=attention_mask,
            position_ids=_position_ids(real, side), labels=labels,
            origin=torch.arange(L, device=dev).expand(B, L).clone(),
            inserted=torch.zeros((B, L), dtype=torch.bool, device=dev),
            host=torch.full((B, L), -1, dtype=torch.long, device=dev),
            similarity=torch.full((B, L), math.nan, device=dev),
            num_anchors=torch.zeros(B, dtype=torch.long, device=dev),
        )
    if config.pause_tokens and (pause_embedding is None or tuple(pause_embedding.shape) != (d,)):
        got = None if pause_embedding is None else tuple(pause_embedding.shape)
        raise ValueError(f"regroup: config.pause_tokens > 0 needs pause_embedding of shape "
                         f"({d},), got {got}")

    img_pos, img_valid = pack_positions(image_mask.bool())  # (B, M)
    cand_pos, cand_valid = pack_positions(candidate_mask.bool())  # (B, N)

    rows = torch.arange(B, device=dev)[:, None]
    # Keys are the whole sequence with a mask, so the argmax is already a baseline position
    # (lowest position = lowest image/candidate index on ties); only queries are gathered.
    keys = embeds.detach()
    if config.strategy == "image_into_text":
        scores, host = best_match(keys[rows, img_pos], keys, candidate_mask.bool(),
                                  max_similarity_elements)
        keep = select(scores, img_valid, config)
        src = img_pos
    else:
        scores, best = best_match(keys[rows, cand_pos], keys, image_mask.bool(),
                                  max_similarity_elements)
        keep = select(scores, cand_valid, config)
        src = cand_pos
        if config.strategy == "text_into_image":
            host = best
        elif config.strategy == "append":
            last_img = torch.where(image_mask.bool(), torch.arange(L, device=dev), -1).amax(dim=1)
            host = last_img[:, None].expand_as(src)
        else:  # random: same copies, uniformly random image token of the row
            if generator is None:
                generator = torch.Generator().manual_seed(config.seed)
            u = torch.rand(src.shape, generator=generator).to(dev)
            n_img = img_valid.sum(dim=1, keepdim=True)
            slot = (u * n_img).floor().long().clamp(max=(n_img - 1).clamp(min=0))
            host = _gather_or_zeros(img_pos, slot)

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
    pad_key = -1 if side == "left" else torch.iinfo(torch.long).max
    key = key.masked_fill(~item_valid, pad_key)
    order = torch.sort(key, dim=1, stable=True).indices  # (B, L + C + K)
    n_out = item_valid.sum(dim=1)
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
    out = embeds.reshape(B * L, d).index_select(0, flat).view(B, -1, d)
    if not valid.all():  # in place is safe: index_select does not keep its output for backward
        out = out.masked_fill_(~valid[..., None], 0)
    if K:
        out = torch.where(is_pause[..., None], pause_embedding.to(out.dtype), out)
    out_labels = None
    if labels is not None:
        out_labels = labels.gather(1, origin.clamp(min=0)).masked_fill(
            inserted | ~valid, IGNORE_INDEX)
    return Regrouped(
        inputs_embeds=out,
        attention_mask=valid.to(attention_mask.dtype),
        position_ids=_position_ids(valid, side),
        labels=out_labels,
        origin=origin,
        inserted=inserted,
        host=out_host,
        similarity=similarity,
        num_anchors=(inserted & ~is_pause).sum(dim=1),
    )
