"""Logging that cannot kill a run, and secrets that never reach a run directory or a log.

W&B is an extra: metrics.csv (the CSV logger) is the run's record. ``FailSafeWandbLogger`` is
Lightning's ``WandbLogger`` that turns any failure of W&B, when the run starts (``wandb.init``:
an unwritable or broken ``wandb/`` folder, a bad setting) or later (a write to a run that
W&B has finished or lost), into one warning; from then on it does nothing and training goes
on with metrics.csv.

Example::

    >>> logger = FailSafeWandbLogger(save_dir="runs/demo/none-seed0", project="attanchor")
    >>> # runs/demo/none-seed0/wandb is a file, not a folder: wandb.init raises OSError
    >>> logger.log_metrics({"train/loss": 1.0}, step=0)   # warns once, returns
    >>> logger.failure
    'start: NotADirectoryError: [Errno 20] Not a directory: ...'

``redact`` removes the values of the secret variables (``SECRET_ENV``: the W&B key, the hub
tokens) from any text that is about to be written, such as a failure message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with the value of every set ``SECRET_ENV`` variable replaced by ``***``.
    Example: with ``HF_TOKEN=hf_abc``, ``redact("token hf_abc")`` is ``"token ***"``."""
    env = os.environ if environ is None else environ
    for name in SECRET_ENV:
        value = env.get(name)
        if value and len(value) >= 4:  # a 1-3 character "secret" would redact ordinary text
            text = text.replace(value, "***")
    return text


class FailSafeWandbLogger(WandbLogger):
    """``WandbLogger`` whose failures warn once and disable it (``failure`` says why) instead
    of raising into the training loop. Invariant: after the first failure no W&B call is made;
    the CSV logger beside it keeps every metric."""

    def __init__(self, *args: Any, csv_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failure: str | None = None
        self._csv_path = csv_path

    def _fail(self, when: str, error: BaseException) -> None:
        if self.failure is not None:  # a call that failed inside another one: warned already
            return
        self.failure = redact(f"{when}: {type(error).__name__}: {error}")
        where = self._csv_path or "metrics.csv"
        rank_zero_warn(f"W&B logging failed ({self.failure}); training continues and logs to "
                       f"{where} only (W&B stays off for the rest of this run; set "
                       "run.wandb: false to silence this)")

    def _guard(self, when: str, call: Callable[[], Any]) -> Any:
        if self.failure is not None:
            return None
        try:
            return call()
        except Exception as e:  # noqa: BLE001  (W&B must never stop training)
            self._fail(when, e)
            return None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self.failure is not None:
            return _DummyExperiment()
        run = self._guard("start", lambda: WandbLogger.experiment.fget(self))
        return _DummyExperiment() if run is None else run

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._guard("log_hyperparams", lambda: super(FailSafeWandbLogger, self)
                    .log_hyperparams(params))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._guard("log_metrics", lambda: super(FailSafeWandbLogger, self)
                    .log_metrics(metrics, step))

    @rank_zero_only
    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_table", lambda: super(FailSafeWandbLogger, self)
                    .log_table(*args, **kwargs))

    @rank_zero_only
    def log_text(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_text", lambda: super(FailSafeWandbLogger, self)
                    .log_text(*args, **kwargs))

    @rank_zero_only
    def log_image(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_image", lambda: super(FailSafeWandbLogger, self)
                    .log_image(*args, **kwargs))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard("after_save_checkpoint", lambda: super(FailSafeWandbLogger, self)
                    .after_save_checkpoint(checkpoint_callback))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guard("finalize", lambda: super(FailSafeWandbLogger, self).finalize(status))


def finish_wandb() -> None:
    """Close the process's W&B run, if any, so the next run of the same process (compare's
    arms, the demo's stages, a reproduction) starts its own; a missing wandb is fine."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
