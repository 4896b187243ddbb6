"""Shared helpers of the anchoring tests."""

from __future__ import annotations

import torch


def padded_batch(rows: list[list[int]], labels: list[list[int]], cands: list[list[bool]], *,
                 padding: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of ids with their labels and candidate flags -> a padded (B, L) batch:
    ``input_ids`` (pad ``pad_id``), ``attention_mask``, ``labels`` (pad -100) and a bool
    ``candidate_mask``, padded on ``padding`` ("left" or "right")."""
    L = max(map(len, rows))
    out: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels",
                                            "candidate_mask")}
    for ids, lab, cand in zip(rows, labels, cands, strict=True):
        pad = L - len(ids)

        def place(x, fill, pad=pad):
            return [fill] * pad + x if padding == "left" else x + [fill] * pad

        out["input_ids"].append(place(ids, pad_id))
        out["attention_mask"].append(place([1] * len(ids), 0))
        out["labels"].append(place(lab, -100))
        out["candidate_mask"].append(place(cand, False))
    t = {k: torch.tensor(v) for k, v in out.items()}
    t["candidate_mask"] = t["candidate_mask"].bool()
    return t
