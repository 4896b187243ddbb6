"""Batch ``RenderedSample``s: pad to the longest row, batch images per family (stack LLaVA's,
pad NeXT's tiles, concatenate Qwen's patches) with their size tensors. A pure function."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from attanchor.data.images import SIZE_KEYS, merge_batches
from attanchor.data.render import IGNORE_INDEX, RenderedSample

PADDING_SIDES = ("right", "left")


def sample_index(record_id: str) -> int:
    """A sample's stable index: the first 8 bytes of blake2b(record id), as an int in
    [0, 2**63). The same on every rank, run, split and file order (Python's ``hash`` is salted
    per process, a dataset position changes with the split); it seeds the random control's
    per-sample placements. ``sample_index("q1") == 3765133564748579315``."""
    digest = hashlib.blake2b(record_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def collate(samples: Sequence[RenderedSample], pad_token_id: int,
            padding_side: str = "right") -> dict[str, Any]:
    """Pad ``samples`` to the longest one and stack their images.

    Returns ``input_ids (B, L) long``, ``attention_mask (B, L) long``, ``labels (B, L) long``,
    ``candidate_mask (B, L) bool``, ``pixel_values`` (every sample's images in sample order;
    None when no sample has an image; LLaVA (N_images, 3, H, W), LLaVA-NeXT (N_images,
    max_tiles, 3, S, S) with zero tiles as padding, Qwen2.5-VL (sum of patches, C * T * P * P)
    concatenated: ``attanchor.data.images``), the family's size tensors when its processor
    gives them (``image_sizes (N_images, 2)``, ``image_grid_thw (N_images, 3)``),
    ``mm_token_type_ids (B, L) int32`` when the samples carry it (Qwen; pads 0), ``ids`` (list
    of B str) and ``sample_index (B,) long`` (``sample_index(id)``: stable per record).

    Invariants: a row's real tokens keep their order and sit at the end of the row with
    ``padding_side="left"`` (generation) or at the start with ``"right"`` (training); padding
    has ``input_ids == pad_token_id``, ``attention_mask == 0``, ``labels == -100``,
    ``candidate_mask == False``; ``attention_mask.sum(1)`` are the sample lengths.

    Example: lengths 3 and 1, pad 0, right padding::

        input_ids      [[5, 6, 7], [9, 0, 0]]
        attention_mask [[1, 1, 1], [1, 0, 0]]
        labels         [[-100, -100, 7], [9, -100, -100]]   (if sample 2's token is labelled)

    and with left padding the second row is ``[0, 0, 9]`` / ``[0, 0, 1]`` / ``[-100, -100, 9]``.
    """
    if not samples:
        raise ValueError("collate: empty batch")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side={padding_side!r}: allowed are {PADDING_SIDES}")
    if pad_token_id is None:
        raise ValueError("collate: pad_token_id is None; give the tokenizer a pad token")
    batch, longest = len(samples), max(len(s.input_ids) for s in samples)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    candidate_mask = torch.zeros((batch, longest), dtype=torch.bool)
    images: list[dict[str, torch.Tensor]] = []
    with_mm = [s.mm_token_type_ids is not None for s in samples]
    if any(with_mm) and not all(with_mm):
        raise ValueError("collate: some samples have mm_token_type_ids and some not; render "
                         "every sample of a batch with the same processor")
    mm = torch.zeros((batch, longest), dtype=torch.int32) if all(with_mm) else None
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        if not len(s.labels) == len(s.candidate_mask) == n:
            raise ValueError(f"sample {s.id}: input_ids, labels and candidate_mask lengths "
                             f"differ ({n}, {len(s.labels)}, {len(s.candidate_mask)})")
        row = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        input_ids[b, row] = s.input_ids
        attention_mask[b, row] = 1
        labels[b, row] = s.labels
        candidate_mask[b, row] = s.candidate_mask
        if mm is not None:
            mm[b, row] = s.mm_token_type_ids
        if s.pixel_values is not None:
            images.append(image_dict(s))
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
           "candidate_mask": candidate_mask, "pixel_values": None}
    if images:
        out.update(merge_batches(images))
    if mm is not None:
        out["mm_token_type_ids"] = mm
    out["ids"] = [s.id for s in samples]
    out["sample_index"] = torch.tensor([sample_index(s.id) for s in samples], dtype=torch.long)
    return out


def image_dict(s: RenderedSample) -> dict[str, torch.Tensor]:
    """A sample's image tensors for ``images.merge_batches``: ``pixel_values`` and the
    family's size tensors it carries (``image_sizes`` / ``image_grid_thw``)."""
    d = {"pixel_values": s.pixel_values}
    for key in SIZE_KEYS:
        if getattr(s, key) is not None:
            d[key] = getattr(s, key)
    return d
