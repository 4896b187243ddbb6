"""Numerical faults in training: what to do when a batch's loss is NaN or infinite.

The loss is checked in ``AnchorModule.training_step``, after the forward pass and before any
backward pass or optimizer step, so the weights (and so every checkpoint) still hold the last
good step's values when the fault is seen. Two policies (``model.numerics`` in a recipe):

- ``on_nonfinite_loss: stop`` (default): raise ``NonFiniteLossError`` naming the global step,
  the epoch and batch, the batch's record ids and the last checkpoint written (which is good:
  nothing past it was trained on a NaN).
- ``on_nonfinite_loss: skip``: drop the batch (``training_step`` returns None: Lightning runs
  no backward and no optimizer update), count it (``train/nonfinite_skips``) and warn naming it;
  past ``max_nonfinite_skips`` skipped batches, stop as above (a run that keeps producing NaNs
  has a real problem: learning rate, precision, data).

Example::

    >>> s = NumericsSettings(on_nonfinite_loss="skip", max_nonfinite_skips=1)
    >>> decide(s, nonfinite=False, skipped_before=0)
    'train'
    >>> decide(s, nonfinite=True, skipped_before=0)
    'skip'
    >>> decide(s, nonfinite=True, skipped_before=1)
    'stop'
    >>> loss_kind(torch.tensor(float("-inf")))
    '-inf'

Under several processes the decision is taken on "any rank saw a non-finite loss" (the caller
reduces it), so every rank skips or stops together and none waits in a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

POLICIES = ("stop", "skip")


@dataclass(frozen=True)
class NumericsSettings:
    """What a NaN / inf training loss does: ``stop`` the run (default) or ``skip`` the batch,
    at most ``max_nonfinite_skips`` times per process run (the count restarts on resume)."""

    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 10

    def __post_init__(self) -> None:
        if self.on_nonfinite_loss not in POLICIES:
            raise ValueError(f"on_nonfinite_loss={self.on_nonfinite_loss!r}: allowed are "
                             f"{POLICIES}")
        n = self.max_nonfinite_skips
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"max_nonfinite_skips={n!r}: must be an int >= 0 (batches with a "
                             "NaN/inf loss skipped before the run stops)")


class NonFiniteLossError(RuntimeError):
    """A NaN or inf training loss: the run stopped before any update from that batch."""


def loss_kind(loss: torch.Tensor) -> str | None:
    """``"nan"``, ``"inf"`` or ``"-inf"`` for a non-finite scalar loss, None when finite.
    Reading it synchronises with the device once (one scalar)."""
    value = float(loss.detach())
    if value != value:  # NaN is the only value unequal to itself
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return None


def decide(settings: NumericsSettings, *, nonfinite: bool,
           skipped_before: int) -> Literal["train", "skip", "stop"]:
    """The action for one batch: ``train`` (finite loss), ``skip`` (non-finite, policy skip,
    under the maximum) or ``stop``. Invariant: never ``skip`` more than
    ``max_nonfinite_skips`` batches."""
    if not nonfinite:
        return "train"
    if settings.on_nonfinite_loss == "skip" and skipped_before < settings.max_nonfinite_skips:
        return "skip"
    return "stop"


def describe_batch(kind: str | None, *, global_step: int, epoch: int, batch_idx: int,
                   ids: Sequence[str]) -> str:
    """One line naming the faulty batch, e.g. ``"loss nan at global step 3 (epoch 0, batch 3),
    record ids ['q1', 'q7']"``; ``kind`` None means another process saw the fault."""
    what = f"loss {kind}" if kind else "a non-finite loss on another process"
    return (f"{what} at global step {global_step} (epoch {epoch}, batch {batch_idx}), record "
            f"ids {list(ids)}")


def stop_message(where: str, *, settings: NumericsSettings, skipped: int,
                 last_checkpoint: str | None) -> str:
    """The ``NonFiniteLossError`` text: the batch, why the run stops, what is kept, the fix."""
    why = (f"after {skipped} skipped batch(es), the maximum (model.numerics."
           f"max_nonfinite_skips={settings.max_nonfinite_skips})"
           if settings.on_nonfinite_loss == "skip" else "model.numerics.on_nonfinite_loss=stop")
    kept = (f"the last checkpoint, {last_checkpoint}, holds weights from before this batch "
            "(resume from it with --ckpt_path last)" if last_checkpoint else
            "no checkpoint was written before it")
    return (f"training stopped: {where} ({why}); no update was made from this batch and {kept}. "
            "Check those records, the learning rate and the precision, or set "
            "model.numerics.on_nonfinite_loss=skip to skip such batches")
