"""Per-question paired statistics against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from attanchor.eval.report import read_question_scores, write_report
from attanchor.eval.stats import (
    cluster_bootstrap,
    design_power,
    mcnemar_exact,
    paired_bootstrap,
    per_question_summary,
)

Z = 1.959963984540054 + 0.8416212335729143  # z_{0.975} + z_{0.8}


def _pairs(b: int, c: int, same_right: int = 0, same_wrong: int = 0) -> tuple[list, list]:
    """Baseline / arm 0-1 scores with b (base right, arm wrong) and c (the reverse)."""
    base = [1] * b + [0] * c + [1] * same_right + [0] * same_wrong
    arm = [0] * b + [1] * c + [1] * same_right + [0] * same_wrong
    return base, arm


def test_mcnemar_exact_golden() -> None:
    m = mcnemar_exact(*_pairs(1, 9, same_right=5, same_wrong=3))
    assert (m["n"], m["b"], m["c"], m["discordant"]) == (18, 1, 9, 10)
    assert m["p_value"] == pytest.approx(22 / 1024, abs=1e-15)  # 2 (1 + 10) / 2^10
    # Symmetric in b and c; b = c gives p = 1; b = 0, c = 5: 2 / 32.
    assert mcnemar_exact(*_pairs(9, 1))["p_value"] == pytest.approx(22 / 1024, abs=1e-15)
    assert mcnemar_exact(*_pairs(3, 3))["p_value"] == pytest.approx(1.0)
    assert mcnemar_exact(*_pairs(0, 5))["p_value"] == pytest.approx(1 / 16, abs=1e-15)
    assert mcnemar_exact(*_pairs(0, 0, same_right=4))["p_value"] == 1.0  # nothing discordant


def test_mcnemar_exact_rejects_fractional_and_unpaired() -> None:
    with pytest.raises(ValueError, match="baseline score 0.3 at question 1 is not 0 or 1"):
        mcnemar_exact([1, 0.3], [1, 1])
    with pytest.raises(ValueError, match="3 baseline scores but 2 arm scores"):
        mcnemar_exact([1, 0, 1], [1, 0])


def test_paired_bootstrap_degenerate_and_two_point() -> None:
    # Every difference is +1/2: every replicate mean is 1/2, the interval a point.
    b = paired_bootstrap([0.0, 0.25, 0.5], [0.5, 0.75, 1.0])
    assert (b["mean_diff"], b["ci_low"], b["ci_high"]) == (0.5, 0.5, 0.5)
    # Differences [0, 1]: replicate means 0, 1/2, 1 with probability 1/4, 1/2, 1/4.
    wide = paired_bootstrap([0, 0], [0, 1])
    assert (wide["ci_low"], wide["ci_high"]) == (0.0, 1.0)
    narrow = paired_bootstrap([0, 0], [0, 1], confidence=0.4)
    assert (narrow["ci_low"], narrow["ci_high"]) == (0.5, 0.5)
    assert (wide["n"], wide["n_boot"], wide["seed"]) == (2, 2000, 0)


def test_paired_bootstrap_is_deterministic_and_brackets_the_mean() -> None:
    base, arm = _pairs(10, 30, same_right=40, same_wrong=20)  # diff mean 0.2 over 100
    one, two = paired_bootstrap(base, arm), paired_bootstrap(base, arm)
    assert one == two
    assert one["mean_diff"] == pytest.approx(0.2)
    # The normal-approximation 95% interval is 0.2 -+ 1.96 * sd / 10, sd = sqrt(0.4 - 0.04)
    # = 0.6: [0.082, 0.318]; the percentile interval is within a Monte-Carlo step of it.
    assert one["ci_low"] == pytest.approx(0.2 - 1.96 * 0.06, abs=0.025)
    assert one["ci_high"] == pytest.approx(0.2 + 1.96 * 0.06, abs=0.025)


def test_cluster_bootstrap_golden() -> None:
    # Seed 0 helps on no question, seed 1 on both: only the seed draw matters; replicate
    # means 0, 1/2, 1 with probability 1/4, 1/2, 1/4.
    c = cluster_bootstrap([[0, 0], [1, 1]])
    assert (c["n_seeds"], c["n_questions"], c["mean_diff"]) == (2, 2, 0.5)
    assert (c["ci_low"], c["ci_high"]) == (0.0, 1.0)
    assert cluster_bootstrap([[0, 0], [1, 1]], confidence=0.4)["ci_low"] == 0.5
    # Every cell +0.1: a point interval. One seed: the same draws as paired_bootstrap.
    flat = cluster_bootstrap([[0.1] * 5] * 3)
    assert flat["ci_low"] == pytest.approx(0.1) and flat["ci_high"] == pytest.approx(0.1)
    one = cluster_bootstrap([[0, 1, 1, 0, 1]])
    assert one["mean_diff"] == pytest.approx(0.6) and 0.0 <= one["ci_low"] < 0.6 < one["ci_high"]
    with pytest.raises(ValueError, match=r"seeds have \[2, 3\] questions"):
        cluster_bootstrap([[0, 1], [0, 1, 1]])


def test_design_power_seed_variance_only() -> None:
    d = design_power([[0, 0], [1, 1]])
    assert d["z"] == pytest.approx(2.8015852, abs=1e-7)
    assert (d["var_seed"], d["var_question"], d["var_residual"]) == (0.5, 0.0, 0.0)
    assert d["se"] == pytest.approx(0.5)  # sqrt(0.5 / 2)
    assert d["mde"] == pytest.approx(0.5 * Z)
    assert d["seeds_for_target"] == math.ceil(0.5 / (0.02 / Z) ** 2) == 9812
    assert d["discordance_rate"] == 0.5


def test_design_power_one_seed_uses_question_variance() -> None:
    # 100 questions, 5 differences of +1 and 5 of -1: sample variance 10/99.
    row = [1] * 5 + [-1] * 5 + [0] * 90
    d = design_power([row])
    assert d["se"] == pytest.approx(math.sqrt(10 / 99 / 100))
    assert d["mde"] == pytest.approx(Z * math.sqrt(10 / 99 / 100))  # 0.0890
    assert d["seeds_for_target"] is None and d["discordance_rate"] == 0.1
    # Identical answers: nothing to size an effect against, not an MDE of 0.
    same = design_power([[0.0] * 50, [0.0] * 50])
    assert (same["se"], same["mde"], same["seeds_for_target"], same["no_spread"]) == \
        (0.0, None, None, True)
    assert design_power([[0.0] * 50])["no_spread"] is True


def test_design_power_question_variance_limits_what_seeds_can_do() -> None:
    # Two seeds identical: var_seed 0 and var_residual 0; var_question = sample var of the row.
    row = [1.0, -1.0] * 2  # mean 0, sample variance 4/3
    d = design_power([row, row])
    assert d["var_seed"] == 0.0 and d["var_residual"] == pytest.approx(0.0, abs=1e-15)
    assert d["var_question"] == pytest.approx(4 / 3)
    assert d["se"] == pytest.approx(math.sqrt(4 / 3 / 4))
    assert d["seeds_for_target"] is None  # 1/3 > (0.02 / z)^2: only more questions help
    # A pure seed effect: rows 0 and 0.2, so MS_seed = 4 * 2 * 0.1^2 / 1 = 0.08 and
    # var_seed = 0.08 / 4 = 0.02. For a 0.3 effect: 0.02 / (0.3 / z)^2 = 1.74 -> 2 seeds
    # (MDE with 2 seeds: z * sqrt(0.02 / 2) = 0.280; with 1: 0.396).
    d2 = design_power([[0.0] * 4, [0.2] * 4], target=0.3)
    assert d2["var_seed"] == pytest.approx(0.02)
    assert d2["mde"] == pytest.approx(Z * 0.1)
    assert d2["seeds_for_target"] == math.ceil(0.02 / (0.3 / Z) ** 2) == 2


def _rows(answers: list[str], preds: list[str]) -> str:
    return "".join(json.dumps({"id": f"q{i}", "prediction": p, "answer": a, "category": "random",
                               "anchors": 1}) + "\n"
                   for i, (a, p) in enumerate(zip(answers, preds, strict=True)))


def test_report_from_prediction_files(tmp_path) -> None:
    # 10 POPE questions, all "yes". Baseline answers "Yes." to 6; the arm, on seed 0, turns
    # 3 of the baseline's wrong answers right and 1 right one wrong (b = 1, c = 3); on seed 1
    # b = 0, c = 2.
    labels = ["yes"] * 10
    files = {("none", 0): ["Yes."] * 6 + ["No"] * 4, ("none", 1): ["Yes."] * 6 + ["No"] * 4,
             ("tii", 0): ["no"] + ["yes"] * 5 + ["yes"] * 3 + ["no"],
             ("tii", 1): ["yes"] * 6 + ["yes"] * 2 + ["no"] * 2}
    scores: dict = {"pope": {}}
    for (arm, seed), preds in files.items():
        path = tmp_path / f"{arm}{seed}.jsonl"
        path.write_text(_rows(labels, preds))
        scores["pope"].setdefault(arm, {})[seed] = read_question_scores(path, "pope")
    assert scores["pope"]["none"][0] == {f"q{i}": float(i < 6) for i in range(10)}
    results = {a: {s: {"pope/accuracy": sum(scores["pope"][a][s].values()) / 10} for s in (0, 1)}
               for a in ("none", "tii")}
    paths = write_report(tmp_path / "cmp", results, {}, "none", scores=scores)
    pq = json.loads(paths["metrics_json"].read_text())["per_question"]["pope"]["tii"]
    s0 = pq["per_seed"]["0"]
    assert (s0["mcnemar"]["b"], s0["mcnemar"]["c"]) == (1, 3)
    assert s0["mcnemar"]["p_value"] == pytest.approx(2 * 5 / 16)  # 2 P(X <= 1 | 4, 1/2)
    assert s0["accuracy_baseline"] == 0.6 and s0["accuracy_arm"] == 0.8
    assert pq["per_seed"]["1"]["mcnemar"]["p_value"] == pytest.approx(0.5)  # 2 * 1/4
    assert pq["cluster"]["mean_diff"] == pytest.approx(0.2)  # (0.2 + 0.2) / 2
    assert pq["design"]["n_seeds"] == 2 and pq["design"]["mde"] > 0
    md = paths["report_md"].read_text()
    assert "## pope: per-question statistics" in md
    assert "| tii | 0 | 0.6000 | 0.8000 | +0.2000 | 1 | 3 | 0.625 |" in md
    assert "| tii | all (cluster) |" in md
    assert "minimum detectable effect at alpha 0.05, power 0.8 is" in md


def test_per_question_summary_rejects_different_questions() -> None:
    scores = {"pope": {"none": {0: {"a": 1.0, "b": 0.0}}, "x": {0: {"a": 1.0, "c": 1.0}}}}
    with pytest.raises(ValueError, match="arm 'x' seed 0: the arms answered different"):
        per_question_summary(scores, "none")
    assert per_question_summary(scores, None) == {}
    vqa = {"vqa": {"none": {0: {"a": 0.3, "b": 1.0}}, "x": {0: {"a": 0.6, "b": 1.0}}}}
    entry = per_question_summary(vqa, "none")["vqa"]["x"]
    assert entry["per_seed"]["0"]["mcnemar"] is None  # fractional VQA scores: no McNemar
    assert entry["per_seed"]["0"]["mean_diff"] == pytest.approx(0.15)


def test_report_says_identical_answers_show_nothing(tmp_path) -> None:
    same = {f"q{i}": float(i % 2) for i in range(6)}
    scores = {"pope": {"none": {0: same}, "x": {0: dict(same)}}}
    results = {"none": {0: {"pope/accuracy": 0.5}}, "x": {0: {"pope/accuracy": 0.5}}}
    md = write_report(tmp_path, results, {}, "none", scores=scores)["report_md"].read_text()
    assert "| x | 0 | 0.5000 | 0.5000 | +0.0000 | 0 | 0 | 1 | [+0.0000, +0.0000] |" in md
    assert "no spread to size an effect against" in md
