"""``ResumableSampler``: a rank-aware training order that a checkpoint can stop and resume.

The order of epoch ``e`` is one function, ``order(e) -> list[int]`` (a permutation of the
dataset's positions): by default the same ``torch.randperm`` a ``DistributedSampler`` seeded with
``seed`` draws (generator seeded with ``seed + e``), so a run that used the ``DistributedSampler``
sees the same batches; ``order_fn`` replaces it (length-grouped batches,
``attanchor.data.grouping``). The order is padded (repeating its head) or, with ``drop_last``,
cut to a multiple of ``num_replicas``, and rank ``r`` takes positions ``r, r + W, r + 2W, ...``.

Resuming: ``state_dict()`` holds ``{"epoch", "consumed", ...}`` where ``consumed`` is the number
of the epoch's (padded) positions that all ranks together have trained on, a multiple of ``W``.
After ``load_state_dict`` the first iteration of that epoch skips them: the ranks resume where
they stopped, and a resume with another ``num_replicas`` still trains each remaining position
exactly once. Invariant: ``len(sampler)`` is always the epoch's full per-rank count, never the
remainder, because Lightning restores its own batch counter from the checkpoint and ends the
epoch when that counter reaches ``len(loader)`` (counting the skipped batches once, not twice).

The sampler cannot count what was consumed itself (the loader and its workers prefetch ahead of
training); its owner sets ``consumed`` from the trainer's progress before a checkpoint
(``VLMDataModule.state_dict``).

Example (10 samples, 2 ranks, seed 0): ``order(0)`` is ``torch.randperm(10)`` under seed 0,
``[4, 1, 7, 5, 3, 9, 0, 8, 6, 2]``; rank 0 yields ``[4, 7, 3, 0, 6]``, rank 1
``[1, 5, 9, 8, 2]``. With ``{"epoch": 0, "consumed": 4}`` loaded, rank 0 yields ``[3, 0, 6]``
and rank 1 ``[9, 8, 2]``; ``len()`` stays 5 on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler

OrderFn = Callable[[int], list[int]]


class ResumableSampler(DistributedSampler):
    """Deterministic per ``(seed, epoch)``, rank-aware, resumable mid-epoch (module docstring).

    A ``DistributedSampler`` subclass so that Lightning, which wraps any other sampler of a
    multi-process run in its own ``DistributedSamplerWrapper`` (splitting the ranks' shares a
    second time), uses it as it is.

    Args:
        num_samples: dataset size N.
        num_replicas, rank: the data-parallel world (W) and this process's place in it.
        seed: the order's seed (the data module's ``seed``).
        shuffle: False keeps ``0..N-1`` (``order_fn`` ignores it).
        drop_last: cut the order to a multiple of W instead of padding it.
        order_fn: ``epoch -> permutation of range(N)``; replaces the shuffled order.
    """

    def __init__(self, num_samples: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 order_fn: OrderFn | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: the sampler needs at least 1 sample")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank}, num_replicas={num_replicas}: need 0 <= rank < "
                             "num_replicas")
        if drop_last and num_samples < num_replicas:
            raise ValueError(f"drop_last with {num_samples} samples on {num_replicas} ranks "
                             "leaves every rank empty")
        # Explicit replicas and rank: no process group is consulted.
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank,
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.n, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.shuffle, self.drop_last, self.order_fn = seed, shuffle, drop_last, order_fn
        self.epoch = 0
        self.consumed = 0  # positions of self.epoch trained on by all ranks (set by the owner)
        self._skip: tuple[int, int] | None = None  # (epoch, positions) to skip once, on resume

    # -- the order -----------------------------------------------------------------------------
    def order(self, epoch: int) -> list[int]:
        """The epoch's permutation of ``range(N)`` (before padding and the rank split)."""
        if self.order_fn is not None:
            out = [int(i) for i in self.order_fn(epoch)]
            if sorted(out) != list(range(self.n)):
                raise ValueError(f"order_fn(epoch={epoch}) returned {len(out)} positions that "
                                 f"are not a permutation of range({self.n})")
            return out
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)  # DistributedSampler's draw: the same batches as before
        return torch.randperm(self.n, generator=g).tolist()

    def _total(self) -> int:
        """Positions over all ranks in one epoch (a multiple of W)."""
        w = self.num_replicas
        return (self.n // w) * w if self.drop_last else -(-self.n // w) * w

    def padded_order(self, epoch: int) -> list[int]:
        """``order(epoch)`` padded by repeating its head, or cut, to ``_total()`` positions."""
        out, total = self.order(epoch), self._total()
        while len(out) < total:
            out += out[: total - len(out)]
        return out[:total]

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; a new epoch starts with nothing consumed."""
        if epoch != self.epoch:
            self.consumed = 0
        self.epoch = epoch

    def __len__(self) -> int:
        # Always the full count (module docstring: Lightning counts the skipped batches).
        return self._total() // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
        self._skip = None  # applies to one iteration only: the resumed epoch's
        order = self.padded_order(self.epoch)
        return iter(order[start + self.rank::self.num_replicas])

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "consumed", "num_samples", "seed", "num_replicas"}``; ``consumed`` as last
        set by the owner (global positions, a multiple of ``num_replicas``)."""
        return {"epoch": self.epoch, "consumed": int(self.consumed), "num_samples": self.n,
                "seed": self.seed, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration of ``state["epoch"]`` skips ``state["consumed"]`` positions.

        Raises when the checkpoint's dataset size or seed differ (another data file or seed:
        the stored position would point into another order)."""
        for key, mine in (("num_samples", self.n), ("seed", self.seed)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"sampler state from the checkpoint has {key}={state[key]}, this run "
                    f"{mine}: the resumed run reads other data or another seed; pass the "
                    "checkpoint's data and seed, or start a new run")
        consumed = int(state.get("consumed", 0))
        if not 0 <= consumed <= self._total():
            raise ValueError(f"sampler state: consumed={consumed} outside 0..{self._total()}")
        # Round down to this world's multiple: with another world size some positions are
        # seen twice rather than never.
        consumed -= consumed % self.num_replicas
        self.epoch, self.consumed = int(state.get("epoch", 0)), consumed
        self._skip = (self.epoch, consumed)


def grouped_order_fn(dataset: Any, step_batch: int, seed: int) -> OrderFn:
    """``epoch -> order`` of length-grouped batches (``attanchor.data.grouping``) for
    ``dataset``; groups are of ``step_batch`` (the step's batch over all ranks), which the
    sampler deals out to the ranks in turn. Raises NotImplementedError naming the fix when the
    grouping module is not installed."""
    try:
        from attanchor.data import grouping
    except ImportError:
        raise NotImplementedError(
            "data.group_by_length needs attanchor.data.grouping (length-grouped batches, "
            "issue 12), which this installation lacks: set data.group_by_length false"
        ) from None
    lengths, multimodal = grouping.modality_lengths(dataset)

    def order(epoch: int) -> list[int]:
        return grouping.length_grouped_indices(lengths, multimodal, step_batch, seed, epoch)

    return order


def consumed_in_epoch(trainer: Any, sampler: ResumableSampler, batch_size: int) -> int:
    """Positions of the current epoch all ranks have trained on, from Lightning's progress:
    the batches it counts as processed in this epoch (the one finishing when a checkpoint is
    written in ``on_train_batch_end`` included; Lightning counts that one completed on
    restore) times the per-rank ``batch_size``, capped at the rank's share, times the ranks.
    Outside fit: the sampler's own ``consumed``."""
    if trainer is None or trainer.state.fn != "fit":
        return sampler.consumed
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return min(batches * batch_size, len(sampler)) * sampler.num_replicas
