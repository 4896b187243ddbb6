"""The benchmark suite: every benchmark in one run, each printing its table and writing JSON.

    python -m bench [--smoke] [--out bench-results] [--only regroup generation ...]

Runs, in this order, each module's ``main(argv) -> dict`` with ``--out DIR/<name>.json``
(and ``--smoke``: tiny shapes for CI, seconds each):

    train_step  anchored / baseline training tokens/s, demo recipe (tiny LLaVA, easy-vqa)
    generation  anchored greedy generation vs the plain path (tiny, TinyLLaVA-sized 1 layer)
    regroup     regroup / its floor at three shapes; peak memory at M = 2880 by chunk size
    data        data pipeline per worker vs a training step; 640x480 JPEGs at 336 px vs an
                (estimated) TinyLLaVA GPU step
    packing     padding fraction and packed vs padded tokens/s (bench/packing.py, if present)

Every figure is a ratio measured side by side in this run (no stored absolute times). Then
``DIR/summary.json``: per benchmark its ``ratios`` (name -> float; for a module without a
``ratios`` key, its numeric leaves named ``*ratio*`` or ``vs_*``) and ``targets`` (name ->
met), with the machine. Example::

    {"machine": {...}, "benchmarks": {"regroup": {"ratios": {"tinyllava/dynamic/fwd": 1.3},
     "targets": {"tinyllava/dynamic <= 1.5x floor": true}, "seconds": 41.2}, ...}}
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
# The modules also run as files (python bench/regroup.py) and import their helpers as
# top-level modules (``timing``, ``gpu_smoke``): put bench/ on the path for them.
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

SUITE = ("train_step", "generation", "regroup", "data", "packing")
OPTIONAL = ("packing",)  # provided by another module owner; skipped when absent


def numeric_ratios(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves whose key contains "ratio" or starts with "vs_", by dotted path."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, int | float) and not isinstance(v, bool) and (
                    "ratio" in str(k) or str(k).startswith("vs_")):
                out[path] = float(v)
            else:
                out.update(numeric_ratios(v, path))
    return out


def run_one(name: str, smoke: bool, out_dir: Path) -> dict[str, Any]:
    module = importlib.import_module(name)
    argv = (["--smoke"] if smoke else []) + ["--out", str(out_dir / f"{name}.json")]
    print(f"\n=== {name}: python bench/{name}.py {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    result = module.main(argv)
    seconds = time.perf_counter() - t0
    ratios = result.get("ratios") if isinstance(result.get("ratios"), dict) else None
    return {"ratios": ratios if ratios is not None else numeric_ratios(result),
            "targets": result.get("targets", {}), "seconds": seconds,
            "json": str(out_dir / f"{name}.json")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CI): no figure means much")
    ap.add_argument("--out", default="bench-results", help="directory of the JSON files")
    ap.add_argument("--only", nargs="+", choices=SUITE, default=None)
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "smoke": args.smoke,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg")
                    else None},
        "benchmarks": {}, "skipped": {},
    }
    t0 = time.perf_counter()
    for name in args.only or SUITE:
        if name in OPTIONAL and not (BENCH_DIR / f"{name}.py").exists():
            summary["skipped"][name] = f"bench/{name}.py is not there"
            continue
        summary["benchmarks"][name] = run_one(name, args.smoke, out_dir)
    summary["seconds"] = time.perf_counter() - t0
    import torch  # after the modules: they set their own thread counts

    summary["machine"]["torch"] = torch.__version__
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\n=== summary ({'smoke: tiny shapes, ' if args.smoke else ''}"
          f"{summary['seconds']:.0f} s, load average {summary['machine']['load_average_1min']})")
    print(f"{'benchmark':<11} {'figure':<58} {'value':>9}")
    for name, b in summary["benchmarks"].items():
        for k, v in b["ratios"].items():
            print(f"{name:<11} {k[:58]:<58} {v:>9.3f}")
        for k, met in b["targets"].items():
            print(f"{name:<11} {('target ' + k)[:58]:<58} {'met' if met else 'NOT met':>9}")
    for name, why in summary["skipped"].items():
        print(f"{name:<11} skipped: {why}")
    bad = {f"{n}/{k}": v for n, b in summary["benchmarks"].items() for k, v in b["ratios"].items()
           if not (math.isfinite(v) and v > 0)}
    if bad:
        raise SystemExit(f"ratios that are not positive finite numbers: {bad}")
    print(f"wrote {out_dir}/summary.json and one JSON per benchmark")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
