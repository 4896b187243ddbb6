"""Pre-emption: SIGTERM / SIGUSR1 checkpoint at the current step and exit 75; launch.sh under
SLURM requeues on that code and the next start resumes from last.ckpt (``run.resume auto``).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from attanchor.train.cli import build_cli
from attanchor.train.resilience import PREEMPTED_EXIT_CODE, Preemption
from tests.train.test_resume_exact import (
    KILL_STEP,
    assert_same_weights,
    ckpt_of,
    finish,
    fit_args,
    start_fit,
    step_of,
    wait_for_checkpoint,
    weights,
)

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch.sh"
STRATEGY = "text_into_image"


class WaitForSignal(Callback):
    """Holds the batch after step 3 until the run's ``Preemption`` has seen a signal, so the
    signal always lands mid-epoch, between steps 3 and 4 (no timing in the test)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != KILL_STEP:
            return
        watchers = [c for c in trainer.callbacks if isinstance(c, Preemption)]
        assert watchers, "attanchor fit registers a Preemption callback"
        while watchers[0].received is None:
            time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    cli = build_cli(fit_args(tiny_world, root, STRATEGY))
    assert cli.trainer.global_step == 8
    return weights(ckpt_of(root, STRATEGY))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_at_its_step_exits_75_and_resume_matches(tiny_world, tmp_path,
                                                                    straight, sig):
    ckpt = ckpt_of(tmp_path, STRATEGY)
    proc = start_fit(fit_args(tiny_world, tmp_path, STRATEGY, "--trainer.callbacks",
                              "tests.train.test_preempt.WaitForSignal"))
    wait_for_checkpoint(proc, ckpt, KILL_STEP)
    os.kill(proc.pid, sig)
    rc, out = finish(proc)
    assert rc == PREEMPTED_EXIT_CODE == 75, out[-4000:]
    # Step 4 (the one in flight when the signal came) finished, then the checkpoint was written.
    assert f"pre-empted by {sig.name} at step {KILL_STEP + 1}: checkpoint {ckpt}" in out
    assert step_of(ckpt) == KILL_STEP + 1
    assert "Traceback" not in out, out[-4000:]
    # The next start finds last.ckpt by itself (what launch.sh passes under SLURM).
    resumed = build_cli(fit_args(tiny_world, tmp_path, STRATEGY, "--run.resume", "auto"))
    assert resumed.trainer.global_step == 8
    assert_same_weights(straight, weights(ckpt))


def test_resume_auto_starts_fresh_without_a_checkpoint(tiny_world, tmp_path):
    cli = build_cli(fit_args(tiny_world, tmp_path, STRATEGY, "--run.resume", "auto",
                             "--trainer.max_steps", "2"))
    assert cli.trainer.global_step == 2 and cli.trainer.ckpt_path is None


# --------------------------------------------------------------------------- launch.sh
def _slurm_bin(tmp_path: Path, srun_body: str) -> tuple[Path, Path]:
    """Stand-ins for the cluster's srun and scontrol (this machine has neither): srun runs
    ``srun_body``; scontrol appends its arguments to a log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\n{srun_body}\n")
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir, log


def _env(bin_dir: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("DRY_RUN", "GPUS_PER_NODE", "NPROC_PER_NODE", "NNODES")}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update({"SLURM_JOB_ID": "1234", "SLURM_JOB_NUM_NODES": "1", "GPUS_PER_NODE": "0",
                **extra})
    return env


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("trainer: {max_steps: 1}\n")
    return path


def test_slurm_dry_run_resumes_automatically(recipe):
    out = subprocess.run(["bash", str(LAUNCH), str(recipe), "--run.resume", "never"],
                         env=_env(None, DRY_RUN="1"), capture_output=True, text=True,
                         timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[:8] == ["srun", "--kill-on-bad-exit=1", "python", "-m", "attanchor.cli", "fit",
                       "--config", str(recipe)]
    assert cmd[8:10] == ["--run.resume", "auto"]
    assert cmd[-2:] == ["--run.resume", "never"]  # the user's override comes later and wins


@pytest.mark.parametrize(("srun_rc", "array", "want_rc", "want_requeue"), [
    (75, {}, 0, "requeue 1234\n"),
    (75, {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}, 0, "requeue 77_3\n"),
    (0, {}, 0, None),  # finished: no requeue
    (3, {}, 3, None),  # failed: its code, no requeue
])
def test_slurm_requeues_on_the_preempted_exit_code(tmp_path, recipe, srun_rc, array, want_rc,
                                                   want_requeue):
    bin_dir, log = _slurm_bin(tmp_path, f"exit {srun_rc}")
    proc = subprocess.run(["bash", str(LAUNCH), str(recipe)], env=_env(bin_dir, **array),
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == want_rc, proc.stderr
    assert (log.read_text() if log.exists() else None) == want_requeue


def test_slurm_forwards_usr1_to_the_run_and_requeues(tmp_path, recipe):
    """``sbatch --signal=B:USR1@90`` signals the batch script: launch.sh passes it to srun
    (here a stand-in that, like attanchor fit, exits 75 on it) and requeues."""
    started = tmp_path / "started"
    bin_dir, log = _slurm_bin(tmp_path, f"trap 'exit 75' USR1\ntouch {started}\n"
                                        "while true; do sleep 0.1; done")
    proc = subprocess.Popen(["bash", str(LAUNCH), str(recipe)], env=_env(bin_dir), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30  # a guard against a hang, not an assertion
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGUSR1: asking the run to checkpoint" in err
    assert log.read_text() == "requeue 1234\n"
