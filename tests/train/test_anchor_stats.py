"""Anchor statistics: counts and sums with the same keys for every batch, candidates or not."""

from __future__ import annotations

import math

import pytest
import torch

from attanchor.anchoring.regroup import Regrouped
from attanchor.train.anchor_stats import STAT_REDUCE, batch_anchor_stats


def _regrouped(rows: list[list[tuple[int, float]]], length: int) -> tuple[Regrouped, torch.Tensor]:
    """Rows of ``length`` real baseline tokens; each (origin, cosine) pair is one inserted copy
    (origin -1: a pause token, cosine ignored). Shapes: (B, length + most copies)."""
    B, extra = len(rows), max(len(r) for r in rows)
    L2 = length + extra
    origin = torch.full((B, L2), -1)
    inserted = torch.zeros(B, L2, dtype=torch.bool)
    similarity = torch.full((B, L2), math.nan)
    mask = torch.zeros(B, L2, dtype=torch.long)
    for b, copies in enumerate(rows):
        origin[b, :length] = torch.arange(length)
        mask[b, : length + len(copies)] = 1
        for j, (o, cos) in enumerate(copies):
            origin[b, length + j] = o
            inserted[b, length + j] = True
            if o >= 0:
                similarity[b, length + j] = cos
    num = torch.tensor([sum(o >= 0 for o, _ in r) for r in rows])
    r = Regrouped(inputs_embeds=torch.zeros(B, L2, 4), attention_mask=mask,
                  position_ids=torch.zeros(B, L2, dtype=torch.long), labels=None,
                  origin=origin, inserted=inserted, host=torch.full((B, L2), -1),
                  similarity=similarity, num_anchors=num)
    return r, torch.ones(B, length, dtype=torch.long)


def test_hand_example():
    r, mask = _regrouped([[(3, 0.2), (4, 0.3), (5, 0.5)], []], length=10)
    assert batch_anchor_stats(r, mask) == pytest.approx({
        "anchor_rows": 2.0, "anchor_count": 3.0, "anchor_similarity_sum": 1.0,
        "anchor_tokens_in": 20.0, "anchor_tokens_out": 23.0, "anchors_mean": 1.5,
        "anchors_max": 3.0, "growth_pct": 15.0})


def test_pause_tokens_add_length_but_no_copy_or_similarity():
    r, mask = _regrouped([[(2, 0.4), (-1, 0.0), (-1, 0.0)]], length=4)
    stats = batch_anchor_stats(r, mask)
    assert stats["anchor_count"] == 1.0 and stats["anchor_similarity_sum"] == pytest.approx(0.4)
    assert stats["anchor_tokens_out"] == 7.0 and stats["growth_pct"] == 75.0


def test_no_candidate_batch_logs_the_same_keys_finite():
    with_copies = batch_anchor_stats(*_regrouped([[(1, 0.3)], [(2, 0.1)]], length=5))
    no_copies = batch_anchor_stats(*_regrouped([[], []], length=5))
    identity = batch_anchor_stats(None, torch.ones(3, 5, dtype=torch.long))
    assert with_copies.keys() == no_copies.keys() == identity.keys() == STAT_REDUCE.keys()
    for stats in (no_copies, identity):
        assert all(math.isfinite(v) for v in stats.values())
        assert stats["anchor_count"] == stats["anchor_similarity_sum"] == 0.0
        assert stats["growth_pct"] == 0.0
    assert identity["anchor_rows"] == 3.0 and identity["anchor_tokens_in"] == 15.0


def test_validation_logs_the_same_keys_with_and_without_candidates(tiny_world):
    """Through a real Trainer: a batch whose candidate mask is empty (no copy possible) logs
    exactly the keys of a batch with copies, with zero counts instead of a skipped NaN mean."""
    import lightning as L
    from torch.utils.data import DataLoader

    from attanchor.anchoring import AnchorConfig
    from attanchor.data.datamodule import VLMDataModule
    from attanchor.train.module import AnchorModule, LoraSettings, ModelSettings

    dm = VLMDataModule(model_path=str(tiny_world["model"]),
                       train_file=str(tiny_world["data"] / "train.json"),
                       image_root=str(tiny_world["images"]), batch_size=4, max_length=128)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    empty = {**batch, "candidate_mask": torch.zeros_like(batch["candidate_mask"])}
    module = AnchorModule(str(tiny_world["model"]),
                          anchor=AnchorConfig(threshold=None, top_fraction=0.5),
                          model=ModelSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    logged = []
    for b in (batch, empty):
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.validate(module, DataLoader([b], batch_size=None), verbose=False)
        logged.append({k: float(v) for k, v in trainer.logged_metrics.items()})
    with_copies, without = logged
    assert with_copies.keys() == without.keys()
    assert {f"val/{k}" for k in STAT_REDUCE} <= with_copies.keys()
    assert with_copies["val/anchor_count"] > 0 and with_copies["val/anchor_rows"] == 4.0
    assert without["val/anchor_count"] == without["val/anchor_similarity_sum"] == 0.0
    assert all(math.isfinite(v) for v in without.values())
