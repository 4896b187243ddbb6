"""Packed (padding-free) batches: several ``RenderedSample``s per row, never re-tokenised.

Rows are filled greedily and balanced: with the fewest rows the batch needs, samples go
longest first into the row holding the fewest tokens so far (``pack_rows``), so the rows end
up about equally long and the padding to the longest row is small (first fit, which fills
the first rows and leaves a short last one, pads a batch of 4 easy-vqa records in rows of 256
by a third; this by under 1 %). The result depends on the sample lengths only
(deterministic). Within a row, samples keep their batch order and are laid end to end.

Besides the usual tensors, a packed batch has ``pack_ids`` (R, W): the index of the sample
(in ``ids``) each position belongs to, -1 on padding, non-decreasing along a row up to the
padding; and ``position_ids`` (R, W) restarting at 0 for every sample. The model side
(``attanchor.anchoring.packed``) confines attention to each sample with them.

Example: lengths 3, 2, 2, ``max_length=5``: rows [s0 s0 s0 . .] and [s1 s1 s2 s2 .]::

    pack_ids     [[0, 0, 0, -1], [1, 1, 2, 2]]          (W = 4, the longest row)
    position_ids [[0, 1, 2, 0], [0, 1, 0, 1]]           (padding: its own run from 0)

Each sample's first label is set to -100: it is never a target in an unpacked batch (nothing
precedes it), and in a packed row it would be the target of the previous sample's last token.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import torch

from attanchor.data.collate import image_dict, sample_index
from attanchor.data.images import merge_batches
from attanchor.data.render import IGNORE_INDEX, RenderedSample


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Rows of sample indices, balanced (module doc): the fewest rows R >= ceil(total /
    max_length) for which longest-first greedy placement (each sample into the row with the
    fewest tokens so far; ties: the lower row) keeps every row within ``max_length``.

    Invariants: every index appears once; indices ascend within a row; rows are ordered by
    their first index; a row's lengths sum to at most ``max_length``; a pure function of
    ``lengths`` and ``max_length``. Example: ``pack_rows([3, 2, 2, 1], 5) == [[0, 3],
    [1, 2]]`` (rows of 4 tokens each, where first fit gives 5 and 3).
    """
    if max_length < 1:
        raise ValueError(f"pack_rows: max_length={max_length} must be >= 1")
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"pack_rows: sample {i} has {n} tokens, more than the packed row "
                             f"length {max_length}; set the packing length >= data.max_length")
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    R = max(1, -(-sum(lengths) // max_length))
    while True:  # at most a few rounds: R only grows while some row overflows
        rows: list[list[int]] = [[] for _ in range(R)]
        heap = [(0, r) for r in range(R)]  # (tokens so far, row): the emptiest row first
        for i in order:
            used, r = heapq.heappop(heap)
            rows[r].append(i)
            heapq.heappush(heap, (used + lengths[i], r))
        if max(used for used, _ in heap) <= max_length:
            return sorted((sorted(row) for row in rows if row), key=lambda row: row[0])
        R += 1


def packed_collate(samples: Sequence[RenderedSample], pad_token_id: int,
                   max_length: int) -> dict[str, Any]:
    """Pack ``samples`` into rows of at most ``max_length`` tokens (``pack_rows``).

    Returns ``input_ids``, ``attention_mask`` (1 on every sample token), ``labels``,
    ``candidate_mask``, ``pack_ids``, ``position_ids`` (all (R, W), W the longest row),
    ``pixel_values`` (every image in packed order: row by row, sample by sample, as the image
    tokens appear row-major; None without images; batched per family with the size tensors
    as ``collate`` does), ``ids`` and ``sample_index`` (N,) in the
    packed order (``pack_ids`` index them). Padding: ``pad_token_id``, mask 0, label -100,
    no candidate, pack id -1.
    """
    if not samples:
        raise ValueError("packed_collate: empty batch")
    if pad_token_id is None:
        raise ValueError("packed_collate: pad_token_id is None; give the tokenizer a pad token")
    for s in samples:
        n = len(s.input_ids)
        if not len(s.labels) == len(s.candidate_mask) == n:
            raise ValueError(f"sample {s.id}: input_ids, labels and candidate_mask lengths "
                             f"differ ({n}, {len(s.labels)}, {len(s.candidate_mask)})")
        if n == 0:
            raise ValueError(f"sample {s.id}: empty; nothing to pack")
    try:
        rows = pack_rows([len(s.input_ids) for s in samples], max_length)
    except ValueError as e:
        big = next(s for s in samples if len(s.input_ids) > max_length)
        raise ValueError(f"sample {big.id}: {e}") from None
    order = [i for row in rows for i in row]  # the packed order of the samples
    width = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((R, width), dtype=torch.long)
    labels = torch.full((R, width), IGNORE_INDEX, dtype=torch.long)
    candidate_mask = torch.zeros((R, width), dtype=torch.bool)
    pack_ids = torch.full((R, width), -1, dtype=torch.long)
    position_ids = torch.zeros((R, width), dtype=torch.long)
    images = []
    k = 0  # the sample's index in the packed order
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            s = samples[i]
            n = len(s.input_ids)
            sl = slice(start, start + n)
            input_ids[r, sl] = s.input_ids
            attention_mask[r, sl] = 1
            labels[r, sl] = s.labels
            labels[r, start] = IGNORE_INDEX  # module doc: never a target of its own sample
            candidate_mask[r, sl] = s.candidate_mask
            pack_ids[r, sl] = k
            position_ids[r, sl] = torch.arange(n)
            if s.pixel_values is not None:
                images.append(image_dict(s))
            start += n
            k += 1
        position_ids[r, start:] = torch.arange(width - start)  # padding: its own run
    ids = [samples[i].id for i in order]
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
           "candidate_mask": candidate_mask, "pack_ids": pack_ids,
           "position_ids": position_ids, "pixel_values": None, "ids": ids,
           "sample_index": torch.tensor([sample_index(i) for i in ids], dtype=torch.long)}
    if images:  # the same per-family batching as collate (NeXT tiles padded, sizes carried)
        out.update(merge_batches(images, where="packed_collate"))
    return out
