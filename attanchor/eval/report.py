"""Paired, seeded comparison statistics and the comparison report (report.md/png, metrics.json).

Arms (strategies) are compared to a baseline arm seed by seed: seed k of an arm and seed k of the
baseline share data order and initialisation, so their difference is one paired observation.
With n paired seeds the confidence interval of the mean difference uses Student's t with n - 1
degrees of freedom (``attanchor.eval.stats``). When per-question scores are given (every arm
answers the same questions), the report adds the per-question statistics of
``attanchor.eval.stats``: per seed exact McNemar and a paired bootstrap CI, across seeds a
cluster bootstrap CI, the minimum detectable effect and the seeds a 2-point effect would need.

Input shapes: ``results[arm][seed][metric] -> float`` and ``curves[arm][seed] -> [(step, loss)]``.
Seeds may be ints or strings; they are compared and stored as strings ("0", "1", ...).

This module computes and writes; the text of the tables is ``attanchor.eval.report_text`` and
the figure ``attanchor.eval.report_plot`` (``format_table`` / ``format_per_question`` are
re-exported here).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attanchor.eval.report_plot import check_curves, plot_report
from attanchor.eval.report_text import format_per_question, format_table, markdown_report
from attanchor.eval.stats import check_values, paired_difference, per_question_summary

__all__ = ["flatten_metrics", "format_per_question", "format_table", "read_question_scores",
           "summarize_arms", "write_report"]


def _seed_key(seed: str) -> tuple[int, int | str]:
    return (0, int(seed)) if seed.lstrip("-").isdigit() else (1, seed)


def _normalise_results(results: Mapping[str, Mapping[Any, Mapping[str, float]]]
                       ) -> dict[str, dict[str, dict[str, float]]]:
    if not results:
        raise ValueError("no arms in results; expected {arm: {seed: {metric: value}}}")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm, seeds in results.items():
        if not isinstance(seeds, Mapping) or not seeds:
            raise ValueError(f"arm {arm!r}: expected a non-empty {{seed: {{metric: value}}}}")
        out[str(arm)] = {}
        for seed, metrics in seeds.items():
            if str(seed) in out[str(arm)]:
                raise ValueError(f"arm {arm!r}: seed {seed!r} given twice (as int and str?)")
            if not isinstance(metrics, Mapping):
                raise ValueError(f"arm {arm!r} seed {seed!r}: expected {{metric: value}}, got "
                                 f"{type(metrics).__name__}; flatten nested dicts with "
                                 "flatten_metrics")
            for name, v in metrics.items():
                check_values(f"results[{arm!r}][{seed!r}][{name!r}]", [v])
            out[str(arm)][str(seed)] = {str(k): float(v) for k, v in metrics.items()}
    return out


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metric dicts -> one level with "/"-joined keys; only numbers are kept.

    Example: {"pope": {"f1": 0.8, "per_category": {"random": {"f1": 0.9}}}, "note": "x"} ->
    {"pope/f1": 0.8, "pope/per_category/random/f1": 0.9}.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, prefix=name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def summarize_arms(results: Mapping[str, Mapping[Any, Mapping[str, float]]],
                   baseline_arm: str | None = "none", confidence: float = 0.95,
                   metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Per metric and arm: n, mean, sd over seeds, the per-seed values, the paired difference.

    Returns {"baseline_arm", "confidence", "arms" (baseline first, then input order),
    "seeds" {arm: [seed, ...]}, "metrics" {metric: {arm: {"n", "mean", "sd" (None when n = 1),
    "values" {seed: value}, "missing_seeds" (the arm's seeds without this metric), "diff"}}}}.
    "diff" is None for the baseline itself and when `baseline_arm` is None; otherwise
    ``paired_difference`` over the seeds both arms have for this metric, plus "seeds" (those
    paired) and "unpaired_seeds" (those only one side has; reported, never silently dropped),
    or None when no seed pairs. `metrics` selects and orders metrics (default: all, in order of
    first appearance).
    """
    res = _normalise_results(results)
    if baseline_arm is not None and baseline_arm not in res:
        raise ValueError(f"baseline arm {baseline_arm!r} is not among the arms {sorted(res)}; "
                         "pass baseline_arm=<one of them> or None")
    arms = ([baseline_arm] if baseline_arm is not None else []) + \
        [a for a in res if a != baseline_arm]
    seen: dict[str, None] = {}
    for arm in arms:
        for seed in res[arm].values():
            seen.update(dict.fromkeys(seed))
    names = list(seen) if metrics is None else list(metrics)
    unknown = [m for m in names if m not in seen]
    if unknown:
        raise ValueError(f"metrics {unknown} appear in no arm; known: {list(seen)}")
    summary: dict[str, Any] = {
        "baseline_arm": baseline_arm, "confidence": confidence, "arms": arms,
        "seeds": {a: sorted(res[a], key=_seed_key) for a in arms}, "metrics": {},
    }
    for name in names:
        per_arm: dict[str, Any] = {}
        for arm in arms:
            values = {s: res[arm][s][name] for s in sorted(res[arm], key=_seed_key)
                      if name in res[arm][s]}
            vals = list(values.values())
            n = len(vals)
            mean = sum(vals) / n if n else None
            sd = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
                  if n >= 2 and mean is not None else None)
            entry = {"n": n, "mean": mean, "sd": sd, "values": values,
                     "missing_seeds": [s for s in summary["seeds"][arm] if s not in values],
                     "diff": None}
            if baseline_arm is not None and arm != baseline_arm:
                base = per_arm[baseline_arm]["values"]
                paired = [s for s in values if s in base]
                unpaired = sorted(set(values) ^ set(base), key=_seed_key)
                if paired:
                    entry["diff"] = paired_difference([base[s] for s in paired],
                                                      [values[s] for s in paired], confidence)
                    entry["diff"].update(seeds=paired, unpaired_seeds=unpaired)
            per_arm[arm] = entry
        summary["metrics"][name] = per_arm
    return summary


def read_question_scores(predictions_jsonl: str | Path, task: str) -> dict[str, float]:
    """{question id: score} from an ``evaluate`` predictions.jsonl (rows with "id",
    "prediction", "answer"), scored by ``attanchor.eval.metrics.question_scores`` exactly as
    the task's accuracy is (their mean is it)."""
    from attanchor.eval.metrics import question_scores

    path = Path(predictions_jsonl)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    for k, row in enumerate(rows):
        missing = [key for key in ("id", "prediction", "answer") if key not in row]
        if missing:
            raise ValueError(f"{path} line {k + 1}: no {missing}; expected the rows "
                             "attanchor.eval.evaluate writes")
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: question ids repeat; every id must be unique")
    got = question_scores(task, [r["prediction"] for r in rows], [r["answer"] for r in rows])
    return dict(zip(ids, got, strict=True))


def write_report(out_dir: str | Path,
                 results: Mapping[str, Mapping[Any, Mapping[str, float]]],
                 curves: Mapping[str, Mapping[Any, Sequence[Sequence[float]]]],
                 baseline_arm: str | None = "none", *, confidence: float = 0.95,
                 metrics: Sequence[str] | None = None,
                 title: str = "attanchor comparison",
                 scores: Mapping[str, Mapping[str, Mapping[Any, Mapping[Any, float]]]]
                 | None = None, n_boot: int = 2000,
                 per_question: Mapping[str, Any] | None = None,
                 per_question_reference: Mapping[str, Any] | None = None,
                 reference: str | None = None,
                 failed: Mapping[str, Mapping[Any, str]] | None = None,
                 differences: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write report.md, report.png and metrics.json into `out_dir`; return their paths.

    From ``compare``: ``reference`` names the unadapted reference arm (in ``results``), with
    ``per_question_reference`` (every arm against it); ``failed`` {arm: {seed: error}} (arms
    not evaluated, listed first); ``differences`` (``arm_state.prediction_differences``).
    All four also go into metrics.json.

    report.md: per metric, mean ± sd per arm, the per-seed values and the paired difference to
    the baseline with its CI and p-value, under notes on how wide the CI is for this n (none
    for n = 1) and on any missing or unpaired seeds. report.png: the loss curves of every arm
    and seed, and one bar panel per metric (mean, sd error bar, per-seed dots). metrics.json:
    {"summary": summarize_arms(...), "results": the input results with string seeds,
    "per_question": per_question_summary(...)} ({} without `scores` or baseline).
    `scores[task][arm][seed][question_id]`: per-question scores (``read_question_scores``);
    with them report.md gains, per task, the per-seed McNemar p and paired bootstrap CI, the
    cluster bootstrap CI across seeds, the minimum detectable effect and the seeds needed for
    a 2-point effect (``attanchor.eval.stats``). ``per_question``: that summary when the caller
    has computed it already (compare prints it too), instead of recomputing it from ``scores``.
    Keys of the returned dict: "report_md", "report_png", "metrics_json".
    """
    summary = summarize_arms(results, baseline_arm, confidence, metrics)
    if per_question is None:
        per_question = per_question_summary(scores or {}, baseline_arm, confidence=confidence,
                                            n_boot=n_boot)
    check_curves(curves)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report_md": out / "report.md", "report_png": out / "report.png",
             "metrics_json": out / "metrics.json"}
    from attanchor.eval.arm_state import format_differences

    paths["report_md"].write_text(markdown_report(
        summary, title, per_question, per_question_reference=per_question_reference,
        reference=reference, failed=failed,
        differences=format_differences(differences or {})))
    plot_report(summary, curves, paths["report_png"])
    payload = {"summary": summary, "results": _normalise_results(results),
               "per_question": per_question, "reference": reference,
               "per_question_reference": per_question_reference or {},
               "failed": {a: {str(s): e for s, e in seeds.items()}
                          for a, seeds in (failed or {}).items()},
               "differences": {t: {pair: {s: list(v) for s, v in by_seed.items()}
                                   for pair, by_seed in pairs.items()}
                               for t, pairs in (differences or {}).items()}}
    paths["metrics_json"].write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return paths
