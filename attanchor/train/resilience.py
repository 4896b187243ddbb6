"""Runs that survive: step-keyed randomness, pre-emption, atomic and verified checkpoints.

Three parts, each registered by ``attanchor.train.cli``:

- ``StepSeeding``: before every training batch, torch's, numpy's and Python's generators are
  seeded from ``(seed, rank, batch index)``, so dropout and any other draw of batch ``i`` are
  the same in a run resumed from any step as in the run that was never stopped. (Restoring a
  saved generator state is not enough: the loaders' ``iter()`` and validation draw from the
  generator between the save and the next batch differently in the two runs.)
- ``Preemption``: SIGTERM and SIGUSR1 (SLURM's pre-emption / time-limit warning,
  ``sbatch --signal=USR1@90``) only set a flag; at the end of the next optimizer step every
  rank agrees on it (one all-reduce), writes ``checkpoints/last.ckpt`` at that step and the
  process exits with ``PREEMPTED_EXIT_CODE`` (75, ``EX_TEMPFAIL``: "try again").
  ``launch.sh`` under SLURM requeues the job on it and the next start resumes from
  ``last.ckpt`` (``run.resume: auto``).
- ``AtomicCheckpointIO``: every checkpoint file is written to a hidden temporary name in its
  directory, fsynced and renamed over the target, with a ``<file>.meta.json`` sidecar holding
  its size and sha256; loading checks both (and that torch can read it) and refuses a
  truncated or corrupt file with ``CorruptCheckpointError`` naming it and the previous good
  checkpoint to resume from instead.

Example: a run killed by SIGKILL while writing step 40 leaves ``last.ckpt`` (step 30, intact)
and ``.last.ckpt.tmp-1234``; ``--ckpt_path last`` resumes from step 30. A ``last.ckpt`` cut
short by a full disk is refused: ``CorruptCheckpointError: runs/demo/.../last.ckpt is
truncated or corrupt (size 1000 bytes, recorded 52311): resume from the previous checkpoint
with --ckpt_path runs/demo/.../best.ckpt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: stopped on purpose, resume me
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
META_SUFFIX = ".meta.json"


# --------------------------------------------------------------------------- randomness
def step_seed(seed: int, rank: int, batch_index: int) -> int:
    """A 63-bit seed for training batch ``batch_index`` (counted over the whole run) on
    ``rank``: a hash, so neighbouring steps and ranks get unrelated streams.
    ``step_seed(0, 0, 0) == 2696329656458929524``."""
    digest = hashlib.sha256(f"{seed}:{rank}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StepSeeding(Callback):
    """Seeds torch (CPU and CUDA), numpy and ``random`` before each training batch from
    ``step_seed(seed, global_rank, total_batch_idx)``; ``seed`` defaults to the run's
    ``seed_everything`` value (``PL_GLOBAL_SEED``). Lightning restores ``total_batch_idx`` from
    the checkpoint, so the draws of every batch are a function of the run, not of its history.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        index = trainer.fit_loop.epoch_loop.total_batch_idx  # batches over all epochs, 0-based
        s = step_seed(base, trainer.global_rank, index)
        torch.manual_seed(s)  # seeds every CUDA device too
        np.random.seed(s % 2**32)
        random.seed(s)


# --------------------------------------------------------------------------- pre-emption
class Preempted(SystemExit):
    """Raised on every rank after the pre-emption checkpoint is written; exits the process
    with ``PREEMPTED_EXIT_CODE``."""

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Preemption(Callback):
    """On SIGTERM / SIGUSR1: checkpoint at the current step to ``ckpt_dir/last.ckpt``, exit 75.

    The handlers go in at ``on_train_start`` (after Lightning's own, which they replace for the
    run: Lightning's SIGTERM handler stops only at the end of the epoch and its SLURM handler
    saves in the middle of a step) and come out at the end of training. A signal only sets a
    flag; the flag is acted on after a completed optimizer step, never within one, so the
    checkpoint is one a resume continues exactly from. With several ranks the flag is
    all-reduced after every optimizer step, so all ranks stop at the same step even when only
    one was signalled. Processes Lightning launched itself (``devices > 1`` without torchrun)
    receive the signal forwarded from rank zero.
    """

    def __init__(self, ckpt_dir: str | os.PathLike,
                 signals: tuple[str, ...] = PREEMPT_SIGNALS) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.signals = tuple(getattr(signal, name) for name in signals
                             if hasattr(signal, name))
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: Any = None
        self._last_step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = signum
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        if first and launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)  # Lightning's own child ranks: forward once

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._trainer, self._last_step = trainer, trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # accumulating: no optimizer step yet, and no checkpoint mid-step
        self._last_step = trainer.global_step
        stop = self.received is not None
        if trainer.world_size > 1:  # one collective per step, on every rank alike
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = self.ckpt_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        name = signal.Signals(self.received).name if self.received else "a peer rank's signal"
        message = (f"attanchor: pre-empted by {name} at step {trainer.global_step}: "
                   f"checkpoint {path}; exiting with code {PREEMPTED_EXIT_CODE} (resume with "
                   "--ckpt_path last or run.resume: auto)")
        rank_zero_info(message)
        raise Preempted(message)


# --------------------------------------------------------------------------- checkpoint files
class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that is truncated, corrupt or unreadable."""


class _HashingWriter:
    """A write-only file wrapper that counts and hashes what passes through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def meta_path(path: str | os.PathLike) -> Path:
    """The sidecar of checkpoint ``path``: ``<path>.meta.json`` (``{"size", "sha256"}``)."""
    return Path(f"{path}{META_SUFFIX}")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def verify_checkpoint(path: str | os.PathLike, *, full: bool = True) -> str | None:
    """Why ``path`` cannot be trusted, or None. Checks its sidecar's size (and with ``full``
    its sha256); a file without a sidecar (written before this check existed, or by
    DeepSpeed) passes here and is judged by whether torch can read it."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    meta = meta_path(path)
    if not meta.is_file():
        return None
    try:
        want = json.loads(meta.read_text())
        size, sha = int(want["size"]), str(want["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable sidecar {meta.name}: {e}"
    got = path.stat().st_size
    if got != size:
        return f"size {got} bytes, recorded {size}"
    if full and file_sha256(path) != sha:
        return "sha256 differs from the recorded one"
    return None


def previous_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest other ``*.ckpt`` beside ``path`` that passes the size check, or None."""
    path = Path(path)
    others = [p for p in path.parent.glob("*.ckpt")
              if p.resolve() != path.resolve() and not p.name.startswith(".")]
    good = [p for p in others if verify_checkpoint(p, full=False) is None]
    return max(good, key=lambda p: p.stat().st_mtime_ns) if good else None


def _refusal(path: Path, why: str) -> CorruptCheckpointError:
    prev = previous_checkpoint(path)
    fix = (f"resume from the previous checkpoint with --ckpt_path {prev}" if prev is not None
           else f"no other checkpoint in {path.parent}: start a new run (move {path} away)")
    return CorruptCheckpointError(f"{path} is truncated or corrupt ({why}): {fix}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose files appear whole or not at all, and are verified on load
    (module docstring). Applies to every strategy that writes through a ``CheckpointIO`` (one
    device, DDP, FSDP with full state dicts); DeepSpeed writes its own checkpoint directories.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint takes no storage_options "
                            f"(got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                writer = _HashingWriter(f)
                torch.save(checkpoint, writer)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
            meta = {"size": writer.size, "sha256": writer.sha.hexdigest()}
            meta_tmp = tmp.with_name(tmp.name + META_SUFFIX)
            meta_tmp.write_text(json.dumps(meta))
            # The sidecar first: a kill between the renames leaves the old file with a new
            # sidecar, which the load refuses (never a corrupt file that passes).
            os.replace(meta_tmp, meta_path(path))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if path.is_file():
            why = verify_checkpoint(path)
            if why is not None:
                raise _refusal(path, why)
        try:
            kwargs = {} if map_location is None else {"map_location": map_location}
            return super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise _refusal(path, f"torch.load: {str(e).splitlines()[0][:200]}") from e

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        meta_path(path).unlink(missing_ok=True)


# --------------------------------------------------------------------------- wiring
def resilience_callbacks(ckpt_dir: str | os.PathLike, *, every_n_steps: int | None,
                         every_minutes: float | None) -> list[Callback]:
    """What ``attanchor fit`` adds to every run: ``StepSeeding``, ``Preemption`` and, when
    asked, a ``ModelCheckpoint`` writing ``last.ckpt`` every ``every_n_steps`` optimizer steps
    and one every ``every_minutes`` minutes of training (Lightning's ``every_n_train_steps`` /
    ``train_time_interval``, which one callback cannot combine)."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint

    if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
        raise ValueError(f"run.checkpoint_every_n_steps={every_n_steps!r}: a count >= 1 or null")
    if every_minutes is not None and not every_minutes > 0:
        raise ValueError(f"run.checkpoint_every_minutes={every_minutes!r}: minutes > 0 or null")
    out: list[Callback] = [StepSeeding(), Preemption(ckpt_dir)]
    # save_top_k=0: these write only last.ckpt (the newest state), never a numbered file.
    if every_n_steps is not None:
        out.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                   every_n_train_steps=every_n_steps,
                                   enable_version_counter=False))
    if every_minutes is not None:
        out.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                   train_time_interval=timedelta(minutes=every_minutes),
                                   enable_version_counter=False))
    return out


def resume_path(ckpt_dir: str | os.PathLike, resume: str, given: str | None) -> str | None:
    """The ``ckpt_path`` a fit starts from: ``given`` if any; with ``resume="auto"`` the run's
    ``last.ckpt`` when it exists (a requeued or restarted job continues), else None."""
    if resume not in ("never", "auto"):
        raise ValueError(f"run.resume={resume!r}: allowed are 'never' and 'auto'")
    if given:
        return given
    last = Path(ckpt_dir) / "last.ckpt"
    if resume == "auto" and last.is_file():
        rank_zero_info(f"attanchor: run.resume auto: resuming from {last}")
        return str(last)
    return None
