"""`attanchor fit --data.packing true` end to end: the packed loader feeds AnchorModule's
packed branch through Lightning, and the loss is the padded run's on the same records."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from attanchor.train.cli import build_cli
from tests.conftest import world_overrides

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "recipes" / "demo" / "anchored.yaml")


def first_loss(world, run_root: Path, *extra: str) -> float:
    build_cli(["fit", "--config", DEMO, *world_overrides(world, run_root),
                     "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "1",
                     "--trainer.limit_val_batches", "0", "--run.wandb", "false",
                     "--data.batch_size", "6", "--data.eval_batch_size", "6",
                     "--trainer.log_every_n_steps", "1", *extra])
    metrics = next(run_root.rglob("metrics.csv"))  # the run directory's (run.root)
    with open(metrics, newline="") as f:
        return next(float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss"))


def test_packed_fit_step_has_the_padded_loss(tiny_world, tmp_path):
    padded = first_loss(tiny_world, tmp_path / "padded")
    packed = first_loss(tiny_world, tmp_path / "packed", "--data.packing", "true",
                        "--data.max_length", "256")
    # The same records in the same order (sampler of (seed, epoch)), the same first step.
    assert packed == pytest.approx(padded, rel=1e-5)
