"""Accuracy and loss curves per arm from hand-written metrics.csv files."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from attanchor.eval.curves import curves_figure, plot_curves, read_curves

# Lightning's CSV layout: one row per logging call, empty cells for keys not logged then.
ANCHORED = """step,train/loss,val/loss,val/pope_acc,val/vqa_acc
0,2.5,,,
2,,1.9,0.5,0.25
4,1.1,,,
5,,1.6,0.625,0.375
"""
# A resumed run: the first part before the resume, then the current file; step 5 was logged
# again after the resume and keeps its latest value.
BASELINE_PART = """step,val/loss,val/pope_acc
2,2.0,0.5
5,1.8,0.5
"""
BASELINE = """step,val/loss,val/pope_acc
5,1.7,0.75
8,1.5,0.875
"""
# An arm trained without evaluation during training: loss only.
LOSS_ONLY = """step,val/loss
2,2.2
"""


def arms(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name for name in ("text_into_image-seed0", "none-seed0", "old")}
    for d in dirs.values():
        d.mkdir()
    (dirs["text_into_image-seed0"] / "metrics.csv").write_text(ANCHORED)
    (dirs["none-seed0"] / "metrics.part1.csv").write_text(BASELINE_PART)
    (dirs["none-seed0"] / "metrics.csv").write_text(BASELINE)
    (dirs["old"] / "metrics.csv").write_text(LOSS_ONLY)
    return dirs


def test_read_curves_per_key_and_arm(tmp_path):
    curves = read_curves(arms(tmp_path), ("val/loss", "val/pope_acc", "val/vqa_acc",
                                          "val/pope_f1"))
    assert list(curves) == ["val/loss", "val/pope_acc", "val/vqa_acc"]  # f1: nobody logged it
    assert curves["val/loss"] == {"text_into_image-seed0": [(2.0, 1.9), (5.0, 1.6)],
                                  "none-seed0": [(2.0, 2.0), (5.0, 1.7), (8.0, 1.5)],
                                  "old": [(2.0, 2.2)]}
    assert curves["val/pope_acc"] == {"text_into_image-seed0": [(2.0, 0.5), (5.0, 0.625)],
                                      "none-seed0": [(2.0, 0.5), (5.0, 0.75), (8.0, 0.875)]}
    assert curves["val/vqa_acc"] == {"text_into_image-seed0": [(2.0, 0.25), (5.0, 0.375)]}


def test_figure_plots_exactly_those_points(tmp_path):
    curves = read_curves(arms(tmp_path), ("val/loss", "val/pope_acc"))
    fig = curves_figure(curves)
    loss_ax, pope_ax = fig.axes
    assert (loss_ax.get_title(), pope_ax.get_title()) == ("val/loss", "val/pope_acc")
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
             for ln in pope_ax.get_lines()}
    assert lines == {"text_into_image-seed0": ([2.0, 5.0], [0.5, 0.625]),
                     "none-seed0": ([2.0, 5.0, 8.0], [0.5, 0.75, 0.875])}
    # An arm keeps its colour across panels.
    colour = {ln.get_label(): ln.get_color() for ln in loss_ax.get_lines()}
    assert all(colour[ln.get_label()] == ln.get_color() for ln in pope_ax.get_lines())


def test_plot_curves_writes_a_png(tmp_path):
    out = plot_curves(arms(tmp_path), tmp_path / "out" / "curves.png",
                      keys=("val/loss", "val/pope_acc", "val/vqa_acc"))
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (1350, 350)  # 3 panels x 4.5 in x 100 dpi, 3.5 in high


def test_missing_csv_and_no_key_fail_loudly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="'empty'"):
        read_curves({"empty": tmp_path / "empty"})
    with pytest.raises(ValueError, match="no arm logged"):
        plot_curves({"old": arms(tmp_path)["old"]}, tmp_path / "x.png", keys=("val/pope_acc",))
