"""launch.sh for real: 2 CPU processes, DeepSpeed ZeRO-3 through the CPU strategy, the demo
recipe, then `attanchor export` consolidating the sharded checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attanchor.cli import main as cli_main
from tests.conftest import world_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_launch_two_cpu_processes_zero3_then_export(tiny_world, tmp_path):
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WANDB_MODE": "offline"}
    cmd = [str(ROOT / "launch.sh"), str(ROOT / "recipes" / "demo" / "anchored.yaml"),
           *world_overrides(tiny_world, tmp_path / "runs"),
           "--trainer.strategy", "deepspeed_stage_3", "--trainer.max_steps", "4",
           "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
           "--data.batch_size", "4", "--run.wandb", "false",
           "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "demo" / "text_into_image-seed0"
    losses = [r for r in (run / "metrics.csv").read_text().splitlines()[1:] if r]
    assert losses, "no metrics logged"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir(), "a ZeRO checkpoint is a directory of shards"
    out = tmp_path / "export"
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--merge"]) == 0
    assert json.loads((out / "anchor_config.json").read_text())["strategy"] == "text_into_image"
    consolidated = torch.load(run / "checkpoints" / "last.ckpt.consolidated.ckpt",
                              weights_only=True)
    assert consolidated["global_step"] == 4
    assert any("lora_A" in k for k in consolidated["state_dict"])
