"""Statistics for paired comparisons of arms: per seed, across seeds, and per question.

Pure functions (inputs are never modified); distributions and tests come from scipy.stats.

Two levels of pairing. Seed k of an arm and seed k of the baseline share data order and
initialisation (``paired_difference``: Student's t over seeds). Every arm answers the same
questions, so each question is also a paired observation: per seed, ``mcnemar_exact`` (binary
correctness) and ``paired_bootstrap`` (any per-question score); across seeds,
``cluster_bootstrap`` over the (seed x question) table of differences, and ``design_power``
for the minimum detectable effect and the seeds a given effect would need.

Shapes: per-question inputs are sequences of length Q (questions, in the same order for both
arms); the cross-seed table is (S seeds, Q questions) of arm - baseline score differences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as st

# ---------------------------------------------------------------------------- Student's t


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom. Example: cdf(0, 3) == 0.5."""
    if df <= 0:
        raise ValueError(f"student_t_cdf: df={df} must be > 0")
    return float(st.t.cdf(t, df))


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for 0 < p < 1 and df > 0 (scipy.stats.t.ppf).

    Examples: quantile(0.975, 1) = tan(0.475 pi) = 12.7062; quantile(0.975, 9) = 2.2622.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"student_t_quantile: p={p} must lie in (0, 1)")
    if df <= 0:
        raise ValueError(f"student_t_quantile: df={df} must be > 0")
    return float(st.t.ppf(p, df))


def check_values(name: str, values: Sequence[float]) -> list[float]:
    """`values` as floats; raises ValueError naming ``name[i]`` for a non-number, bool, nan or
    inf. Example: check_values("x", [1, 2.5]) == [1.0, 2.5]."""
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
    base = check_values("baseline", baseline)
    other = check_values("arm", arm)
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
        out["p_value"] = float(2.0 * st.t.sf(abs(mean) / se, n - 1))
    return out


# ------------------------------------------------------------------------ per-question tests


def _scores(name: str, values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(check_values(name, values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{name}: no questions")
    return arr


def _pair(baseline: Sequence[float], arm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(baseline) != len(arm):
        raise ValueError(f"{len(baseline)} baseline scores but {len(arm)} arm scores; both arms "
                         "must answer the same questions in the same order")
    return _scores("baseline", baseline), _scores("arm", arm)


def mcnemar_exact(baseline: Sequence[float], arm: Sequence[float]) -> dict[str, Any]:
    """Exact McNemar test on per-question correctness (1 right, 0 wrong) of two arms.

    b = questions the baseline gets right and the arm wrong, c = the reverse. Under the null
    (neither arm better) each of the b + c discordant questions goes either way with
    probability 1/2, so p = two-sided binomial test of c out of b + c at 0.5
    (scipy.stats.binomtest) = min(1, 2 P(X <= min(b, c))). No discordant question: p = 1.
    Returns n, b, c, discordant (b + c), p_value. Raises on scores other than 0 and 1.

    Example: b = 1, c = 9 -> p = 2 (1 + 10) / 2**10 = 22/1024 = 0.021484375.
    """
    base, other = _pair(baseline, arm)
    for name, arr in (("baseline", base), ("arm", other)):
        bad = np.flatnonzero((arr != 0.0) & (arr != 1.0))
        if bad.size:
            raise ValueError(f"mcnemar_exact: {name} score {arr[bad[0]]} at question "
                             f"{int(bad[0])} is not 0 or 1; McNemar needs right/wrong outcomes "
                             "(use paired_bootstrap for fractional scores)")
    b = int(np.sum((base == 1.0) & (other == 0.0)))
    c = int(np.sum((base == 0.0) & (other == 1.0)))
    p = float(st.binomtest(c, b + c, 0.5).pvalue) if b + c else 1.0
    return {"n": int(base.size), "b": b, "c": c, "discordant": b + c, "p_value": p}


def _percentile_ci(means: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def _check_boot(n_boot: int, confidence: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must lie in (0, 1)")


def paired_bootstrap(baseline: Sequence[float], arm: Sequence[float], *, n_boot: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap CI of mean(arm - baseline), resampling questions with replacement.

    Each replicate draws Q questions with replacement (the same draw for both arms, which keeps
    the pairing) from ``numpy.random.default_rng(seed)``: deterministic for a given seed.
    Returns n, mean_diff, ci_low, ci_high, n_boot, confidence, seed.
    Invariants: ci_low <= ci_high, both within [min diff, max diff]; all differences equal to
    v -> the interval is [v, v].

    Example: differences [0, 1]: replicate means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4,
    so the 95% interval is [0, 1] and the 40% interval is [0.5, 0.5].
    """
    _check_boot(n_boot, confidence)
    base, other = _pair(baseline, arm)
    d = other - base  # (Q,)
    rng = np.random.default_rng(seed)
    # Multinomial counts per replicate, in chunks: (chunk, Q) @ (Q,) -> (chunk,).
    q = d.size
    means = np.concatenate([
        rng.multinomial(q, np.full(q, 1.0 / q), size=min(256, n_boot - k)) @ d / q
        for k in range(0, n_boot, 256)])
    lo, hi = _percentile_ci(means, confidence)
    return {"n": int(q), "mean_diff": float(d.mean()), "ci_low": lo, "ci_high": hi,
            "n_boot": n_boot, "confidence": confidence, "seed": seed}


def _table(diffs: Sequence[Sequence[float]]) -> np.ndarray:
    rows = [_scores(f"diffs[{s}]", row) for s, row in enumerate(diffs)]
    if not rows:
        raise ValueError("no seeds: expected a (seeds, questions) table of differences")
    if len({r.size for r in rows}) != 1:
        raise ValueError(f"seeds have {[r.size for r in rows]} questions; every seed must "
                         "score the same questions")
    return np.stack(rows)  # (S, Q)


def cluster_bootstrap(diffs: Sequence[Sequence[float]], *, n_boot: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Percentile CI of the mean difference over seeds and questions, resampling both.

    `diffs` is the (S, Q) table of arm - baseline scores, seed s of both arms on question q.
    Seeds and questions are crossed (every seed answers every question), so neither nests in
    the other: each replicate resamples seeds with replacement and, independently, questions
    with replacement (a question carries its outcomes under every resampled seed), and takes
    the mean of the resampled cells (the "pigeonhole" bootstrap for crossed factors, Owen
    2007). It captures both sources of noise: which training run (seed) and which questions.
    With S = 1 it is ``paired_bootstrap``; with S = 2 the seed draw has only three outcomes,
    so the interval is coarse: more seeds, not more replicates, fix that.
    Returns n_seeds, n_questions, mean_diff, ci_low, ci_high, n_boot, confidence, seed.

    Example: [[0, 0], [1, 1]] (one seed helps on every question, the other on none): replicate
    means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4, so the 95% interval is [0, 1].
    """
    _check_boot(n_boot, confidence)
    d = _table(diffs)
    s, q = d.shape
    rng = np.random.default_rng(seed)
    means = []
    for k in range(0, n_boot, 256):
        m = min(256, n_boot - k)
        ws = rng.multinomial(s, np.full(s, 1.0 / s), size=m)  # (m, S) seed counts
        wq = rng.multinomial(q, np.full(q, 1.0 / q), size=m)  # (m, Q) question counts
        means.append(np.einsum("ms,sq,mq->m", ws, d, wq) / (s * q))
    lo, hi = _percentile_ci(np.concatenate(means), confidence)
    return {"n_seeds": int(s), "n_questions": int(q), "mean_diff": float(d.mean()),
            "ci_low": lo, "ci_high": hi, "n_boot": n_boot, "confidence": confidence,
            "seed": seed}


def design_power(diffs: Sequence[Sequence[float]], *, alpha: float = 0.05, power: float = 0.8,
                 target: float = 0.02) -> dict[str, Any]:
    """Minimum detectable effect of an (S seeds x Q questions) paired design, and the seeds
    needed to detect `target` (0.02 = 2 accuracy points).

    Model: diff[s, q] = mu + a_s + b_q + e_sq, with seed effects a (variance var_seed),
    question effects b shared by all seeds (var_question) and residual e (var_residual),
    estimated by the two-way ANOVA moments of the table (negative estimates set to 0):
      MS_seed = Q * sum_s (row mean - grand)^2 / (S - 1),
      MS_question = S * sum_q (column mean - grand)^2 / (Q - 1),
      MS_resid = sum (d - row - column + grand)^2 / ((S - 1)(Q - 1)),
      var_seed = (MS_seed - MS_resid) / Q, var_question = (MS_question - MS_resid) / S,
      var_residual = MS_resid.
    Then SE(S')^2 = var_seed / S' + var_question / Q + var_residual / (S' Q) for S' seeds and
    MDE = (z_{1 - alpha/2} + z_{power}) SE(S), with z the standard normal quantile
    (2.8016 for alpha 0.05, power 0.8). seeds_for_target = the least S' with MDE(S') <= target:
    S' = ceil((var_seed + var_residual / Q) / ((target / z)^2 - var_question / Q)); None when
    var_question / Q alone exceeds (target / z)^2 (more seeds cannot help: more questions
    can). With S = 1, seed and residual variance cannot be told apart: SE^2 = sample variance
    of the differences / Q (for 0/1 scores about the discordance rate / Q) and
    seeds_for_target is None. discordance_rate = share of cells with a nonzero difference.
    When every estimated variance is 0 (e.g. both arms gave the same score on every question)
    there is no spread to size an effect against: se is 0, mde and seeds_for_target are None
    and "no_spread" is True (a comparison of identical answers tells nothing).

    Example: [[0, 0], [1, 1]]: var_seed 0.5, var_question = var_residual = 0, SE 0.5,
    MDE 1.4008; seeds for 2 points = ceil(0.5 / (0.02 / 2.8016)^2) = 9812.
    """
    if not (0.0 < alpha < 1.0 and 0.0 < power < 1.0 and target > 0):
        raise ValueError(f"design_power: alpha={alpha}, power={power} must lie in (0, 1) and "
                         f"target={target} must be > 0")
    d = _table(diffs)
    s, q = d.shape
    z = float(st.norm.ppf(1 - alpha / 2) + st.norm.ppf(power))
    out: dict[str, Any] = {"n_seeds": int(s), "n_questions": int(q), "alpha": alpha,
                           "power": power, "z": z, "target": target,
                           "discordance_rate": float(np.mean(d != 0)),
                           "var_seed": None, "var_question": None, "var_residual": None,
                           "se": None, "mde": None, "seeds_for_target": None,
                           "no_spread": False}
    if q < 2:
        return out  # one question: no variance across questions can be estimated
    if s == 1:
        se = math.sqrt(float(np.var(d[0], ddof=1)) / q)
        out.update(se=se, mde=z * se if se > 0 else None, no_spread=se == 0)
        return out
    grand = d.mean()
    rows, cols = d.mean(axis=1), d.mean(axis=0)  # (S,), (Q,)
    ms_seed = q * float(np.sum((rows - grand) ** 2)) / (s - 1)
    ms_question = s * float(np.sum((cols - grand) ** 2)) / (q - 1)
    resid = d - rows[:, None] - cols[None, :] + grand  # (S, Q)
    ms_resid = float(np.sum(resid ** 2)) / ((s - 1) * (q - 1))
    v_seed = max(0.0, (ms_seed - ms_resid) / q)
    v_question = max(0.0, (ms_question - ms_resid) / s)
    v_resid = ms_resid
    se = math.sqrt(v_seed / s + v_question / q + v_resid / (s * q))
    out.update(var_seed=v_seed, var_question=v_question, var_residual=v_resid, se=se,
               mde=z * se if se > 0 else None, no_spread=se == 0)
    if se == 0:
        return out
    room = (target / z) ** 2 - v_question / q
    if room > 0:
        need = (v_seed + v_resid / q) / room
        # A tiny tolerance so that exactly-on-the-boundary cases do not round up a seed.
        out["seeds_for_target"] = max(1, math.ceil(need - 1e-9))
    return out


# ------------------------------------------------------------------ arms x seeds x questions


def _seed_order(seed: str) -> tuple[int, int | str]:
    return (0, int(seed)) if seed.lstrip("-").isdigit() else (1, seed)


def _aligned(where: str, base: dict[str, float], other: dict[str, float]) -> list[str]:
    if set(base) != set(other):
        only_b, only_a = sorted(set(base) - set(other)), sorted(set(other) - set(base))
        raise ValueError(f"{where}: the arms answered different questions ({len(only_b)} only "
                         f"in the baseline, e.g. {only_b[:3]}; {len(only_a)} only in the arm, "
                         f"e.g. {only_a[:3]}); evaluate every arm on the same file and --limit")
    return list(base)  # the baseline's question order


def per_question_summary(scores: Mapping[str, Mapping[str, Mapping[Any, Mapping[Any, float]]]],
                         baseline_arm: str | None, *, confidence: float = 0.95, n_boot: int = 2000,
                         seed: int = 0, target: float = 0.02) -> dict[str, Any]:
    """Per-question statistics of every arm against `baseline_arm`, task by task.

    `scores[task][arm][seed][question_id]` is that question's score in [0, 1] (seeds and ids
    are compared as strings; {} is returned when `baseline_arm` is None). Per task and arm (not the baseline), over the seeds both arms have:
    {"seeds", "unpaired_seeds", "per_seed" {seed: {"n", "accuracy_baseline", "accuracy_arm",
    "mean_diff", "mcnemar" (``mcnemar_exact``; None when some score is fractional),
    "bootstrap" (``paired_bootstrap``)}}, "cluster" (``cluster_bootstrap`` of the (seeds,
    questions) table), "design" (``design_power``)}; "cluster" and "design" are None without a
    paired seed. Bootstraps all use `seed`, so the summary is deterministic.
    Raises when the two arms of a seed, or two seeds, answered different questions.
    """
    out: dict[str, Any] = {}
    clean = {str(t): {str(a): {str(s): {str(q): float(v) for q, v in qs.items()}
                               for s, qs in seeds.items()} for a, seeds in arms.items()}
             for t, arms in scores.items()}
    for task, arms in clean.items():
        if baseline_arm not in arms:
            continue  # no baseline predictions for this task: nothing to pair with
        base = arms[baseline_arm]
        out[task] = {}
        for arm, seeds in arms.items():
            if arm == baseline_arm:
                continue
            paired = sorted(set(seeds) & set(base), key=_seed_order)
            entry: dict[str, Any] = {
                "seeds": paired, "per_seed": {}, "cluster": None, "design": None,
                "unpaired_seeds": sorted(set(seeds) ^ set(base), key=_seed_order)}
            table, ids0 = [], None
            for s in paired:
                ids = _aligned(f"{task}: arm {arm!r} seed {s}", base[s], seeds[s])
                if ids0 is not None and set(ids) != set(ids0):
                    raise ValueError(f"{task}: seed {s} scored other questions than seed "
                                     f"{paired[0]}; evaluate every seed on the same items")
                ids0 = ids0 or ids
                b = [base[s][i] for i in ids0]
                a = [seeds[s][i] for i in ids0]
                binary = all(v in (0.0, 1.0) for v in b + a)
                boot = paired_bootstrap(b, a, n_boot=n_boot, confidence=confidence, seed=seed)
                entry["per_seed"][s] = {
                    "n": len(ids0), "accuracy_baseline": sum(b) / len(b),
                    "accuracy_arm": sum(a) / len(a), "mean_diff": boot["mean_diff"],
                    "mcnemar": mcnemar_exact(b, a) if binary else None, "bootstrap": boot}
                table.append([x - y for x, y in zip(a, b, strict=True)])
            if table:
                entry["cluster"] = cluster_bootstrap(table, n_boot=n_boot,
                                                     confidence=confidence, seed=seed)
                entry["design"] = design_power(table, alpha=1 - confidence, target=target)
            out[task][arm] = entry
    return out
