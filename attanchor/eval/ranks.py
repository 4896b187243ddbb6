"""Evaluation under several processes: split the items, gather the answers, one writer.

Evaluation is distributed when ``torch.distributed`` is initialised (e.g. by Lightning after a
DDP/DeepSpeed fit inside ``attanchor compare``) or when ``WORLD_SIZE > 1`` (torchrun); then
``eval_world`` initialises the default group itself from torchrun's environment (NCCL bound to
``cuda:LOCAL_RANK`` where CUDA is available, so a later fit in the same process gets the group
it would have made; gloo on CPUs). Otherwise it is one process and nothing here communicates.

Invariants: rank r evaluates the contiguous shard ``shard_bounds(n, r, world)`` (the shards
cover ``range(n)`` exactly once, in order); ``gather_in_order`` returns every rank the
concatenation of the shards in rank order, i.e. the single-process order; only rank zero
writes files (``is_writer``), and ``barrier`` makes the files visible to every rank before any
goes on. With ``n / world`` a multiple of the batch size every rank's batches are exactly the
single-process batches, so predictions are identical, not merely equivalent.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def eval_world() -> tuple[int, int]:
    """(rank, world size) of this evaluation; (0, 1) for a single process.

    Uses the initialised default process group; else, with ``WORLD_SIZE > 1`` in the
    environment (torchrun), initialises a gloo group from torchrun's variables (``env://``).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set: launch with "
                           "torchrun (or ./launch.sh), or unset WORLD_SIZE for one process")
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available():
        # NCCL gathers objects through the current device: make it this process's GPU.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend, init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def current_world() -> tuple[int, int]:
    """(rank, world size) of an initialised default group, else (0, 1); initialises nothing
    (compare must not create the group before Lightning's fit does)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous shard of n items: the first ``n % world`` ranks get
    one item more. Example: n=5, world=2 -> rank 0 (0, 3), rank 1 (3, 5)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank}, world={world}: need 0 <= rank < world")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_in_order(local: Sequence[T], world: int) -> list[T]:
    """Every rank's shard, concatenated in rank order, on every rank (picklable items)."""
    if world == 1:
        return list(local)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, list(local))
    return [x for part in parts for x in part]


def broadcast_from_zero(value: T, world: int) -> T:
    """Rank zero's ``value`` on every rank (so all ranks take the same branch)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_writer(rank: int) -> bool:
    """Only rank zero writes predictions, metrics and reports."""
    return rank == 0


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
