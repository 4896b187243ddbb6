"""Batch ``RenderedSample``s: pad to the longest row, stack images. A pure function."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

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
    ``candidate_mask (B, L) bool``, ``pixel_values (N_images, 3, H, W) float`` (every sample's
    images in sample order; None when no sample has an image), ``ids`` (list of B str) and
    ``sample_index (B,) long`` (``sample_index(id)``: stable per record, whatever the batch).

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
    images = []
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
        if s.pixel_values is not None:
            images.append(s.pixel_values)
    pixel_values = None
    if images:
        shapes = {tuple(p.shape[1:]) for p in images}
        if len(shapes) > 1:
            raise ValueError(f"collate: images of different shapes {sorted(shapes)} in one "
                             "batch; the image processor must resize to one size")
        pixel_values = torch.cat(images)  # (N_images, 3, H, W)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "candidate_mask": candidate_mask, "pixel_values": pixel_values,
            "ids": [s.id for s in samples],
            "sample_index": torch.tensor([sample_index(s.id) for s in samples], dtype=torch.long)}
