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
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attanchor.eval.stats import (
    check_values,
    paired_difference,
    per_question_summary,
    student_t_quantile,
)


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


# ---------------------------------------------------------------------------------- rendering


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    if float(v).is_integer() and abs(v) >= 1:
        return f"{int(v):+d}" if signed else f"{int(v)}"
    spec = ".4f" if abs(v) < 10 else ".2f"
    return format(v, ("+" if signed else "") + spec)


def _row(arm: str, e: dict[str, Any]) -> list[str]:
    mean_sd = _fmt(e["mean"]) + (f" ± {_fmt(e['sd'])}" if e["sd"] is not None else "")
    seeds = ", ".join(f"{s}: {_fmt(v)}" for s, v in e["values"].items()) or "-"
    d = e["diff"]
    if d is None:
        diff = ci = p = "-"
    else:
        diff = _fmt(d["mean_diff"], signed=True)
        ci = (f"[{_fmt(d['ci_low'], True)}, {_fmt(d['ci_high'], True)}]"
              if d["ci_low"] is not None else "n/a (1 seed)")
        p = f"{d['p_value']:.3f}" if d["p_value"] is not None else "-"
    return [arm, str(e["n"]), mean_sd, seeds, diff, ci, p]


def _header(summary: dict[str, Any]) -> list[str]:
    pct = f"{100 * summary['confidence']:g}% CI"
    base = summary["baseline_arm"] or "baseline"
    return ["arm", "n", "mean ± sd", "per seed", f"diff vs {base}", pct, "p (paired t)"]


def format_table(summary: dict[str, Any]) -> str:
    """A fixed-width text table of ``summarize_arms``' output, one block per metric."""
    header = _header(summary)
    rows: list[list[str]] = []
    for name, per_arm in summary["metrics"].items():
        rows.append([name] + [""] * (len(header) - 1))
        rows.extend(["  " + r[0]] + r[1:] for r in (_row(a, per_arm[a]) for a in per_arm))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _caveats(summary: dict[str, Any]) -> list[str]:
    ns = sorted({d["diff"]["n"] for m in summary["metrics"].values() for d in m.values()
                 if d["diff"] is not None})
    notes = []
    for n in ns:
        if n == 1:
            notes.append("With 1 paired seed no spread can be estimated: no sd, no confidence "
                         "interval and no p-value can be given; the difference is a single "
                         "observation and may be noise.")
        else:
            t_q = student_t_quantile(0.5 + summary["confidence"] / 2.0, n - 1)
            notes.append(f"With n = {n} paired seeds the interval uses Student's t with {n - 1} "
                         f"degree{'s' if n > 2 else ''} of freedom (t = {t_q:.2f}), so it is wide: a difference "
                         "whose interval contains 0 is not evidence either way; more seeds "
                         "narrow it.")
    for name, per_arm in summary["metrics"].items():
        for arm, e in per_arm.items():
            if e["missing_seeds"]:
                notes.append(f"{name}: arm {arm} lacks seeds {e['missing_seeds']}.")
            if e["diff"] is not None and e["diff"]["unpaired_seeds"]:
                notes.append(f"{name}: arm {arm} vs baseline: seeds "
                             f"{e['diff']['unpaired_seeds']} are unpaired and left out of "
                             "the difference.")
    return notes


def _markdown(summary: dict[str, Any], title: str, per_question: dict[str, Any]) -> str:
    out = [f"# {title}", "",
           f"Arms: {', '.join(summary['arms'])}. Baseline: {summary['baseline_arm']}. Seeds: "
           + "; ".join(f"{a}: {', '.join(s)}" for a, s in summary["seeds"].items()) + ".",
           "", "Differences are arm minus baseline, paired seed by seed (same data order and "
           "initialisation).", ""]
    notes = _caveats(summary)
    if notes:
        out += ["**Read this first:**", ""] + [f"- {note}" for note in notes] + [""]
    out += ["![report](report.png)", ""]
    header = _header(summary)
    for name, per_arm in summary["metrics"].items():
        out += [f"## {name}", "", "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header)]
        out += ["| " + " | ".join(_row(a, per_arm[a])) + " |" for a in per_arm]
        out.append("")
    out += _per_question_md(per_question, summary["confidence"])
    return "\n".join(out)


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


def _ci(d: dict[str, Any] | None) -> str:
    return "-" if d is None else f"[{_fmt(d['ci_low'], True)}, {_fmt(d['ci_high'], True)}]"


def _per_question_rows(pq: dict[str, Any]) -> list[list[str]]:
    rows = []
    for arm, e in pq.items():
        for s, r in e["per_seed"].items():
            m = r["mcnemar"]
            rows.append([arm, s, _fmt(r["accuracy_baseline"]), _fmt(r["accuracy_arm"]),
                         _fmt(r["mean_diff"], True), "-" if m is None else str(m["b"]),
                         "-" if m is None else str(m["c"]),
                         "-" if m is None else f"{m['p_value']:.4g}", _ci(r["bootstrap"])])
        if e["cluster"] is not None:
            rows.append([arm, "all (cluster)", "", "", _fmt(e["cluster"]["mean_diff"], True),
                         "", "", "", _ci(e["cluster"])])
    return rows


def _design_note(arm: str, d: dict[str, Any]) -> str:
    head = (f"{arm}: with {d['n_seeds']} seed{'s' if d['n_seeds'] > 1 else ''} x "
            f"{d['n_questions']} questions (discordance rate {d['discordance_rate']:.3f}) the "
            f"minimum detectable effect at alpha {d['alpha']:g}, power {d['power']:g} is ")
    if d["no_spread"]:
        return head + ("unknown: the score difference is the same on every question (identical "
                       "answers?), so there is no spread to size an effect against.")
    if d["mde"] is None:
        return head + "unknown (one question)."
    head += f"{100 * d['mde']:.1f} points; "
    if d["seeds_for_target"] is not None:
        return head + (f"a {100 * d['target']:g}-point effect would need "
                       f"{d['seeds_for_target']} seeds.")
    if d["n_seeds"] < 2:
        return head + f"seeds for {100 * d['target']:g} points: unknown (run 2 or more seeds)."
    return head + (f"no number of seeds reaches {100 * d['target']:g} points: the question "
                   "sample alone is too noisy; more questions are needed.")


def _per_question_md(per_question: dict[str, Any], confidence: float) -> list[str]:
    header = ["arm", "seed", "baseline acc", "arm acc", "diff", "b", "c", "McNemar p",
              f"{100 * confidence:g}% bootstrap CI"]
    out = []
    for task, pq in per_question.items():
        if not pq:
            continue
        out += [f"## {task}: per-question statistics", "",
                "Same questions for every arm. b = questions the baseline gets right and the "
                "arm wrong, c = the reverse; McNemar p: exact two-sided binomial test of c out "
                "of b + c. Bootstrap CI: questions resampled (per seed); the cluster row "
                "resamples seeds and questions together.", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in _per_question_rows(pq)]
        out += [""] + [f"- {_design_note(arm, e['design'])}" for arm, e in pq.items()
                       if e["design"] is not None] + [""]
    return out


def format_per_question(per_question: dict[str, Any]) -> str:
    """A plain-text version of the report's per-question tables and design notes."""
    lines = []
    for task, pq in per_question.items():
        for r in _per_question_rows(pq):
            lines.append(f"{task}  " + "  ".join(c for c in r if c))
        lines += [f"{task}  {_design_note(arm, e['design'])}" for arm, e in pq.items()
                  if e["design"] is not None]
    return "\n".join(lines)


def _check_curves(curves: Mapping[str, Mapping[Any, Sequence[Sequence[float]]]]) -> None:
    for arm, seeds in curves.items():
        for seed, points in seeds.items():
            for i, point in enumerate(points):
                if len(point) != 2 or not all(isinstance(x, int | float) for x in point):
                    raise ValueError(f"curves[{arm!r}][{seed!r}][{i}] = {point!r}: expected "
                                     "(step, loss)")


def _plot(summary: dict[str, Any], curves: Mapping[str, Mapping[Any, Sequence[Sequence[float]]]],
          out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["metrics"])
    arms = list(summary["arms"]) + [a for a in curves if a not in summary["arms"]]
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arms)}
    ncols = min(3, 1 + len(names))
    nrows = math.ceil((1 + len(names)) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    flat = list(axes.flat)
    ax = flat[0]
    for arm in arms:
        for k, (_seed, points) in enumerate(curves.get(arm, {}).items()):
            if points:
                steps, losses = zip(*points, strict=True)
                ax.plot(steps, losses, color=colors[arm], alpha=0.8, lw=1.2,
                        label=arm if k == 0 else None)
    ax.set(title="training loss (one line per seed)", xlabel="step", ylabel="loss")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss curves", ha="center", va="center", transform=ax.transAxes)
    for ax, name in zip(flat[1:], names, strict=False):
        per_arm = summary["metrics"][name]
        for x, arm in enumerate(summary["arms"]):
            e = per_arm[arm]
            if e["mean"] is None:
                continue
            ax.bar(x, e["mean"], color=colors[arm], alpha=0.7,
                   yerr=e["sd"] if e["sd"] is not None else None, capsize=4)
            vals = list(e["values"].values())
            ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(summary["arms"])), summary["arms"], rotation=20, fontsize=8)
        ax.set_title(f"{name} (mean ± sd, dots: seeds)", fontsize=9)
    for ax in flat[1 + len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def write_report(out_dir: str | Path,
                 results: Mapping[str, Mapping[Any, Mapping[str, float]]],
                 curves: Mapping[str, Mapping[Any, Sequence[Sequence[float]]]],
                 baseline_arm: str | None = "none", *, confidence: float = 0.95,
                 metrics: Sequence[str] | None = None,
                 title: str = "attanchor comparison",
                 scores: Mapping[str, Mapping[str, Mapping[Any, Mapping[Any, float]]]]
                 | None = None, n_boot: int = 2000,
                 per_question: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write report.md, report.png and metrics.json into `out_dir`; return their paths.

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
    _check_curves(curves)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report_md": out / "report.md", "report_png": out / "report.png",
             "metrics_json": out / "metrics.json"}
    paths["report_md"].write_text(_markdown(summary, title, per_question))
    _plot(summary, curves, paths["report_png"])
    payload = {"summary": summary, "results": _normalise_results(results),
               "per_question": per_question}
    paths["metrics_json"].write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return paths
