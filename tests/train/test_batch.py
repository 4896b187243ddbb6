"""The global batch (data.global_batch_size -> gradient accumulation) and rank-safe log
rotation: the derivation by hand, one process through the CLI, two processes through
launch.sh (DDP on CPU, resumed)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.utilities import rank_zero_only

from attanchor.train.cli import RotatingCSVLogger, build_cli
from attanchor.train.runinfo import BatchPlan, plan_batch
from tests.conftest import world_overrides

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "recipes" / "demo" / "baseline.yaml")  # the batch is the same for every arm


@pytest.mark.parametrize(
    ("world", "per_device", "global_batch", "accumulate"),
    [(1, 4, 128, 32), (8, 4, 128, 4), (16, 4, 128, 2), (2, 2, 8, 2), (1, 8, 8, 1), (2, 8, 16, 1)],
)
def test_plan_batch_derives_accumulation(world, per_device, global_batch, accumulate):
    plan = plan_batch(world_size=world, per_device_batch_size=per_device,
                      global_batch_size=global_batch)
    assert plan == BatchPlan(world, per_device, accumulate, global_batch)
    # an explicit accumulation equal to the derived one is accepted
    assert plan_batch(world_size=world, per_device_batch_size=per_device,
                      global_batch_size=global_batch, accumulate_grad_batches=accumulate) == plan


def test_plan_batch_without_a_global_batch_keeps_the_accumulation():
    plan = plan_batch(world_size=2, per_device_batch_size=4, accumulate_grad_batches=3)
    assert plan.to_dict() == {"world_size": 2, "per_device_batch_size": 4,
                              "accumulate_grad_batches": 3, "global_batch_size": 24}


def test_plan_batch_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"global_batch_size=16 .* world_size 8 x "
                                         r"data.batch_size 4 = 32"):
        plan_batch(world_size=8, per_device_batch_size=4, global_batch_size=16)
    with pytest.raises(ValueError, match=r"global_batch_size=100 is not a multiple of world_size "
                                         r"2 x data.batch_size 8 = 16"):
        plan_batch(world_size=2, per_device_batch_size=8, global_batch_size=100)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=3 contradicts "
                                         r"data.global_batch_size=32 / \(world_size 2 x "
                                         r"data.batch_size 4\) = 4"):
        plan_batch(world_size=2, per_device_batch_size=4, global_batch_size=32,
                   accumulate_grad_batches=3)
    with pytest.raises(ValueError, match="data.global_batch_size=0"):
        plan_batch(world_size=1, per_device_batch_size=4, global_batch_size=0)


def test_one_process_fit_accumulates_to_the_global_batch(tiny_world, tmp_path):
    cli = build_cli(["fit", "--config", DEMO, *world_overrides(tiny_world, tmp_path),
                     "--run.wandb", "false", "--trainer.enable_progress_bar", "false",
                     "--trainer.max_steps", "2", "--trainer.val_check_interval", "null",
                     "--trainer.limit_val_batches", "0", "--data.batch_size", "2",
                     "--data.global_batch_size", "8"])
    assert cli.trainer.accumulate_grad_batches == 4
    # 2 optimizer steps x 4 accumulated batches of 2
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 8
    run = tmp_path / "demo" / "none-seed0"
    assert json.loads((run / "run.json").read_text())["batch"] == {
        "world_size": 1, "per_device_batch_size": 2, "accumulate_grad_batches": 4,
        "global_batch_size": 8}
    assert "batch/global_batch_size: 8" in (run / "hparams.yaml").read_text()


def test_cli_refuses_a_global_batch_that_does_not_divide(tiny_world, tmp_path):
    with pytest.raises(ValueError, match=r"global_batch_size=10 is not a multiple"):
        build_cli(["fit", "--config", DEMO, *world_overrides(tiny_world, tmp_path),
                   "--run.wandb", "false", "--data.batch_size", "4",
                   "--data.global_batch_size", "10"])


def test_only_rank_zero_rotates_the_metrics_file(tmp_path, monkeypatch):
    (tmp_path / "metrics.csv").write_text("step\n0\n")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    _ = RotatingCSVLogger(tmp_path, resuming=True).experiment  # a non-zero rank: no rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    logger = RotatingCSVLogger(tmp_path, resuming=True)
    _ = logger.experiment
    _ = logger.experiment  # once per logger, not per access
    assert (tmp_path / "metrics.part1.csv").read_text() == "step\n0\n"
    assert not (tmp_path / "metrics.part2.csv").exists()


@pytest.mark.slow
def test_two_processes_global_batch_and_resumed_rotation(tiny_world, tmp_path):
    """launch.sh, 2 CPU processes (DDP): global 8 = 2 x 2 x accumulate 2; a resumed run moves
    the first metrics.csv aside once (rank zero), and both curves stay readable."""
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    common = [str(ROOT / "launch.sh"), DEMO, *world_overrides(tiny_world, tmp_path / "runs"),
              "--trainer.strategy", "ddp", "--trainer.val_check_interval", "null",
              "--trainer.limit_val_batches", "0", "--data.batch_size", "2",
              "--data.global_batch_size", "8", "--run.wandb", "false",
              "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false"]
    for extra in (["--trainer.max_steps", "2"], ["--trainer.max_steps", "3", "--ckpt_path", "last"]):
        proc = subprocess.run(common + extra, env=env, capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "demo" / "none-seed0"
    assert json.loads((run / "run.json").read_text())["batch"] == {
        "world_size": 2, "per_device_batch_size": 2, "accumulate_grad_batches": 2,
        "global_batch_size": 8}
    assert sorted(p.name for p in run.glob("metrics*.csv")) == ["metrics.csv",
                                                                  "metrics.part1.csv"]

    def steps(name: str) -> list[int]:
        with open(run / name, newline="") as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]

    assert steps("metrics.part1.csv") == [0, 1] and steps("metrics.csv") == [2]
