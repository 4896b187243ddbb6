"""Timing shared by the benchmark scripts: a device sync and the median of synced runs.

The scripts run as files (``python bench/regroup.py``) or from ``python -m bench`` (which puts
bench/ on the path), so they import this as ``timing``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA launches are asynchronous); no-op on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call (kernels,
    allocator, caches), each call between two device syncs."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest process CPU seconds of each ``fn`` over ``repeats`` rounds, the arms
    interleaved (round r runs every arm once) after one warm-up round.

    For ratios on a shared CPU: process time does not count the time other jobs hold the
    cores, and the minimum drops the rounds a neighbour's cache traffic slowed down. Run
    with ``torch.set_num_threads(1)`` (several threads add their spin-waits to process
    time). On CUDA use ``timed`` (process time does not see the device).
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t0)
    return best


def write_json(path: str | None, result: dict) -> None:
    """Write ``result`` as JSON to ``path`` (parents created; nothing when None)."""
    if path is None:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2, default=str) + "\n")
