"""Exact resume from any step: a run stopped mid-epoch and resumed with ``--ckpt_path last``
ends with trainable weights ``torch.equal`` to the run that was never stopped.

What makes it exact: the data module saves the sampler's position in the epoch
(``ResumableSampler``), ``StepSeeding`` keys every batch's random draws (LoRA dropout is on
here) to the batch index, the random control's placements are a function of (seed, sample,
epoch), and Lightning restores the optimizer, the schedule and its loop counters. The kill
lands at step 3 of 4-batch epochs, after validation at step 2 and before the epoch's end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from attanchor.eval.compare import loss_curve
from attanchor.train.cli import build_cli
from tests.conftest import world_overrides

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "recipes" / "demo" / "anchored.yaml")
KILL_STEP = 3  # of 4 batches per epoch, 2 epochs: mid-epoch, one step after a validation
TIMEOUT_S = 300


def common(strategy: str, *, batches: int = 4) -> list[str]:
    """Two epochs of ``batches`` steps, validation every 2 steps, last.ckpt every step."""
    return ["--model.anchor.strategy", strategy, "--run.wandb", "false",
            "--trainer.max_steps", "-1", "--trainer.max_epochs", "2",
            "--trainer.limit_train_batches", str(batches), "--trainer.val_check_interval", "2",
            "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_val_batches", "1",
            "--run.early_stopping_patience", "null", "--data.batch_size", "4",
            "--data.eval_batch_size", "4", "--run.checkpoint_every_n_steps", "1",
            "--model.model.lora.dropout", "0.1",  # the step-keyed generator matters
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false"]


def fit_args(world, run_root: Path, strategy: str, *extra: str, batches: int = 4) -> list[str]:
    return ["fit", "--config", DEMO, *world_overrides(world, run_root),
            *common(strategy, batches=batches), *extra]


def run_dir(root: Path, strategy: str) -> Path:
    return root / "demo" / f"{strategy}-seed0"


def ckpt_of(root: Path, strategy: str) -> Path:
    return run_dir(root, strategy) / "checkpoints" / "last.ckpt"


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def step_of(ckpt: Path) -> int | None:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return None


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"{len(different)} of {len(a)} trainable tensors differ: {different[:3]}"


class CrashAtStep(Callback):
    """Dies as the batch after optimizer step ``step`` starts (last.ckpt holds that step)."""

    def __init__(self, step: int = KILL_STEP) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class HangAtStep(Callback):
    """Blocks as the batch after step ``step`` starts, until the test kills the process."""

    def __init__(self, step: int = KILL_STEP) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            while True:
                time.sleep(0.1)


# --------------------------------------------------------------------------- subprocesses
def fit_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MASTER_PORT", None)
    return env


def start_fit(args: list[str]) -> subprocess.Popen:
    """``attanchor fit`` in its own session (Lightning's rank 1 is its child: kill the group)."""
    return subprocess.Popen([sys.executable, "-m", "attanchor.cli", *args], cwd=REPO,
                            env=fit_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"no end in {TIMEOUT_S} s\n{out[-4000:]}")
    return proc.returncode, out


def wait_for_checkpoint(proc: subprocess.Popen, ckpt: Path, step: int) -> None:
    """Until ``ckpt`` holds ``step`` (files appear whole: AtomicCheckpointIO)."""
    deadline = time.monotonic() + TIMEOUT_S  # a guard against a hang, not an assertion
    while step_of(ckpt) != step:
        if proc.poll() is not None:
            pytest.fail(f"fit ended (rc {proc.returncode}) before a step-{step} checkpoint\n"
                        f"{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no step-{step} checkpoint at {ckpt} in {TIMEOUT_S} s")
        time.sleep(0.2)


def sigkill_at_step(args: list[str], ckpt: Path, step: int = KILL_STEP) -> None:
    """Run ``fit args`` with ``HangAtStep(step)``; SIGKILL the whole process group once ``ckpt``
    holds ``step``. The run blocks at that very step, so the checkpoint cannot move past it
    before the poll sees it."""
    hang = {"class_path": "tests.train.test_resume_exact.HangAtStep", "init_args": {"step": step}}
    proc = start_fit([*args, "--trainer.callbacks", json.dumps([hang])])
    wait_for_checkpoint(proc, ckpt, step)
    os.killpg(proc.pid, signal.SIGKILL)
    rc, out = finish(proc)
    assert rc == -signal.SIGKILL, out[-3000:]


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("strategy", ["none", "text_into_image", "random"])
def test_crash_mid_epoch_then_resume_gives_the_same_weights(tiny_world, tmp_path, strategy):
    straight = build_cli(fit_args(tiny_world, tmp_path / "straight", strategy))
    assert straight.trainer.global_step == 8
    stopped = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cli(fit_args(tiny_world, stopped, strategy, "--trainer.callbacks",
                           "tests.train.test_resume_exact.CrashAtStep"))
    ckpt = ckpt_of(stopped, strategy)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == KILL_STEP and state["epoch"] == 0
    # 3 batches of 4 on one rank: 12 positions of epoch 0 consumed
    assert state["VLMDataModule"]["sampler"] == {"epoch": 0, "consumed": 12, "num_samples":
                                                 state["VLMDataModule"]["sampler"]
                                                 ["num_samples"], "seed": 0,
                                                 "num_replicas": 1}
    resumed = build_cli(fit_args(tiny_world, stopped, strategy, "--ckpt_path", "last"))
    assert resumed.trainer.global_step == 8
    assert_same_weights(weights(ckpt_of(tmp_path / "straight", strategy)), weights(ckpt))
    live = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert_same_weights(weights(ckpt), live)  # the final checkpoint is the final model
    curve = "metrics.csv"
    assert loss_curve(run_dir(stopped, strategy) / curve) == \
        loss_curve(run_dir(tmp_path / "straight", strategy) / curve)


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tiny_world, tmp_path):
    """A real kill: ``attanchor fit`` in a subprocess, SIGKILL once step 3 is on disk."""
    strategy = "random"
    straight = build_cli(fit_args(tiny_world, tmp_path / "straight", strategy))
    assert straight.trainer.global_step == 8
    killed = tmp_path / "killed"
    sigkill_at_step(fit_args(tiny_world, killed, strategy), ckpt_of(killed, strategy))
    rc, out = finish(start_fit(fit_args(tiny_world, killed, strategy, "--ckpt_path", "last")))
    assert rc == 0, out[-4000:]
    assert step_of(ckpt_of(killed, strategy)) == 8
    assert_same_weights(weights(ckpt_of(tmp_path / "straight", strategy)),
                        weights(ckpt_of(killed, strategy)))


@pytest.mark.slow
def test_two_process_ddp_sigkill_then_resume_gives_the_same_weights(tiny_world, tmp_path):
    """2 CPU processes (gloo DDP, Lightning launches rank 1): the sampler's position is global,
    each rank resumes its own share."""
    strategy = "text_into_image"
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    straight = tmp_path / "straight"
    rc, out = finish(start_fit(fit_args(tiny_world, straight, strategy, *ddp, batches=3)))
    assert rc == 0, out[-4000:]
    killed = tmp_path / "killed"
    sigkill_at_step(fit_args(tiny_world, killed, strategy, *ddp, batches=3),
                    ckpt_of(killed, strategy), step=2)
    state = torch.load(ckpt_of(killed, strategy), map_location="cpu", weights_only=True)
    sampler = state["VLMDataModule"]["sampler"]
    assert (sampler["consumed"], sampler["num_replicas"]) == (2 * 4 * 2, 2)  # 2 steps x 4 x 2
    rc, out = finish(start_fit(fit_args(tiny_world, killed, strategy, *ddp, "--ckpt_path",
                                        "last", batches=3)))
    assert rc == 0, out[-4000:]
    assert step_of(ckpt_of(straight, strategy)) == step_of(ckpt_of(killed, strategy)) == 6
    assert_same_weights(weights(ckpt_of(straight, strategy)), weights(ckpt_of(killed, strategy)))
