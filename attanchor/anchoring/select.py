"""Selection for the regroup: which baseline items become copies, attached after which host.

Everything here is batched tensor work over (B, items) or (B, items, keys) blocks: no Python
loop over tokens or rows. ``regroup.py`` turns the result into the regrouped sequence.

Segments keep the future out of the past. A position's segment is the number of answers
(runs of supervised labels) that end before it, so a copy and its host share a segment exactly
when no supervised token lies between them: a word of the second question is never copied
into the first image's span, which the first answer attends to, and an image of a later turn
is never copied next to an earlier word. Example (``A`` supervised)::

    kinds    : [I, C, A, A, C, I, C, A]
    segments : [0, 0, 0, 0, 1, 1, 1, 1]

The same ids will keep packed samples apart (each sample its own segments).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attanchor.anchoring.config import AnchorConfig

IGNORE_INDEX = -100
# Bound on the elements of one (B, queries, keys) similarity chunk: 2**26 fp32 = 256 MiB.
MAX_SIMILARITY_ELEMENTS = 2**26
_M32 = 0xFFFFFFFF


def pack_positions(mask: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Positions of True entries per row, in order, right-padded: (B, L) -> (B, K), (B, K).

    K is the largest row count (read back to the host) or, given ``width``, min(width, L)
    without any host read (static shape); rows with more than ``width`` entries keep their
    first ``width``. Padding slots hold other positions of the row and ``valid`` False.
    """
    counts = mask.sum(dim=1)
    if width is not None:
        K = min(int(width), mask.shape[1])
    else:
        K = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :K]
    valid = torch.arange(K, device=mask.device) < counts[:, None]
    return order, valid


def segment_ids_from_labels(labels: Tensor | None, attention_mask: Tensor) -> Tensor:
    """Segment id per position: (B, L) -> (B, L) long, 0 at the row start and +1 after each
    answer (a run of supervised labels on real tokens) ends. No labels: all 0.

    Example: labels ``[-100, -100, 7, 8, -100, 9]`` -> ``[0, 0, 0, 0, 1, 1]``.
    """
    if labels is None:
        return torch.zeros(attention_mask.shape, dtype=torch.long, device=attention_mask.device)
    sup = (labels != IGNORE_INDEX) & attention_mask.bool()
    nxt = torch.cat([sup[:, 1:], torch.zeros_like(sup[:, :1])], dim=1)
    ends = (sup & ~nxt).long()  # 1 at the last token of each answer
    return ends.cumsum(dim=1) - ends  # exclusive: the answer's own tokens keep its segment


@torch.no_grad()
def best_match(
    queries: Tensor, keys: Tensor, key_valid: Tensor,
    max_elements: int = MAX_SIMILARITY_ELEMENTS, *,
    query_segments: Tensor | None = None, key_segments: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Best cosine match of each query among the valid keys of its row (and its segment).

    # (B, Q, d), (B, K, d) -> scores (B, Q) fp32, index (B, Q) long
    Ties go to the lowest key index; a query with no valid key scores -inf. With
    ``query_segments`` (B, Q) and ``key_segments`` (B, K) a key is valid for a query only in
    the query's segment. The (B, Q, K) similarity is computed in chunks of queries so it never
    exceeds ``max_elements``.
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
        sl = slice(start, start + chunk)
        sim = torch.bmm(q[:, sl], k.transpose(1, 2))  # (B, q, K)
        allowed = key_valid[:, None, :]
        if query_segments is not None:
            allowed = allowed & (query_segments[:, sl, None] == key_segments[:, None, :])
        sim = (sim * k_inv[:, None, :]).masked_fill(~allowed, -math.inf)
        idx = sim.argmax(dim=-1)  # first maximum: lowest index on ties
        scores[:, sl] = sim.gather(-1, idx[..., None]).squeeze(-1)
        index[:, sl] = idx
    return scores, index


def _rank_desc(scores: Tensor) -> Tensor:
    """Rank of each entry in its row by descending score; ties: lower position first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


def select(scores: Tensor, valid: Tensor, config: AnchorConfig) -> Tensor:
    """Which scored items become copies: (B, Q) scores, valid -> (B, Q) bool.

    ``threshold``: s >= tau. ``top_fraction``: the ceil(rho * n) best of the row, n = valid
    items with a finite score (items that have a partner in their segment). ``max_anchors``:
    then the highest scores up to the cap. Ties: lower position first.
    """
    return select_capped(scores, valid, config)[0]


def select_capped(scores: Tensor, valid: Tensor, config: AnchorConfig) -> tuple[Tensor, Tensor]:
    """``select`` and how many items per row the cap dropped: -> (B, Q) bool, (B,) long.

    The dropped items are those the rule chose beyond ``max_anchors``, lowest score first
    (0 everywhere without a cap). No host read: usable in the static-shape mode.
    """
    eligible = valid & torch.isfinite(scores)
    masked = scores.masked_fill(~eligible, -math.inf)
    if config.threshold is not None:
        keep = eligible & (scores >= config.threshold)
    else:
        # The epsilon keeps float noise from rounding up: ceil(0.1 * 30) is 3, not 4.
        k = torch.ceil(eligible.sum(dim=1, dtype=torch.float64) * config.top_fraction - 1e-9)
        keep = eligible & (_rank_desc(masked) < k[:, None])
    chosen = keep.sum(dim=1)
    if config.max_anchors is not None:
        keep &= _rank_desc(masked.masked_fill(~keep, -math.inf)) < config.max_anchors
    return keep, chosen - keep.sum(dim=1)


# ---------------------------------------------------------------- the random control's draws

def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without overflowing int64 (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (``lowbias32``, C. Wellons): [0, 2**32) -> [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def placement_hash(seed: int, sample_index: Tensor, epoch: int, offset: Tensor) -> Tensor:
    """Counter-based 32-bit draw per (seed, sample, epoch, offset): (B,), (B, C) -> (B, C).

    h = mix(mix(mix(mix(mix(seed) ^ sid_lo) ^ sid_hi) ^ epoch) ^ offset), all in [0, 2**32),
    ``mix`` = ``_mix32``, ``sid_lo``/``sid_hi`` the low/high 32 bits of the sample index.
    Pure integer arithmetic: the same values on every device, rank and batch composition.
    """
    sid = sample_index.long()[:, None]  # (B, 1)
    h = _mix32(torch.full_like(offset, int(seed) & _M32))
    for v in (sid & _M32, (sid >> 32) & _M32, int(epoch) & _M32, offset & _M32):
        h = _mix32(h ^ v)
    return h


def text_hosts(
    strategy: str, best: Tensor, src: Tensor, segments: Tensor, image_mask: Tensor,
    start: Tensor, sample_index: Tensor, seed: int, epoch: int, *, width: int | None = None,
) -> Tensor:
    """Host position (B, C) of each candidate copy for the text strategies.

    ``text_into_image``: its best image token (``best``, found within its segment).
    ``append``: the last image token of its segment. ``random``: image token
    ``floor(h * n / 2**32)`` of the n in its segment, h = ``placement_hash(seed, sample,
    epoch, offset)``, offset = the candidate's position in its sample (``src - start``), so a
    sample's placements depend on nothing else in the batch. Candidates with no image in their
    segment get a placeholder host; selection never keeps them. ``width``: the static width
    of the packed image positions (``pack_positions``; None reads the count back).
    """
    if strategy == "text_into_image":
        return best
    img_pos, img_valid = pack_positions(image_mask, width)  # (B, M)
    if img_pos.shape[1] == 0:
        return torch.zeros_like(src)
    # Image segments are sorted along a row (positions and segments both ascend); padding
    # slots get a segment past every real one, so searchsorted finds each segment's block.
    big = torch.iinfo(torch.long).max
    img_seg = segments.gather(1, img_pos).masked_fill(~img_valid, big).contiguous()
    cand_seg = segments.gather(1, src).contiguous()  # (B, C)
    first = torch.searchsorted(img_seg, cand_seg)
    end = torch.searchsorted(img_seg, cand_seg, right=True)  # one past the segment's last
    if strategy == "append":
        slot = end - 1
    elif strategy == "random":
        h = placement_hash(seed, sample_index, epoch, src - start[:, None])
        slot = first + ((h * (end - first)) >> 32)  # h < 2**32, n < 2**31: no overflow
    else:
        raise ValueError(f"text_hosts: strategy {strategy!r} is not a text strategy")
    return img_pos.gather(1, slot.clamp(0, img_pos.shape[1] - 1))
