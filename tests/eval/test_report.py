"""Paired statistics against hand-computed values; the report's three files and their structure."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from attanchor.eval.report import flatten_metrics, format_table, summarize_arms, write_report
from attanchor.eval.stats import paired_difference, student_t_cdf, student_t_quantile


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_closed_forms(p: float) -> None:
    # df = 1 is the Cauchy distribution; df = 2 has t = (2p - 1) / sqrt(2 p (1 - p)).
    assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)),
                                                     rel=1e-10)


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    # Standard t-table values (9 significant digits).
    [(0.975, 4, 2.77644511), (0.975, 9, 2.26215716), (0.975, 30, 2.04227246),
     (0.995, 3, 5.84090931), (0.95, 5, 2.01504837)],
)
def test_t_quantile_table(p: float, df: int, expected: float) -> None:
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=2e-8)


def test_t_quantile_symmetry_and_cdf_roundtrip() -> None:
    assert student_t_quantile(0.5, 3) == 0.0
    assert student_t_quantile(0.025, 4) == pytest.approx(-student_t_quantile(0.975, 4))
    assert student_t_cdf(student_t_quantile(0.8, 7), 7) == pytest.approx(0.8, abs=1e-12)
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    with pytest.raises(ValueError, match="must lie in"):
        student_t_quantile(1.0, 3)


def test_paired_difference_two_seeds() -> None:
    d = paired_difference([0.5, 0.6], [0.6, 0.8])
    # diffs 0.1, 0.2: mean 0.15, sd sqrt(0.005) = 0.070711, se 0.05, t_{0.975,1} = 12.7062
    assert d["n"] == 2
    assert d["mean_diff"] == pytest.approx(0.15)
    assert d["sd_diff"] == pytest.approx(math.sqrt(0.005))
    assert d["se"] == pytest.approx(0.05)
    assert d["t_quantile"] == pytest.approx(12.7062047, rel=1e-8)
    assert d["ci_low"] == pytest.approx(0.15 - 12.7062047 * 0.05, rel=1e-7)
    assert d["ci_high"] == pytest.approx(0.15 + 12.7062047 * 0.05, rel=1e-7)
    # t statistic = 3, df 1: p = 2 (1 - (1/2 + atan(3)/pi))
    assert d["p_value"] == pytest.approx(1 - 2 * math.atan(3) / math.pi)
    assert (d["mean_baseline"], d["mean_arm"]) == (pytest.approx(0.55), pytest.approx(0.7))


def test_paired_difference_one_seed_has_no_ci() -> None:
    d = paired_difference([0.5], [0.7])
    assert d["mean_diff"] == pytest.approx(0.2)
    assert all(d[k] is None for k in ("sd_diff", "se", "t_quantile", "ci_low", "ci_high",
                                      "p_value"))


def test_paired_difference_zero_spread() -> None:
    d = paired_difference([0.5, 0.6, 0.7], [0.6, 0.7, 0.8])
    assert d["sd_diff"] == pytest.approx(0.0, abs=1e-12)
    assert d["ci_low"] == pytest.approx(0.1) and d["ci_high"] == pytest.approx(0.1)


def test_paired_difference_bad_input() -> None:
    with pytest.raises(ValueError, match="2 baseline values but 1 arm"):
        paired_difference([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match=r"arm\[0\] = nan"):
        paired_difference([0.1], [float("nan")])
    with pytest.raises(ValueError, match="no values"):
        paired_difference([], [])


RESULTS = {
    "text_into_image": {0: {"acc": 0.6, "f1": 0.45}, 1: {"acc": 0.8, "f1": 0.5}},
    "none": {0: {"acc": 0.5, "f1": 0.4}, 1: {"acc": 0.6, "f1": 0.5}},
    "random": {"0": {"acc": 0.55}, "2": {"acc": 0.65}},
}


def test_summarize_arms_structure_and_values() -> None:
    s = summarize_arms(RESULTS)
    assert s["arms"] == ["none", "text_into_image", "random"]  # baseline first
    assert s["seeds"] == {"none": ["0", "1"], "text_into_image": ["0", "1"], "random": ["0", "2"]}
    acc = s["metrics"]["acc"]
    assert acc["none"]["mean"] == pytest.approx(0.55)
    assert acc["none"]["sd"] == pytest.approx(math.sqrt(0.005))
    assert acc["none"]["diff"] is None
    tii = acc["text_into_image"]
    assert tii["values"] == {"0": 0.6, "1": 0.8}
    assert tii["diff"]["mean_diff"] == pytest.approx(0.15)
    assert tii["diff"]["seeds"] == ["0", "1"] and tii["diff"]["unpaired_seeds"] == []
    rnd = acc["random"]
    assert rnd["diff"]["seeds"] == ["0"] and rnd["diff"]["unpaired_seeds"] == ["1", "2"]
    assert rnd["diff"]["mean_diff"] == pytest.approx(0.05) and rnd["diff"]["ci_low"] is None
    f1 = s["metrics"]["f1"]["random"]
    assert (f1["n"], f1["mean"], f1["missing_seeds"], f1["diff"]) == (0, None, ["0", "2"], None)


def test_summarize_arms_errors() -> None:
    with pytest.raises(ValueError, match="baseline arm 'none' is not among"):
        summarize_arms({"a": {0: {"x": 1.0}}})
    with pytest.raises(ValueError, match=r"results\['a'\]\[0\]\['x'\]"):
        summarize_arms({"a": {0: {"x": float("inf")}}}, baseline_arm=None)
    with pytest.raises(ValueError, match="flatten_metrics"):
        summarize_arms({"a": {0: 3.0}}, baseline_arm=None)
    with pytest.raises(ValueError, match=r"metrics \['y'\] appear in no arm"):
        summarize_arms({"a": {0: {"x": 1.0}}}, baseline_arm=None, metrics=["y"])


def test_flatten_metrics() -> None:
    nested = {"pope": {"f1": 0.8, "n": 4, "per_category": {"random": {"f1": 0.9}}}, "note": "x"}
    assert flatten_metrics(nested) == {"pope/f1": 0.8, "pope/n": 4.0,
                                       "pope/per_category/random/f1": 0.9}


def test_format_table_lists_every_arm_and_value() -> None:
    table = format_table(summarize_arms(RESULTS))
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["arm", "n"]
    assert "[-0.4853, +0.7853]" in table  # 0.15 -+ 12.706 * 0.05
    assert "n/a (1 seed)" in table
    assert sum(line.strip().startswith("text_into_image") for line in lines) == 2


def test_write_report_two_arms_one_seed(tmp_path) -> None:
    results = {"none": {0: {"pope/accuracy": 0.5}}, "text_into_image": {0: {"pope/accuracy": 0.7}}}
    curves = {"none": {0: [(0, 2.0), (1, 1.5)]}, "text_into_image": {0: [(0, 2.1), (1, 1.4)]}}
    paths = write_report(tmp_path / "cmp", results, curves)
    assert set(paths) == {"report_md", "report_png", "metrics_json"}
    md = paths["report_md"].read_text()
    assert "no confidence interval" in md and "## pope/accuracy" in md
    assert "| text_into_image | 1 | 0.7000 | 0: 0.7000 | +0.2000 | n/a (1 seed) | - |" in md
    data = json.loads(paths["metrics_json"].read_text())
    assert data["results"] == {"none": {"0": {"pope/accuracy": 0.5}},
                               "text_into_image": {"0": {"pope/accuracy": 0.7}}}
    diff = data["summary"]["metrics"]["pope/accuracy"]["text_into_image"]["diff"]
    assert diff["mean_diff"] == pytest.approx(0.2) and diff["ci_low"] is None
    with Image.open(paths["report_png"]) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_write_report_many_seeds_mentions_t(tmp_path) -> None:
    curves = {a: {s: [(i, 1.0 / (i + 1)) for i in range(5)] for s in (0, 1)} for a in RESULTS}
    paths = write_report(tmp_path, RESULTS, curves, metrics=["acc"])
    md = paths["report_md"].read_text()
    assert "1 degree of freedom (t = 12.71)" in md
    assert "## f1" not in md  # filtered
    assert "seeds ['1', '2'] are unpaired" in md


def test_write_report_rejects_bad_curves(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"curves\['none'\]\[0\]\[1\]"):
        write_report(tmp_path, RESULTS, {"none": {0: [(0, 1.0), (1,)]}})
