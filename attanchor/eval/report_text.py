"""The comparison report's text: fixed-width tables for the terminal, markdown for report.md.

Pure functions of ``attanchor.eval.report.summarize_arms``' summary and
``attanchor.eval.stats.per_question_summary``' output (``attanchor.eval.report`` computes both
and writes the files). Example: ``format_table(summarize_arms({"none": {0: {"acc": 0.5}},
"random": {0: {"acc": 0.6}}}))`` prints one block "acc" with rows "  none" and "  random",
the latter with diff vs none +0.1000 and "n/a (1 seed)" for its interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attanchor.eval.stats import student_t_quantile


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


def markdown_report(summary: dict[str, Any], title: str, per_question: dict[str, Any], *,
                    per_question_reference: Mapping[str, Any] | None = None,
                    reference: str | None = None,
                    failed: Mapping[str, Mapping[Any, str]] | None = None,
                    differences: str = "") -> str:
    """report.md's text. ``reference``: the name of the unadapted reference arm (its one
    evaluation repeated for every seed), with ``per_question_reference`` (every arm against
    it); ``failed`` {arm: {seed: error}}; ``differences``: ``format_differences``' lines."""
    out = [f"# {title}", "",
           f"Arms: {', '.join(summary['arms'])}. Baseline: {summary['baseline_arm']}. Seeds: "
           + "; ".join(f"{a}: {', '.join(s)}" for a, s in summary["seeds"].items()) + ".",
           "", "Differences are arm minus baseline, paired seed by seed (same data order and "
           "initialisation).", ""]
    notes = _caveats(summary)
    if reference is not None:
        notes.append(f"{reference}: the checkpoint the arms adapt, evaluated once without "
                     "adaptation; its one evaluation stands for every seed (so its sd is 0) and "
                     "each arm's seed-k difference to it is the adaptation's effect at seed k.")
    if failed:
        notes.append("Some arms FAILED to train and were not evaluated (below).")
    if notes:
        out += ["**Read this first:**", ""] + [f"- {note}" for note in notes] + [""]
    if failed:
        out += ["## Failed arms", "", "| arm | seed | error |", "|---|---|---|"]
        out += [f"| {a} | {s} | {e} |" for a, seeds in failed.items() for s, e in seeds.items()]
        out.append("")
    out += ["![report](report.png)", ""]
    header = _header(summary)
    for name, per_arm in summary["metrics"].items():
        out += [f"## {name}", "", "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header)]
        out += ["| " + " | ".join(_row(a, per_arm[a])) + " |" for a in per_arm]
        out.append("")
    out += _per_question_md(per_question, summary["confidence"])
    if per_question_reference:
        out += _per_question_md(per_question_reference, summary["confidence"],
                                baseline=reference)
    if differences:
        out += ["## Predictions that differ between arms", "",
                "Per task and pair of arms, per seed: questions answered differently / "
                "questions both answered.", "", "```", differences, "```", ""]
    return "\n".join(out)


def format_failed(failed: Mapping[str, Mapping[Any, str]]) -> str:
    """One line per failed arm and seed, e.g. "FAILED  random seed 1: ValueError: ..."."""
    return "\n".join(f"FAILED  {a} seed {s}: {e} (not evaluated)"
                     for a, seeds in failed.items() for s, e in seeds.items())


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


def _per_question_md(per_question: dict[str, Any], confidence: float,
                     baseline: str | None = None) -> list[str]:
    header = ["arm", "seed", "baseline acc", "arm acc", "diff", "b", "c", "McNemar p",
              f"{100 * confidence:g}% bootstrap CI"]
    vs = f" vs {baseline}" if baseline else ""
    out = []
    for task, pq in per_question.items():
        if not pq:
            continue
        out += [f"## {task}: per-question statistics{vs}", "",
                "Same questions for every arm. b = questions the baseline gets right and the "
                "arm wrong, c = the reverse; McNemar p: exact two-sided binomial test of c out "
                "of b + c. Bootstrap CI: questions resampled (per seed); the cluster row "
                "resamples seeds and questions together.", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in _per_question_rows(pq)]
        out += [""] + [f"- {_design_note(arm, e['design'])}" for arm, e in pq.items()
                       if e["design"] is not None] + [""]
    return out


def format_per_question(per_question: dict[str, Any], baseline: str | None = None) -> str:
    """A plain-text version of the report's per-question tables and design notes; with
    ``baseline``, under a header line naming it and the columns."""
    lines = []
    if baseline is not None and any(per_question.values()):
        lines.append(f"per-question statistics vs {baseline} (task  arm  seed  {baseline} acc  "
                     "arm acc  diff  b  c  McNemar p  bootstrap CI):")
    for task, pq in per_question.items():
        for r in _per_question_rows(pq):
            lines.append(f"{task}  " + "  ".join(c for c in r if c))
        lines += [f"{task}  {_design_note(arm, e['design'])}" for arm, e in pq.items()
                  if e["design"] is not None]
    return "\n".join(lines)
