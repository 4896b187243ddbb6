"""`attanchor fit|validate|test --config RECIPE [--key value ...]`: LightningCLI over the
AnchorModule and the VLMDataModule.

jsonargparse validates every key of the resolved recipe before any model loads. Each run gets
its own directory, ``<run.root>/<run.name>/<strategy>-seed<k>/``, holding the resolved config,
env.json (versions, git commit, data hashes), checkpoints/, metrics.csv and, with W&B on, an
offline wandb/ run in the group ``run.name`` so anchored arms and their baseline share a chart.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from attanchor.data.datamodule import VLMDataModule
from attanchor.train.module import AnchorModule
from attanchor.train.recipe import expand_config_args
from attanchor.train.resilience import AtomicCheckpointIO, resilience_callbacks, resume_path
from attanchor.train.runinfo import BatchPlan, plan_batch, run_dir_for


@dataclass(frozen=True)
class RunSettings:
    """Where a run writes, and what watches it.

    ``name`` groups the arms of one comparison (the W&B group); the run directory adds the
    anchor strategy and the seed. ``early_stopping_patience``: validation checks without a new
    best ``early_stopping_monitor`` (default val/loss, the paper's criterion; ``val/pope_acc``
    etc. when a callback in ``trainer.callbacks`` logs it, e.g.
    ``attanchor.eval.val_generation.ValGenerationCallback``) before stopping,
    ``early_stopping_mode`` min or max; None disables it.
    """

    root: str = "runs"
    name: str = "default"
    wandb: bool = True
    wandb_project: str = "attanchor"
    early_stopping_patience: int | None = 3
    save_top_k: int = 1
    early_stopping_monitor: str = "val/loss"
    early_stopping_mode: Literal["min", "max"] = "min"
    # Reliability (attanchor.train.resilience): last.ckpt every N optimizer steps and/or every
    # T minutes, besides the validation checkpoints; resume "auto" continues from the run's
    # last.ckpt when it exists (what launch.sh passes under SLURM, so a requeue resumes).
    checkpoint_every_n_steps: int | None = None
    checkpoint_every_minutes: float | None = None
    resume: Literal["never", "auto"] = "never"


# We pass the (recipe-resolved) argv explicitly; Lightning warns whenever sys.argv is set too.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
# The training loader's position is restored through VLMDataModule.state_dict (its
# ResumableSampler), which Lightning's check for a stateful loader does not see.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")


def keep_previous_logs(run_dir: Path, resuming: bool) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv; move it aside instead.

    Resuming: it becomes ``metrics.partK.csv``, read back as the start of the curve
    (``attanchor.eval.compare.loss_curve``). A fresh run over an old one: it becomes
    ``metrics.replaced-K.csv``, kept but no longer part of the curve. Call it on one process
    only (``RotatingCSVLogger`` does, on global rank zero, behind a barrier).
    """
    current = run_dir / "metrics.csv"
    if not current.exists():
        return
    stem = "metrics.part" if resuming else "metrics.replaced-"
    k = 1
    while (run_dir / f"{stem}{k}.csv").exists():
        k += 1
    current.rename(run_dir / f"{stem}{k}.csv")


class RotatingCSVLogger(CSVLogger):
    """A CSVLogger that first moves an earlier ``metrics.csv`` aside (``keep_previous_logs``).

    The rotation runs once, when the experiment is first created (Lightning does that on every
    rank, after the process group exists, before its "pre_setup" barrier): global rank zero
    renames, then every rank waits at a barrier, so no rank of a resumed torchrun can race
    another to rename the file or see it half-moved.
    """

    def __init__(self, run_dir: Path, resuming: bool) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="")
        self._run_dir, self._resuming, self._rotated = Path(run_dir), resuming, False

    @property
    def experiment(self) -> Any:
        if not self._rotated:
            self._rotated = True
            if rank_zero_only.rank == 0:
                keep_previous_logs(self._run_dir, self._resuming)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
        return super().experiment


class BatchPlanCallback(Callback):
    """Puts the run's batch (``runinfo.BatchPlan``) into the loggers' hyper-parameters (the
    CSV logger's hparams.yaml, the W&B config) and the console, once the loggers exist."""

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        p = self.plan
        rank_zero_info(
            f"attanchor: global batch {p.global_batch_size} = {p.world_size} processes x "
            f"{p.per_device_batch_size} per device x {p.accumulate_grad_batches} accumulation")
        for logger in trainer.loggers:
            logger.log_hyperparams({f"batch/{k}": v for k, v in p.to_dict().items()})


def recipe_strategy(name: str, settings: Any, accelerator: str = "auto") -> Any:
    """The strategy object ``attanchor fit`` runs a recipe's ``trainer.strategy`` with, given
    the module's ``ModelSettings`` (what trains decides the checkpoint and DDP options)."""
    from attanchor.train.strategies import build_strategy

    opts: dict[str, Any] = {}
    if name.startswith("deepspeed") and settings.mode != "full":
        opts["exclude_frozen_parameters"] = True  # LoRA: checkpoint trainables only
    if name == "ddp" and not settings.freeze_vision_tower:
        # LLaVA's vision_feature_layer=-2 leaves the tower's last layer unused.
        opts["find_unused_parameters"] = True
    return build_strategy(name, accelerator=accelerator, **opts)


class _Parsed(Exception):
    """Raised by a parse-only CLI once the recipe is parsed and its classes built."""

    def __init__(self, config: Any) -> None:
        super().__init__("parsed")
        self.config = config


class AttanchorCLI(LightningCLI):
    """LightningCLI plus the run directory, loggers, checkpointing and CPU-capable strategies.

    ``parse_only=True`` stops after the model and data module are built from the recipe
    (no trainer, no weights loaded): what ``validate_recipe`` uses.
    """

    def __init__(self, *args: Any, parse_only: bool = False, **kwargs: Any) -> None:
        self.parse_only = parse_only
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        if self.parse_only:
            raise _Parsed(self.parser.instantiate_classes(self.config))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunSettings, "run")
        parser.link_arguments("model.model_path", "data.model_path")
        parser.link_arguments("model.anchor.scope", "data.scope")

    def run_dir(self) -> Path:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        seed = cfg.get("seed_everything")
        return run_dir_for(cfg["run"]["root"], cfg["run"]["name"],
                           cfg["model"]["anchor"]["strategy"], seed)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run: RunSettings = cfg["run"]
        trainer_cfg = cfg.get("trainer", {})
        run_dir = self.run_dir()
        kwargs.setdefault("default_root_dir", str(run_dir))
        strategy = trainer_cfg.get("strategy", "auto")
        if isinstance(strategy, str):
            kwargs["strategy"] = recipe_strategy(
                strategy, self.model.settings, trainer_cfg.get("accelerator", "auto"))
        if self.subcommand == "fit":
            cfg["ckpt_path"] = resume_path(run_dir / "checkpoints", run.resume,
                                           cfg.get("ckpt_path"))
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = self._loggers(run, run_dir, resuming=bool(cfg.get("ckpt_path")))
        has_val = bool(self.datamodule.files.get("val")) or bool(
            getattr(self.datamodule, "val_fraction", None))
        monitor = "val/loss" if has_val else None
        callbacks = [
            ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best",
                            monitor=monitor, mode="min", save_last=True,
                            save_top_k=run.save_top_k if monitor else 0,
                            enable_version_counter=False),
            LearningRateMonitor(logging_interval="step"),
            *resilience_callbacks(run_dir / "checkpoints",
                                  every_n_steps=run.checkpoint_every_n_steps,
                                  every_minutes=run.checkpoint_every_minutes),
        ]
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]  # write-then-rename, verified
        user = trainer_cfg.get("callbacks") or []
        user = list(user) if isinstance(user, list | tuple) else [user]
        check_monitor(run.early_stopping_monitor, user)
        if has_val and run.early_stopping_patience is not None:
            callbacks.append(EarlyStopping(monitor=run.early_stopping_monitor,
                                           mode=run.early_stopping_mode,
                                           patience=run.early_stopping_patience))
        kwargs["callbacks"] = user + callbacks
        trainer = super().instantiate_trainer(**kwargs)
        self.batch_plan = self._plan_batch(trainer)
        trainer.accumulate_grad_batches = self.batch_plan.accumulate_grad_batches
        trainer.callbacks.append(BatchPlanCallback(self.batch_plan))
        return trainer

    def _plan_batch(self, trainer: Any) -> BatchPlan:
        """``data.global_batch_size`` -> accumulation for this trainer's world size (fit only;
        validate/test record the batch they run with). Raises when it does not divide."""
        dm = self.datamodule
        global_batch = getattr(dm, "global_batch_size", None)
        if self.subcommand not in (None, "fit"):
            global_batch = None
        return plan_batch(world_size=int(trainer.world_size),
                          per_device_batch_size=int(dm.batch_size),
                          global_batch_size=global_batch,
                          accumulate_grad_batches=int(trainer.accumulate_grad_batches))

    def _loggers(self, run: RunSettings, run_dir: Path, resuming: bool) -> list[Any]:
        loggers: list[Any] = [RotatingCSVLogger(run_dir, resuming)]
        if not run.wandb:
            return loggers
        try:
            import wandb  # noqa: F401  (never required: a missing wandb only warns)

            from attanchor.train.logging_faults import FailSafeWandbLogger, redact
        except ImportError:
            rank_zero_warn("wandb is not installed: logging to metrics.csv only "
                           "(pip install wandb, or set run.wandb: false to silence this)")
            return loggers
        # Offline unless the user's environment says otherwise; sync later with `wandb sync`.
        os.environ.setdefault("WANDB_MODE", "offline")
        strategy = self.model.anchor_config.strategy
        try:  # W&B failing to start or to write never stops training (logging_faults)
            loggers.append(FailSafeWandbLogger(
                save_dir=str(run_dir), project=run.wandb_project, group=run.name,
                name=run_dir.name, tags=[strategy, run.name], job_type=strategy,
                csv_path=str(run_dir / "metrics.csv")))
        except Exception as e:  # noqa: BLE001  (a bad W&B setting: CSV only, said once)
            rank_zero_warn(f"W&B logging failed (setup: {redact(f'{type(e).__name__}: {e}')}); "
                           f"training continues and logs to {run_dir / 'metrics.csv'} only")
        return loggers

    def _write_run_info(self) -> None:
        if self.trainer.global_rank != 0:
            return
        from attanchor.train.runinfo import write_run_info

        dump = self.parser.dump(self.config, skip_none=False, format="yaml")
        import yaml

        resolved = yaml.safe_load(dump)
        if self.subcommand:
            resolved = resolved[self.subcommand]
        files = sorted({f for f in self.datamodule.files.values() if f})
        write_run_info(self.run_dir(), resolved, files, batch=getattr(self, "batch_plan", None))
        rank_zero_info(f"attanchor: run directory {self.run_dir()}")

    def before_fit(self) -> None:
        self._write_run_info()

    def before_validate(self) -> None:
        self._write_run_info()

    def before_test(self) -> None:
        self._write_run_info()


def check_monitor(monitor: str, callbacks: list[Any]) -> None:
    """Fail before any model loads when the early-stopping monitor names a metric nothing
    logs: ``val/loss`` (the module's) or a key in some callback's ``logged_keys``."""
    logged = {"val/loss"}.union(*(getattr(c, "logged_keys", ()) for c in callbacks))
    if monitor not in logged:
        raise ValueError(
            f"run.early_stopping_monitor={monitor!r} is logged by nothing in this run (logged: "
            f"{sorted(logged)}); add the callback that logs it to trainer.callbacks (e.g. "
            "attanchor.eval.val_generation.ValGenerationCallback with pope / vqa files for "
            "val/pope_acc / val/vqa_acc) or monitor val/loss")


def build_cli(argv: list[str], run: bool = True) -> AttanchorCLI:
    """Build (and by default run) the CLI on ``argv`` (recipes resolved first)."""
    return AttanchorCLI(
        AnchorModule, VLMDataModule, args=expand_config_args(argv), run=run,
        save_config_callback=None, seed_everything_default=0,
        trainer_defaults={"deterministic": "warn"},
        parser_kwargs={"default_env": False},
    )


def validate_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Parse a recipe (plus overrides) and build its model and data module without loading
    weights or data; return the instantiated config. Unknown keys and invalid values raise
    (jsonargparse exits with a message naming the key; the anchor config a ValueError)."""
    try:
        AttanchorCLI(AnchorModule, VLMDataModule, args=expand_config_args(
            ["--config", path, *overrides]), run=False, parse_only=True,
            save_config_callback=None, seed_everything_default=0,
            parser_kwargs={"default_env": False, "exit_on_error": False})
    except _Parsed as parsed:
        return parsed.config
    raise AssertionError("unreachable: parse_only always raises _Parsed")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    build_cli(argv)
    return 0
