"""Paired, seeded comparison statistics and the comparison report (report.md/png, metrics.json).

Arms (strategies) are compared to a baseline arm seed by seed: seed k of an arm and seed k of the
baseline share data order and initialisation, so their difference is one paired observation.
With n paired seeds the confidence interval of the mean difference uses Student's t with n - 1
degrees of freedom. Its quantile is computed here (no scipy): the t CDF through the regularised
incomplete beta function (continued fraction), inverted by bisection to 1e-12.

Input shapes: ``results[arm][seed][metric] -> float`` and ``curves[arm][seed] -> [(step, loss)]``.
Seeds may be ints or strings; they are compared and stored as strings ("0", "1", ...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------- Student's t quantile


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom. Example: cdf(0, 3) == 0.5."""
    if df <= 0:
        raise ValueError(f"student_t_cdf: df={df} must be > 0")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for 0 < p < 1 and df > 0, to 1e-12 (bisection on the CDF).

    Examples: quantile(0.975, 1) = tan(0.475 pi) = 12.7062; quantile(0.975, 9) = 2.2622.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"student_t_quantile: p={p} must lie in (0, 1)")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------- paired statistics


def _check_values(name: str, values: Sequence[float]) -> list[float]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name}[{i}] = {v!r}: every value must be a finite number")
        out.append(float(v))
    return out


def paired_difference(baseline: Sequence[float], arm: Sequence[float],
                      confidence: float = 0.95) -> dict[str, Any]:
    """Mean of (arm - baseline) over paired observations, its sd and a Student-t CI.

    Returns n, mean_baseline, mean_arm, mean_diff, sd_diff (sample sd, n - 1 in the
    denominator), se (= sd_diff / sqrt(n)), t_quantile (the (1 + confidence) / 2 quantile with
    n - 1 df), ci_low, ci_high (mean_diff -+ t_quantile * se), p_value (two-sided paired t-test),
    confidence. With n = 1 no spread can be estimated: sd_diff, se, t_quantile, ci_low, ci_high
    and p_value are None. With sd_diff = 0 the CI is the single point mean_diff and p_value is
    None (the t statistic is undefined).

    Example: baseline [0.5, 0.6], arm [0.6, 0.8] -> diffs [0.1, 0.2], mean_diff 0.15,
    sd_diff 0.0707, se 0.05, t_quantile 12.706, CI [-0.485, 0.785].
    """
    if len(baseline) != len(arm):
        raise ValueError(f"paired_difference: {len(baseline)} baseline values but {len(arm)} "
                         "arm values; pair them seed by seed")
    if not baseline:
        raise ValueError("paired_difference: no values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_difference: confidence={confidence} must lie in (0, 1)")
    base = _check_values("baseline", baseline)
    other = _check_values("arm", arm)
    n = len(base)
    diffs = [o - b for b, o in zip(base, other, strict=True)]
    mean = sum(diffs) / n
    out: dict[str, Any] = {
        "n": n, "mean_baseline": sum(base) / n, "mean_arm": sum(other) / n, "mean_diff": mean,
        "sd_diff": None, "se": None, "t_quantile": None, "ci_low": None, "ci_high": None,
        "p_value": None, "confidence": confidence,
    }
    if n < 2:
        return out
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    t_q = student_t_quantile(0.5 + confidence / 2.0, n - 1)
    out.update(sd_diff=sd, se=se, t_quantile=t_q, ci_low=mean - t_q * se, ci_high=mean + t_q * se)
    if se > 0:
        out["p_value"] = 2.0 * (1.0 - student_t_cdf(abs(mean) / se, n - 1))
    return out


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
                _check_values(f"results[{arm!r}][{seed!r}][{name!r}]", [v])
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


def _markdown(summary: dict[str, Any], title: str) -> str:
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
    return "\n".join(out)


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
                 title: str = "attanchor comparison") -> dict[str, Path]:
    """Write report.md, report.png and metrics.json into `out_dir`; return their paths.

    report.md: per metric, mean ± sd per arm, the per-seed values and the paired difference to
    the baseline with its CI and p-value, under notes on how wide the CI is for this n (none
    for n = 1) and on any missing or unpaired seeds. report.png: the loss curves of every arm
    and seed, and one bar panel per metric (mean, sd error bar, per-seed dots). metrics.json:
    {"summary": summarize_arms(...), "results": the input results with string seeds}.
    Keys of the returned dict: "report_md", "report_png", "metrics_json".
    """
    summary = summarize_arms(results, baseline_arm, confidence, metrics)
    _check_curves(curves)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report_md": out / "report.md", "report_png": out / "report.png",
             "metrics_json": out / "metrics.json"}
    paths["report_md"].write_text(_markdown(summary, title))
    _plot(summary, curves, paths["report_png"])
    payload = {"summary": summary, "results": _normalise_results(results)}
    paths["metrics_json"].write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return paths
