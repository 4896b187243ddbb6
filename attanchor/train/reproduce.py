"""`attanchor reproduce RUN_DIR`: re-run a finished run from its resolved config and compare.

A run directory holds ``config.yaml`` (every key resolved) and ``env.json`` (package versions,
data hashes, the working directory). Reproducing it means: train again from ``config.yaml``
alone into a new directory, then compare the two runs::

    attanchor reproduce runs/demo/text_into_image-seed0
    # -> reproductions/demo/text_into_image-seed0/ and its reproduce.json
    attanchor reproduce runs/demo/none-seed0 --against other/demo/none-seed0   # compare only

What is compared, and what counts as a match:

- **metrics**: every (step, key) of ``metrics.csv`` (resume parts included), except wall-clock
  rates (``*_per_s``). Bit-identical (``rtol = atol = 0``) when both runs ran on a CPU; on a
  GPU the default tolerance is ``rtol = 1e-3`` (bf16 kernels and atomics are not bitwise
  deterministic across launches). A key or step present in one run only is a mismatch.
- **weights**: the tensors of ``checkpoints/last.ckpt`` (LoRA: the trainable ones), with the
  same tolerance.
- **versions**: every installed package whose version differs between the two ``env.json``
  files is named, as are a different Python, another git commit of the code and a changed
  data file (by SHA-256); a dirty work tree is noted. These explain a mismatch; they
  are reported as differences, and they make the verdict a mismatch too: a "match" means the
  same numbers from the same environment.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from attanchor.train.logging_faults import finish_wandb
from attanchor.train.runinfo import run_dir_for

GPU_RTOL = 1e-3
VOLATILE_SUFFIXES = ("_per_s",)  # wall-clock rates differ between any two runs


def metrics_table(run_dir: Path) -> dict[tuple[int, str], str]:
    """{(step, key): value as written} from ``metrics.part*.csv`` then ``metrics.csv``.

    A (step, key) logged twice keeps its latest value (a resumed run re-logs from its
    checkpoint), as ``attanchor.eval.compare.loss_curve`` reads the curve.
    """
    parts = sorted(run_dir.glob("metrics.part*.csv"),
                   key=lambda p: int(p.stem.removeprefix("metrics.part")))
    table: dict[tuple[int, str], str] = {}
    for path in [*parts, run_dir / "metrics.csv"]:
        if not path.exists():
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = int(float(row["step"]))
                for key, value in row.items():
                    if key == "step" or value in ("", None) or key.endswith(VOLATILE_SUFFIXES):
                        continue
                    table[(step, key)] = value
    if not table:
        raise FileNotFoundError(f"{run_dir}: no metrics.csv with values; is it a run directory?")
    return table


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b if rtol == atol == 0 else abs(a - b) <= atol + rtol * abs(b)


def compare_metrics(original: Mapping[tuple[int, str], str], new: Mapping[tuple[int, str], str],
                    rtol: float = 0.0, atol: float = 0.0) -> list[dict[str, Any]]:
    """Every (step, key) whose value differs beyond tolerance or exists in one run only."""
    diffs = []
    for step, key in sorted(set(original) | set(new)):
        a, b = original.get((step, key)), new.get((step, key))
        if a is None or b is None or not _close(float(b), float(a), rtol, atol):
            diffs.append({"step": step, "key": key, "original": a, "reproduced": b})
    return diffs


def compare_weights(original: Path, new: Path, rtol: float = 0.0, atol: float = 0.0
                    ) -> list[dict[str, Any]] | None:
    """Tensors of two ``last.ckpt`` files that differ; None when either is not a file."""
    import torch

    if not (original.is_file() and new.is_file()):
        return None  # a ZeRO checkpoint directory, or no checkpoint: metrics still compare
    a = torch.load(original, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(new, map_location="cpu", weights_only=True)["state_dict"]
    diffs = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            diffs.append({"tensor": name, "problem": "in one checkpoint only"})
        elif a[name].shape != b[name].shape:
            diffs.append({"tensor": name, "problem": f"shape {tuple(a[name].shape)} vs "
                          f"{tuple(b[name].shape)}"})
        elif not (torch.equal(a[name], b[name]) if rtol == atol == 0 else
                  torch.allclose(b[name].float(), a[name].float(), rtol=rtol, atol=atol)):
            err = (a[name].float() - b[name].float()).abs().max().item()
            diffs.append({"tensor": name, "problem": f"max abs difference {err:.3g}"})
    return diffs


def compare_env(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Differences that can explain a mismatch: packages, Python, data files."""
    diffs = []
    old, new = recorded.get("packages", {}), current.get("packages", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            diffs.append({"what": "package", "name": name, "original": old.get(name),
                          "now": new.get(name)})
    if recorded.get("python") != current.get("python"):
        diffs.append({"what": "python", "name": "python", "original": recorded.get("python"),
                      "now": current.get("python")})
    old_git, new_git = recorded.get("git") or {}, current.get("git") or {}
    if old_git.get("commit") != new_git.get("commit"):
        diffs.append({"what": "code", "name": "git commit", "original": old_git.get("commit"),
                      "now": new_git.get("commit")})
    old_data, new_data = recorded.get("data_files", {}), current.get("data_files", {})
    for path in sorted(set(old_data) | set(new_data)):
        a, b = old_data.get(path, {}).get("sha256"), new_data.get(path, {}).get("sha256")
        if a != b:
            diffs.append({"what": "data", "name": path, "original": a, "now": b or "missing"})
    return diffs


def _on_gpu(env: Mapping[str, Any]) -> bool:
    return bool(env.get("torch", {}).get("devices"))


def compare_runs(original: Path, new: Path, *, rtol: float | None = None, atol: float = 0.0
                 ) -> dict[str, Any]:
    """The verdict for two run directories (``new`` re-ran ``original``'s config).

    ``rtol`` None: 0 when neither run saw a GPU, else ``GPU_RTOL``. Versions and data hashes
    compare the two ``env.json`` files (a re-run records the environment it ran in).
    """
    recorded = json.loads((original / "env.json").read_text())
    current = json.loads((new / "env.json").read_text())
    if rtol is None:
        rtol = GPU_RTOL if (_on_gpu(recorded) or _on_gpu(current)) else 0.0
    metrics = compare_metrics(metrics_table(original), metrics_table(new), rtol, atol)
    weights = compare_weights(original / "checkpoints" / "last.ckpt",
                              new / "checkpoints" / "last.ckpt", rtol, atol)
    env = compare_env(recorded, current)
    notes = [f"the {which} run's work tree had uncommitted changes: its code may differ from "
             "its commit" for which, e in (("original", recorded), ("reproduced", current))
             if (e.get("git") or {}).get("dirty")]
    return {"original": str(original), "reproduced": str(new), "rtol": rtol, "atol": atol,
            "match": not metrics and not weights and not env,
            "metrics_compared": len(metrics_table(original)), "metric_diffs": metrics,
            "weight_diffs": weights, "env_diffs": env, "notes": notes}


@contextlib.contextmanager
def _working_dir(path: str | None) -> Iterator[None]:
    """Run where the original ran (its config's relative data paths resolve there)."""
    before = os.getcwd()
    if path and Path(path).is_dir():
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def rerun(original: Path, out_root: Path) -> Path:
    """Train again from ``original/config.yaml`` with ``run.root = out_root``; the new dir."""
    from attanchor.train.cli import build_cli

    config = yaml.safe_load((original / "config.yaml").read_text())
    env = json.loads((original / "env.json").read_text())
    config["run"]["root"] = str(out_root.resolve())
    config["ckpt_path"] = None  # a reproduction trains from the start
    new = run_dir_for(config["run"]["root"], config["run"]["name"],
                      config["model"]["anchor"]["strategy"], config["seed_everything"])
    with tempfile.TemporaryDirectory() as tmp, _working_dir(env.get("cwd")):
        recipe = Path(tmp) / "config.yaml"
        recipe.write_text(yaml.safe_dump(config, sort_keys=False))
        build_cli(["fit", "--config", str(recipe)])
    finish_wandb()
    return new


def render(verdict: Mapping[str, Any], limit: int = 10) -> str:
    """The human report: the verdict, then each kind of difference (first ``limit``)."""
    tol = "bit-identical" if verdict["rtol"] == verdict["atol"] == 0 else \
        f"rtol {verdict['rtol']:g}, atol {verdict['atol']:g}"
    lines = [f"{'MATCH' if verdict['match'] else 'MISMATCH'}: {verdict['reproduced']} vs "
             f"{verdict['original']} ({verdict['metrics_compared']} metric values, {tol})"]
    for d in verdict["metric_diffs"][:limit]:
        lines.append(f"  metric {d['key']} at step {d['step']}: {d['original']} -> "
                     f"{d['reproduced']}")
    for d in (verdict["weight_diffs"] or [])[:limit]:
        lines.append(f"  weight {d['tensor']}: {d['problem']}")
    for d in verdict["env_diffs"]:
        lines.append(f"  {d['what']} {d['name']}: {d['original']} -> {d['now']}")
    lines += [f"  note: {n}" for n in verdict.get("notes", [])]
    if verdict["weight_diffs"] is None:
        lines.append("  (weights not compared: no single-file last.ckpt in both runs)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="attanchor reproduce", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished run directory (config.yaml, env.json)")
    ap.add_argument("--out", type=Path, default=Path("reproductions"),
                    help="root of the new run (default: ./reproductions/<name>/<arm>)")
    ap.add_argument("--against", type=Path, help="compare with this run dir; do not re-run")
    ap.add_argument("--rtol", type=float, default=None,
                    help=f"relative tolerance (default: 0 on CPU, {GPU_RTOL:g} with a GPU)")
    ap.add_argument("--atol", type=float, default=0.0)
    ap.add_argument("--force", action="store_true", help="replace an existing reproduction")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    original = args.run_dir
    for name in ("config.yaml", "env.json"):
        if not (original / name).is_file():
            ap.error(f"{original}: no {name}; pass a run directory written by `attanchor fit`")
    if args.against is not None:
        new = args.against
    else:
        config = yaml.safe_load((original / "config.yaml").read_text())
        target = run_dir_for(args.out, config["run"]["name"],
                             config["model"]["anchor"]["strategy"], config["seed_everything"])
        if target.exists() and any(target.iterdir()):
            if not args.force:
                ap.error(f"{target} exists; pass --force to replace it or --out elsewhere")
            shutil.rmtree(target)
        new = rerun(original, args.out)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # under torchrun, rank zero compares and writes
    verdict = compare_runs(original, new, rtol=args.rtol, atol=args.atol)
    (new / "reproduce.json").write_text(json.dumps(verdict, indent=2) + "\n")
    print(render(verdict))
    return 0 if verdict["match"] else 1
