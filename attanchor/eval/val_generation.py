"""Evaluation during training: generation-based POPE / VQA accuracy at every validation.

``ValGenerationCallback`` answers the first ``limit`` questions of a POPE file and/or a VQA
file with the model being trained (greedy, through ``AnchoredVLM.generate``, so anchored arms
are evaluated anchored), scores them with ``attanchor.eval.evaluate``'s own ``score`` and logs
``val/pope_acc``, ``val/pope_f1`` and ``val/vqa_acc`` beside ``val/loss``, where metrics.csv,
W&B, ``EarlyStopping`` and ``ModelCheckpoint`` see them. It is a Lightning callback given
in the recipe (it lives in ``eval`` because it evaluates; ``train`` never imports ``eval``)::

    trainer:
      callbacks:
        - class_path: attanchor.eval.val_generation.ValGenerationCallback
          init_args: {pope: data/easy-vqa/pope.jsonl, vqa: data/easy-vqa/vqa_test.json,
                      limit: 64}
    run:
      early_stopping_monitor: val/pope_acc   # any key in the callback's ``logged_keys``
      early_stopping_mode: max

Ranks: the subset is cut into the batches one process would make (``batches``); batch ``k``
goes to rank ``k % world`` and the answers are gathered back in batch order, so every rank
scores the same predictions as a single-process ``evaluate(..., limit=limit,
batch_size=batch_size)`` and logs the same value. Under sharded parameters (DeepSpeed ZeRO-3,
FSDP) every generate call is collective, so a rank with fewer batches re-runs its first one
and drops the answers (``lockstep``): every rank makes the same number of calls, and HF's
``synced_gpus`` (on by itself for those strategies) keeps the decoding steps in step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

# The evaluator's readers, generator and scorer, so the values are exactly `attanchor eval`'s.
from attanchor.eval.evaluate import Item, batches, generate_answers, read_pope, read_vqa, score
from attanchor.eval.ranks import gather_in_order

# Logged key -> (task, metric in `score`'s result).
KEYS = {"val/pope_acc": ("pope", "accuracy"), "val/pope_f1": ("pope", "f1"),
        "val/vqa_acc": ("vqa", "accuracy")}


@dataclass(frozen=True)
class ValGenerationSettings:
    """Which questions each validation answers (``ValGenerationCallback`` in a recipe).

    ``pope``: a POPE JSONL; ``vqa``: a VQA file in ``format`` (at least one of the two).
    ``limit``: the first ``limit`` questions of each (None: all). ``image_root``: None takes
    ``data.image_root``. ``batch_size`` / ``max_new_tokens`` as in ``attanchor eval``.
    """

    pope: str | None = None
    vqa: str | None = None
    limit: int | None = 64
    image_root: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 8
    format: str = "llava"

    def __post_init__(self) -> None:
        if self.pope is None and self.vqa is None:
            raise ValueError("ValGenerationCallback: set pope and/or vqa (a POPE JSONL / a VQA "
                             "file), or leave ValGenerationCallback out")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"ValGenerationCallback.limit={self.limit!r}: an int >= 1 or null")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("ValGenerationCallback: batch_size and max_new_tokens must be >= 1")


def answer_subset(anchored: Any, renderer: Any, items: Sequence[Item], *, batch_size: int,
                  max_new_tokens: int, rank: int = 0, world: int = 1,
                  lockstep: bool = False) -> list[dict[str, Any]]:
    """``generate_answers`` over ``items`` split by batch across ranks; every rank returns all
    answers in the items' order (module doc: which rank answers which batch, ``lockstep``).

    Every rank must call it with the same items, batch size and world (one collective gather).
    """
    chunks = list(batches(items, batch_size))  # exactly a single process's batches
    rounds = math.ceil(len(chunks) / world) if chunks else 0
    local: list[tuple[int, list[dict[str, Any]]]] = []
    for r in range(rounds):
        k = rank + r * world
        if k < len(chunks):
            local.append((k, generate_answers(anchored, renderer, chunks[k],
                                              batch_size=batch_size,
                                              max_new_tokens=max_new_tokens, progress=False)))
        elif lockstep:  # same number of collective forwards as the busiest rank
            generate_answers(anchored, renderer, chunks[0], batch_size=batch_size,
                             max_new_tokens=max_new_tokens, progress=False)
    parts = gather_in_order(local, world)
    return [p for _, preds in sorted(parts, key=lambda kp: kp[0]) for p in preds]


def _params_sharded(strategy: Any) -> bool:
    """True when a forward is collective: DeepSpeed ZeRO-3 or FSDP (parameters gathered)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return bool(getattr(strategy, "zero_stage_3", False)) or isinstance(strategy, FSDPStrategy)


class ValGenerationCallback(Callback):
    """Log generation accuracy on a fixed subset at the end of every validation (not during
    the sanity check). ``last_metrics`` / ``last_predictions`` hold the last validation's
    ``score`` results and answers per task, for tests and inspection."""

    def __init__(self, pope: str | None = None, vqa: str | None = None, limit: int | None = 64,
                 image_root: str | None = None, batch_size: int = 16, max_new_tokens: int = 8,
                 format: str = "llava") -> None:
        self.settings = ValGenerationSettings(pope, vqa, limit, image_root, batch_size,
                                              max_new_tokens, format)
        # The keys this callback logs: `attanchor fit` accepts them as early-stopping monitors.
        self.logged_keys = tuple(k for k, (task, _) in KEYS.items()
                                 if getattr(self.settings, task) is not None)
        self.items: dict[str, list[Item]] = {}
        self.last_metrics: dict[str, dict[str, Any]] = {}
        self.last_predictions: dict[str, list[dict[str, Any]]] = {}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        s = self.settings
        dm = trainer.datamodule
        files = getattr(dm, "files", {}) or {}
        if stage == "fit" and not (files.get("val") or getattr(dm, "val_fraction", None)):
            raise ValueError("ValGenerationCallback runs at each validation, but this run has "
                             "none: set data.val_file (or data.val_fraction)")
        for task, path in (("pope", s.pope), ("vqa", s.vqa)):
            if path is None:
                continue
            if not Path(path).is_file():
                raise FileNotFoundError(f"ValGenerationCallback.{task}={path!r} does not exist")
            items = read_pope(path) if task == "pope" else read_vqa(path, s.format)
            self.items[task] = items[:s.limit] if s.limit else items

    def _renderer(self, trainer: Any, pl_module: Any) -> Any:
        from attanchor.data.render import Renderer

        dm = trainer.datamodule
        root = self.settings.image_root or getattr(dm, "image_root", None)
        if root is None:
            raise ValueError("ValGenerationCallback: no image root: set ValGenerationCallback."
                             "image_root or data.image_root")
        # The training render settings, so prompts and candidate masks match training's.
        return Renderer(dm.processor, template=getattr(dm, "template", None),
                        scope=getattr(dm, "scope", None) or pl_module.anchor_config.scope,
                        image_root=root)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not self.items:
            return
        renderer = self._renderer(trainer, pl_module)
        lockstep = _params_sharded(trainer.strategy)
        for task, items in self.items.items():
            preds = answer_subset(pl_module.anchored, renderer, items,
                                  batch_size=self.settings.batch_size,
                                  max_new_tokens=self.settings.max_new_tokens,
                                  rank=trainer.global_rank, world=trainer.world_size,
                                  lockstep=lockstep)
            self.last_predictions[task] = preds
            self.last_metrics[task] = score(task, items, preds)
        for key, (task, metric) in KEYS.items():
            if task in self.last_metrics:
                # float64: metrics.csv then holds evaluate()'s value exactly. Every rank holds
                # the same value; "max" over ranks is exact and every rank joins the reduction.
                value = torch.tensor(float(self.last_metrics[task][metric]),
                                     dtype=torch.float64)
                pl_module.log(key, value, sync_dist=True, reduce_fx="max",
                              batch_size=len(self.items[task]))
