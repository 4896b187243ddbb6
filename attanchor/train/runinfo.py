"""What makes a run reproducible: the resolved config, the environment and the data's hashes.

A run directory (shared/ARCHITECTURE.md)::

    runs/<recipe-name>/<strategy>-seed<k>/
      config.yaml   the resolved recipe (write_run_info)
      env.json      package versions, python, platform, git commit, data file hashes
      run.json      the batch as trained: world size, per-device batch, accumulation, global

Example::

    run_dir = run_dir_for("runs", "demo", "text_into_image", 0)
    write_run_info(run_dir, resolved_config, [train_file, val_file])

Only the global-zero process should call ``write_run_info``. ``plan_batch`` turns a global
batch (the papers' figure) into gradient accumulation for a given world size.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

PACKAGES = (
    "attanchor", "torch", "transformers", "peft", "lightning", "deepspeed", "bitsandbytes",
    "wandb", "accelerate", "safetensors", "tokenizers", "jsonargparse",
)
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def installed_packages() -> dict[str, str | None]:
    """Every installed distribution -> version (``PACKAGES`` included, None when missing).

    All of them, not only the stack's: `attanchor reproduce` names whichever one moved.
    """
    found = {dist.metadata["Name"]: dist.version for dist in metadata.distributions()
             if dist.metadata["Name"]}
    found.update({name: _version(name) for name in PACKAGES if name not in found})
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def git_state(repo_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the git work tree holding ``repo_dir``, else None.

    Default ``repo_dir``: the directory of the attanchor package (the code that trains). Dirty
    means tracked files differ from the commit; untracked files (run outputs) do not count.
    """
    if repo_dir is None:
        repo_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # no git, not a work tree, or a repository without commits
    return {"commit": commit, "dirty": bool(status.strip())}


def collect_env(
    data_files: Sequence[str | os.PathLike], *, repo_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The environment of this run, as a JSON-able dict.

    Keys: ``python``, ``platform``, ``packages`` (every installed distribution -> version;
    the stack's ``PACKAGES`` always present, None when not installed), ``cwd`` (where relative
    data paths resolve),
    ``torch`` (``cuda`` version or None, ``devices``: names of visible GPUs), ``git``
    (``git_state``), ``data_files`` (path -> ``{"sha256", "bytes"}``), ``argv``, ``created``.
    A data file that is missing or a directory raises, naming it.
    """
    import torch

    hashes: dict[str, dict[str, Any]] = {}
    for f in data_files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(
                f"data file {path}: not found (or not a file); run info hashes each data file"
            )
        hashes[str(path)] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else []
    )
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": installed_packages(),
        "torch": {"cuda": torch.version.cuda, "devices": devices},
        "git": git_state(repo_dir),
        "data_files": hashes,
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _plain(value: Any, where: str) -> Any:
    """YAML-safe copy: mappings, lists, tuples (-> lists), paths (-> str) and scalars."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"resolved config at {where}: {type(value).__name__} is not YAML-safe; convert it to "
        "plain dicts/lists/scalars first (e.g. dataclasses.asdict)"
    )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class BatchPlan:
    """The batch a run trains with. Invariant: ``global_batch_size == world_size *
    per_device_batch_size * accumulate_grad_batches`` (samples per optimizer step)."""

    world_size: int
    per_device_batch_size: int
    accumulate_grad_batches: int
    global_batch_size: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive int")
    return value


def plan_batch(
    *,
    world_size: int,
    per_device_batch_size: int,
    global_batch_size: int | None = None,
    accumulate_grad_batches: int = 1,
) -> BatchPlan:
    """Derive gradient accumulation from a global batch: ``global / (world * per_device)``.

    ``global_batch_size=None`` keeps ``accumulate_grad_batches`` as given. With a global batch,
    ``accumulate_grad_batches`` must be left at 1 (its default: it is derived) or equal the
    derived value; a global batch that ``world_size * per_device_batch_size`` does not divide
    raises, naming the three numbers and the ways out.

    Example: global 128 on 8 GPUs x batch 4 -> accumulate 4; on 1 GPU -> 32; 2 nodes x 8 GPUs
    x batch 4 -> 2.
    """
    world = _positive("world_size", world_size)
    per = _positive("data.batch_size", per_device_batch_size)
    acc = _positive("trainer.accumulate_grad_batches", accumulate_grad_batches)
    if global_batch_size is None:
        return BatchPlan(world, per, acc, world * per * acc)
    total = _positive("data.global_batch_size", global_batch_size)
    per_step = world * per
    if total % per_step:
        raise ValueError(
            f"data.global_batch_size={total} is not a multiple of world_size {world} x "
            f"data.batch_size {per} = {per_step}: choose a data.batch_size (per device) or a "
            f"device count whose product divides {total}, or another global batch"
        )
    derived = total // per_step
    if acc not in (1, derived):
        raise ValueError(
            f"trainer.accumulate_grad_batches={acc} contradicts data.global_batch_size={total} "
            f"/ (world_size {world} x data.batch_size {per}) = {derived}: leave "
            "trainer.accumulate_grad_batches unset (it is derived from the global batch) or "
            "set data.global_batch_size: null"
        )
    return BatchPlan(world, per, derived, total)


def write_run_info(
    run_dir: str | os.PathLike,
    resolved_config: Mapping[str, Any],
    data_files: Sequence[str | os.PathLike],
    *,
    repo_dir: str | os.PathLike | None = None,
    batch: BatchPlan | None = None,
) -> dict[str, Any]:
    """Write ``config.yaml`` (``yaml.safe_dump`` of the resolved config), ``env.json`` and,
    given a ``batch``, ``run.json`` (``{"batch": BatchPlan.to_dict()}``).

    Creates ``run_dir``; the files are written atomically and overwritten on a rerun (a
    resumed run records the environment it resumed in). Returns the env dict.
    """
    run_dir = Path(run_dir)
    config = _plain(resolved_config, "config")
    env = collect_env(data_files, repo_dir=repo_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    _atomic_write(run_dir / "env.json", json.dumps(env, indent=2) + "\n")
    if batch is not None:
        _atomic_write(run_dir / "run.json", json.dumps({"batch": batch.to_dict()}, indent=2) + "\n")
    return env


def run_dir_for(
    root: str | os.PathLike, recipe_name: str, strategy: str, seed: int
) -> Path:
    """``root/<recipe_name>/<strategy>-seed<seed>``.

    ``recipe_name`` may be nested (``tinyllava-1b/lora``); every part and ``strategy`` must be a
    plain name (letters, digits, ``.``, ``_``, ``-``; no ``..``) so a run cannot land outside
    ``root``. Example: ``run_dir_for("runs", "demo", "none", 0)`` -> ``runs/demo/none-seed0``.
    """
    parts = recipe_name.split("/")
    for part in [*parts, strategy]:
        if not _NAME.match(part) or part in (".", ".."):
            raise ValueError(
                f"run directory name part {part!r} (recipe {recipe_name!r}, strategy "
                f"{strategy!r}): use letters, digits, '.', '_' and '-' only"
            )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: must be an int")
    return Path(root).joinpath(*parts, f"{strategy}-seed{seed}")
