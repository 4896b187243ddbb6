"""Paired, seeded baseline-vs-anchored comparisons: train every arm, evaluate, report.

Every arm trains from the same recipe with the same seeds (model init of new weights, data
order, dropout), differing only in ``model.anchor.strategy``; the selection rule (threshold or
top_fraction) comes from the recipe, so the ``random`` control inserts as many copies as the
anchored arm would. Arms whose ``eval/metrics.json`` already exists are reused, not retrained.

Under several processes (``torchrun`` / ``./launch.sh``) every process trains each arm together
(DDP / DeepSpeed through Lightning), then evaluates its shard of the items
(``attanchor.eval.ranks``); rank zero alone writes ``eval/`` and the report, and the other
ranks wait for the files, so every rank decides alike whether the next arm is done.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attanchor.train.runinfo import run_dir_for

ARM_FILES = ("checkpoints/best.ckpt", "checkpoints/last.ckpt")


def arm_dir(parsed: Any, strategy: str, seed: int) -> Path:
    """The directory `attanchor fit` writes for a recipe parsed with its overrides
    (``validate_recipe``), a strategy and a seed."""
    return run_dir_for(parsed.run.root, parsed.run.name, strategy, seed)


def loss_curve(metrics_csv: Path, key: str = "train/loss") -> list[tuple[float, float]]:
    """(step, value) pairs of ``key`` from a Lightning CSV log, including the parts written
    before each resume (``metrics.partK.csv``); a step logged twice keeps its latest value."""
    parts = sorted(metrics_csv.parent.glob("metrics.part*.csv"),
                   key=lambda p: int(p.stem.removeprefix("metrics.part")))
    by_step: dict[float, float] = {}
    for path in [*parts, metrics_csv]:
        if not path.exists():
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                value = row.get(key, "")
                if value not in ("", None):
                    by_step[float(row["step"])] = float(value)
    return sorted(by_step.items())


def train_arm(recipe_path: str, strategy: str, seed: int, overrides: Sequence[str]) -> None:
    """``attanchor fit`` for one arm, in this process."""
    from attanchor.train.cli import build_cli

    argv = ["fit", "--config", recipe_path, *overrides, "--seed_everything", str(seed),
            "--data.seed", str(seed), "--model.anchor.strategy", strategy]
    build_cli(argv)
    try:  # close the offline W&B run so the next arm starts its own
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


def best_checkpoint(arm_dir: Path) -> Path:
    for name in ARM_FILES:
        if (arm_dir / name).exists():
            return arm_dir / name
    raise FileNotFoundError(f"{arm_dir}: no checkpoint ({' or '.join(ARM_FILES)})")


def evaluate_arm(arm_dir: Path, evals: dict[str, str], image_root: str, *,
                 limit: int | None, batch_size: int, device: str = "auto",
                 ) -> dict[str, float]:
    """Evaluate the arm's best checkpoint on each task; flat metrics like ``pope/f1``.

    Prompts are rendered with the template and scope stored in the checkpoint (the arm's
    training ones); the model runs on ``device`` (``resolve_device``) in its own dtype.
    """
    from attanchor.eval.device import resolve_device
    from attanchor.eval.evaluate import evaluate
    from attanchor.eval.ranks import barrier, current_world, is_writer
    from attanchor.train.checkpoint import load_anchored

    loaded = load_anchored(best_checkpoint(arm_dir), device=resolve_device(device))
    anchored, processor, render = loaded.anchored, loaded.processor, loaded.render
    flat: dict[str, float] = {}
    for task, path in evals.items():
        m = evaluate(anchored, processor, path, task, image_root=image_root,
                     out_dir=arm_dir / "eval" / task, template=render.template,
                     scope=render.scope, format=render.format, limit=limit,
                     batch_size=batch_size, progress=False)
        keep = ("accuracy", "precision", "recall", "f1", "yes_ratio") if task == "pope" \
            else ("accuracy",)
        for k in keep:
            flat[f"{task}/{k}"] = float(m[k])
        flat[f"{task}/anchors_per_prompt"] = float(m["anchors_per_prompt"])
    rank, world = current_world()  # evaluate() joined the group when there is one
    if is_writer(rank):
        (arm_dir / "eval").mkdir(parents=True, exist_ok=True)
        (arm_dir / "eval" / "metrics.json").write_text(json.dumps(flat, indent=2))
    barrier(world)
    return flat


def compare(recipe_path: str, *, seeds: Sequence[int], strategies: Sequence[str],
            evals: dict[str, str], image_root: str | None = None,
            overrides: Sequence[str] = (), limit: int | None = None, batch_size: int = 64,
            out_dir: str | Path | None = None, log=print, device: str = "auto",
            ) -> dict[str, Any]:
    """Train (or reuse) and evaluate every strategy x seed; write the report beside the arms.

    Returns {"summary", "paths", "table", "results", "per_question", "rank"} (see
    ``attanchor.eval.report`` and ``attanchor.eval.stats.per_question_summary``);
    the same on every rank, ``rank`` being this process's (the report is written by rank 0).
    """
    from attanchor.eval.device import resolve_device
    from attanchor.eval.ranks import barrier, broadcast_from_zero, current_world, is_writer
    from attanchor.eval.report import (
        format_per_question,
        format_table,
        read_question_scores,
        summarize_arms,
        write_report,
    )
    from attanchor.eval.stats import per_question_summary
    from attanchor.train.cli import validate_recipe

    def say(line: str) -> None:  # once per comparison, not once per process
        if os.environ.get("RANK", "0") == "0" and current_world()[0] == 0:
            log(line)

    resolve_device(device)  # a bad --device fails now, not after training every arm
    # Parsed with the overrides, so run.root / run.name / data paths are the ones fit uses.
    parsed = validate_recipe(recipe_path, list(overrides))
    image_root = image_root or parsed.data.image_root
    results: dict[str, dict[int, dict[str, float]]] = {}
    scores: dict[str, dict[str, dict[int, dict[str, float]]]] = {}  # task -> arm -> seed -> id
    curves: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for strategy in strategies:
        for seed in seeds:
            arm = arm_dir(parsed, strategy, seed)
            done = arm / "eval" / "metrics.json"
            if done.exists():
                say(f"[compare] {arm}: finished earlier, reusing")
                metrics = json.loads(done.read_text())
            else:
                if not any((arm / f).exists() for f in ARM_FILES):
                    say(f"[compare] training {arm}")
                    train_arm(recipe_path, strategy, seed, overrides)
                say(f"[compare] evaluating {arm}")
                metrics = evaluate_arm(arm, evals, image_root, limit=limit,
                                       batch_size=batch_size, device=device)
            results.setdefault(strategy, {})[seed] = metrics
            curves.setdefault(strategy, {})[seed] = loss_curve(arm / "metrics.csv")
            for task in evals:  # per-question correctness, for the paired per-question stats
                preds = arm / "eval" / task / "predictions.jsonl"
                if preds.exists():
                    scores.setdefault(task, {}).setdefault(strategy, {})[seed] = \
                        read_question_scores(preds, task)
    out = Path(out_dir) if out_dir else arm_dir(parsed, "x", 0).parent
    baseline = "none" if "none" in strategies else None
    title = f"attanchor comparison: {Path(recipe_path).as_posix()} (seeds {list(seeds)})"
    rank, world = current_world()
    per_question = per_question_summary(scores, baseline)  # once: the report and the table
    paths = write_report(out, results, curves, baseline, title=title,
                         per_question=per_question) if is_writer(rank) else None
    paths = broadcast_from_zero(paths, world)
    barrier(world)
    summary = summarize_arms(results, baseline)
    table = format_table(summary)
    if any(per_question.values()):
        table += "\n\n" + format_per_question(per_question)
    return {"summary": summary, "paths": paths, "table": table, "results": results,
            "per_question": per_question, "rank": rank}
