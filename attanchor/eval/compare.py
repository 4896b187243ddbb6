"""Paired, seeded baseline-vs-anchored comparisons: train every arm, evaluate, report.

Every arm trains from the same recipe with the same seeds (model init of new weights, data
order, dropout), differing only in ``model.anchor.strategy`` (and ``pause_tokens``, which only
the ``image_into_text`` arm gets: the paper's variant with its "think mode"); the selection
rule (threshold or top_fraction) comes from the recipe, so the ``random`` and ``append``
controls insert as many copies as the anchored arm would. ``reference`` (the checkpoint the
arms adapt) is evaluated unadapted as the ``pretrained`` row, with per-question statistics of
every arm against it.

compare never reports an arm it cannot vouch for (``attanchor.eval.arm_state``): an arm whose
training raised is reported as failed with the error's first line and is not evaluated; an
evaluation is reused only when its key (checkpoint path + fingerprint, data file hashes, image
root, limit, anchor override) matches, so a changed data file or limit re-evaluates.

Under several processes (``torchrun`` / ``./launch.sh``) every process trains each arm together
(DDP / DeepSpeed through Lightning), then evaluates its shard of the items
(``attanchor.eval.ranks``); rank zero alone writes ``eval/`` and the report, and the other
ranks wait for the files, so every rank decides alike whether the next arm is done.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attanchor.eval.arm_state import (
    eval_key,
    first_line,
    prediction_differences,
    read_status,
    stale_reason,
    write_status,
)
from attanchor.train.logging_faults import finish_wandb
from attanchor.train.runinfo import run_dir_for

ARM_FILES = ("checkpoints/best.ckpt", "checkpoints/last.ckpt")
REFERENCE = "pretrained"  # the arm name of the unadapted reference checkpoint
PAUSE_STRATEGY = "image_into_text"  # the only strategy that takes pause tokens


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


def arm_overrides(strategy: str, pause_tokens: int | None) -> list[str]:
    """The per-arm ``fit`` arguments: the strategy, and pause tokens only for
    ``image_into_text`` (``pause_tokens``; None keeps the recipe's), 0 for every other arm.

    Example: arm_overrides("none", 4) == ["--model.anchor.strategy", "none",
    "--model.anchor.pause_tokens", "0"]."""
    out = ["--model.anchor.strategy", strategy]
    if strategy != PAUSE_STRATEGY:
        out += ["--model.anchor.pause_tokens", "0"]
    elif pause_tokens is not None:
        out += ["--model.anchor.pause_tokens", str(pause_tokens)]
    return out


def train_arm(recipe_path: str, strategy: str, seed: int, overrides: Sequence[str],
              pause_tokens: int | None = None) -> None:
    """``attanchor fit`` for one arm, in this process. The arm's arguments are validated
    first, so a bad one raises its own message (jsonargparse would print it and exit)."""
    from attanchor.train.cli import build_cli, validate_recipe

    args = [*overrides, "--seed_everything", str(seed), "--data.seed", str(seed),
            *arm_overrides(strategy, pause_tokens)]
    validate_recipe(recipe_path, args)
    try:
        build_cli(["fit", "--config", recipe_path, *args])
    finally:  # close the offline W&B run so the next arm starts its own, even after a crash
        finish_wandb()


def best_checkpoint(arm_dir: Path) -> Path:
    for name in ARM_FILES:
        if (arm_dir / name).exists():
            return arm_dir / name
    raise FileNotFoundError(f"{arm_dir}: no checkpoint ({' or '.join(ARM_FILES)})")


def _flat(task: str, m: Mapping[str, Any]) -> dict[str, float]:
    """The metrics compare reports for one task, as ``task/name``."""
    keep = ("accuracy", "precision", "recall", "f1", "yes_ratio") if task == "pope" \
        else ("accuracy",)
    return {**{f"{task}/{k}": float(m[k]) for k in keep},
            f"{task}/anchors_per_prompt": float(m["anchors_per_prompt"])}


def evaluate_checkpoint(checkpoint: Path, out_dir: Path, evals: dict[str, str],
                        image_root: str, *, limit: int | None, batch_size: int,
                        device: str = "auto", anchor_override: Mapping[str, Any] | None = None,
                        ) -> dict[str, float]:
    """Evaluate ``checkpoint`` on each task into ``out_dir/eval/<task>`` (predictions.jsonl,
    metrics.json and the evaluation's ``key.json``); return flat metrics like ``pope/f1``.

    Prompts are rendered with the template and scope stored in the checkpoint (the arm's
    training ones); the model runs on ``device`` (``resolve_device``) in its own dtype;
    ``anchor_override`` (an ``AnchorConfig`` dict) replaces the stored anchor config.
    """
    from attanchor.anchoring import AnchorConfig
    from attanchor.eval.device import resolve_device
    from attanchor.eval.evaluate import evaluate
    from attanchor.eval.ranks import barrier, current_world, is_writer
    from attanchor.train.checkpoint import load_anchored

    anchor = None if anchor_override is None else AnchorConfig.from_dict(dict(anchor_override))
    loaded = load_anchored(checkpoint, anchor=anchor, device=resolve_device(device))
    anchored, processor, render = loaded.anchored, loaded.processor, loaded.render
    flat: dict[str, float] = {}
    for task, path in evals.items():
        m = evaluate(anchored, processor, path, task, image_root=image_root,
                     out_dir=out_dir / "eval" / task, template=render.template,
                     scope=render.scope, format=render.format, limit=limit,
                     batch_size=batch_size, progress=False)
        flat.update(_flat(task, m))
        rank, world = current_world()  # evaluate() joined the group when there is one
        if is_writer(rank):  # written after metrics.json: marks the evaluation complete
            key = eval_key(checkpoint, {task: path}, image_root, limit, anchor_override)
            (out_dir / "eval" / task / "key.json").write_text(json.dumps(key, indent=2) + "\n")
    rank, world = current_world()
    barrier(world)
    return flat


def evaluate_arm(arm_dir: Path, evals: dict[str, str], image_root: str, *,
                 limit: int | None, batch_size: int, device: str = "auto",
                 anchor_override: Mapping[str, Any] | None = None) -> dict[str, float]:
    """``evaluate_checkpoint`` of the arm's best checkpoint into the arm's directory."""
    return evaluate_checkpoint(best_checkpoint(arm_dir), arm_dir, evals, image_root,
                               limit=limit, batch_size=batch_size, device=device,
                               anchor_override=anchor_override)


def _evaluated(where: Path, checkpoint: Path, evals: dict[str, str], image_root: str,
               say, **kw: Any) -> dict[str, float]:
    """Per task, reuse ``where/eval/<task>`` when its key matches this call's, else evaluate
    (saying why); flat metrics of every task in ``evals``."""
    stale: dict[str, str] = {}
    for task, path in evals.items():
        key = eval_key(checkpoint, {task: path}, image_root, kw["limit"], kw["anchor_override"])
        reason = stale_reason(where / "eval" / task, key)
        if reason is not None:
            stale[task] = f"{task}: {reason}"
    flat: dict[str, float] = {}
    if stale:
        say(f"[compare] evaluating {where} ({'; '.join(stale.values())})")
        flat.update(evaluate_checkpoint(checkpoint, where, {t: evals[t] for t in stale},
                                        image_root, **kw))
    else:
        say(f"[compare] {where}: evaluated earlier with the same checkpoint, data and limit, "
            "reusing")
    for task in (t for t in evals if t not in stale):
        flat.update(_flat(task, json.loads((where / "eval" / task / "metrics.json").read_text())))
    return {k: flat[k] for t in evals for k in flat if k.startswith(f"{t}/")}  # task order


def _trained(arm: Path, recipe_path: str, strategy: str, seed: int, overrides: Sequence[str],
             pause_tokens: int | None, say) -> str | None:
    """Train the arm unless compare trained it before; None when it has a checkpoint, else
    the failure's first line (recorded in the arm's compare_status.json)."""
    status = read_status(arm)
    has_ckpt = any((arm / f).exists() for f in ARM_FILES)
    # A checkpoint compare saw finish (or one made by `attanchor fit` itself, status None) is
    # used; a recorded failure or no checkpoint trains (again).
    if has_ckpt and (status is None or status["status"] == "trained"):
        return None
    say(f"[compare] training {arm}" + (" (it failed before)" if status else ""))
    try:
        train_arm(recipe_path, strategy, seed, overrides, pause_tokens)
    except (Exception, SystemExit) as err:  # jsonargparse exits on a bad argument
        error = first_line(err)
    else:
        error = None if any((arm / f).exists() for f in ARM_FILES) else \
            f"training wrote no checkpoint ({' or '.join(ARM_FILES)})"
    from attanchor.eval.ranks import barrier, current_world, is_writer

    rank, world = current_world()
    if is_writer(rank):
        write_status(arm, "failed" if error else "trained", error)
    barrier(world)
    if error:
        say(f"[compare] {arm}: training FAILED: {error}")
    return error


def _curves_and_wandb(parsed: Any, out: Path, trained: Mapping[str, Path],
                      summary: Mapping[str, Any], paths: Mapping[str, Any], say: Any
                      ) -> dict[str, Any]:
    """curves.png (loss and, when logged, accuracy per validation, one line per arm and seed)
    and, with ``run.wandb``, the summary table and figures in a ``compare`` run of the arms'
    W&B group. Writer rank only; W&B failing only warns (wandb_log)."""
    from attanchor.eval.curves import plot_curves
    from attanchor.eval.wandb_log import log_comparison, summary_rows

    extra: dict[str, Any] = {}
    # An arm too short to log anything (max_steps below log_every_n_steps and no validation)
    # has no metrics.csv: it has no curve, which is not an error.
    logged = {name: d for name, d in trained.items() if (d / "metrics.csv").is_file()}
    try:
        if not logged:
            raise ValueError("no arm wrote metrics.csv")
        extra["curves_png"] = plot_curves(logged, out / "curves.png")
    except ValueError as e:  # nothing logged any curve key
        say(f"[compare] no curves.png: {e}")
    if getattr(parsed.run, "wandb", False):
        images = {"curves": extra["curves_png"]} if "curves_png" in extra else {}
        run = log_comparison(parsed.run.name, summary_rows(summary), paths.get("report_png"),
                             project=parsed.run.wandb_project, save_dir=out, images=images)
        if run is not None:
            extra["wandb_run"] = run
    return extra


def compare(recipe_path: str, *, seeds: Sequence[int], strategies: Sequence[str],
            evals: dict[str, str], image_root: str | None = None,
            overrides: Sequence[str] = (), limit: int | None = None, batch_size: int = 64,
            out_dir: str | Path | None = None, log=print, device: str = "auto",
            reference: str | Path | None = None, pause_tokens: int | None = None,
            anchor_override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train (or reuse) and evaluate every strategy x seed; write the report beside the arms.

    ``reference``: a checkpoint (the one the arms adapt) evaluated unadapted as the
    ``pretrained`` arm; its one evaluation stands for every seed, so each seed's difference
    to it is the adaptation's effect at that seed. ``pause_tokens``: the ``image_into_text``
    arm's (None: the recipe's); every other arm gets 0. ``anchor_override``: an AnchorConfig
    dict every evaluation uses instead of the stored config (part of the evaluation key).

    Returns {"summary", "paths", "table", "results", "per_question" (vs ``none``),
    "per_question_reference" (vs ``pretrained``; {} without a reference), "failed"
    {strategy: {seed: error}}, "differences" (``prediction_differences``), "rank"}; the same
    on every rank, ``rank`` being this process's (the report is written by rank 0).
    Raises RuntimeError when no arm trained.
    """
    from attanchor.anchoring import STRATEGIES
    from attanchor.eval.device import resolve_device
    from attanchor.eval.ranks import barrier, broadcast_from_zero, current_world, is_writer
    from attanchor.eval.report import (
        format_per_question,
        format_table,
        read_question_scores,
        summarize_arms,
        write_report,
    )
    from attanchor.eval.report_text import format_failed
    from attanchor.eval.stats import per_question_summary
    from attanchor.train.cli import validate_recipe

    def say(line: str) -> None:  # once per comparison, not once per process
        if os.environ.get("RANK", "0") == "0" and current_world()[0] == 0:
            log(line)

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies {list(strategies)}: each once, among {list(STRATEGIES)}"
                         + (f" (unknown: {unknown})" if unknown else ""))
    resolve_device(device)  # a bad --device fails now, not after training every arm
    # Parsed with the overrides, so run.root / run.name / data paths are the ones fit uses;
    # as the `none` arm, since each arm's anchor settings are checked when that arm trains.
    parsed = validate_recipe(recipe_path, [*overrides, *arm_overrides("none", None)])
    image_root = image_root or parsed.data.image_root
    out = Path(out_dir) if out_dir else arm_dir(parsed, "x", 0).parent
    kw = {"limit": limit, "batch_size": batch_size, "device": device,
          "anchor_override": anchor_override}
    results: dict[str, dict[int, dict[str, float]]] = {}
    failed: dict[str, dict[int, str]] = {}
    preds: dict[str, dict[str, dict[str, Path]]] = {}  # task -> arm -> seed -> predictions
    curves: dict[str, dict[int, list[tuple[float, float]]]] = {}
    trained: dict[str, Path] = {}  # "<strategy>-seed<k>" -> run dir, for curves.png
    if reference is not None:
        ref_dir = out / REFERENCE
        ref = _evaluated(ref_dir, Path(reference), evals, image_root, say, **kw)
        results[REFERENCE] = dict.fromkeys(seeds, ref)
        for task in evals:
            preds.setdefault(task, {})[REFERENCE] = dict.fromkeys(
                map(str, seeds), ref_dir / "eval" / task / "predictions.jsonl")
    for strategy in strategies:
        for seed in seeds:
            arm = arm_dir(parsed, strategy, seed)
            error = _trained(arm, recipe_path, strategy, seed, overrides, pause_tokens, say)
            if error is not None:  # reported as failed, never evaluated
                failed.setdefault(strategy, {})[seed] = error
                continue
            results.setdefault(strategy, {})[seed] = _evaluated(
                arm, best_checkpoint(arm), evals, image_root, say, **kw)
            curves.setdefault(strategy, {})[seed] = loss_curve(arm / "metrics.csv")
            trained[arm.name] = arm
            for task in evals:
                preds.setdefault(task, {}).setdefault(strategy, {})[str(seed)] = \
                    arm / "eval" / task / "predictions.jsonl"
    if not any(a != REFERENCE for a in results):
        raise RuntimeError("compare: no arm trained: " + "; ".join(
            f"{a} seed {s}: {e}" for a, seeds_ in failed.items() for s, e in seeds_.items()))
    # Per-question correctness, for the paired per-question statistics.
    scores = {task: {a: {s: read_question_scores(f, task) for s, f in by_seed.items()
                         if f.exists()} for a, by_seed in arms.items()}
              for task, arms in preds.items()}
    differences = prediction_differences(
        {t: {a: {s: f for s, f in by_seed.items() if f.exists()} for a, by_seed in arms.items()}
         for t, arms in preds.items()})
    baseline = "none" if "none" in results else None
    title = f"attanchor comparison: {Path(recipe_path).as_posix()} (seeds {list(seeds)})"
    rank, world = current_world()
    per_question = per_question_summary(scores, baseline)  # once: the report and the table
    per_question_ref = per_question_summary(scores, REFERENCE) if reference else {}
    paths = write_report(out, results, curves, baseline, title=title,
                         per_question=per_question, per_question_reference=per_question_ref,
                         failed=failed, differences=differences,
                         reference=REFERENCE if reference else None) \
        if is_writer(rank) else None
    summary = summarize_arms(results, baseline)
    if is_writer(rank):
        paths.update(_curves_and_wandb(parsed, out, trained, summary, paths, say))
    paths = broadcast_from_zero(paths, world)
    barrier(world)
    table = format_table(summary)
    if failed:
        table += "\n\n" + format_failed(failed)
    if any(per_question.values()):
        table += "\n\n" + format_per_question(per_question, baseline=baseline)
    if any(per_question_ref.values()):
        table += "\n\n" + format_per_question(per_question_ref, baseline=REFERENCE)
    return {"summary": summary, "paths": paths, "table": table, "results": results,
            "per_question": per_question, "per_question_reference": per_question_ref,
            "failed": failed, "differences": differences, "rank": rank}
