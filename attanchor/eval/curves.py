"""Curves per arm from each arm's metrics.csv: validation loss and, with evaluation during
training (``attanchor.eval.val_generation``), POPE / VQA accuracy, one panel per metric.

Each arm directory is a run directory (``runs/<name>/<strategy>-seed<k>/``); its curve is read
with ``compare.loss_curve``, so the parts written before a resume (``metrics.partK.csv``) are
the start of the curve and a step logged twice keeps its latest value. Example::

    metrics.csv of arm "none-seed0"      read_curves(...)["val/pope_acc"]["none-seed0"]
    step,val/loss,val/pope_acc           [(2.0, 0.5), (5.0, 0.625)]
    2,1.9,0.5
    5,1.6,0.625

A panel is drawn for every key some arm logged; an arm that never logged a key has no line
in that panel (not a line of zeros).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attanchor.eval.compare import loss_curve

DEFAULT_KEYS = ("val/loss", "val/pope_acc", "val/pope_f1", "val/vqa_acc")
Series = list[tuple[float, float]]


def read_curves(arm_dirs: Mapping[str, Path], keys: Sequence[str] = DEFAULT_KEYS
                ) -> dict[str, dict[str, Series]]:
    """``{key: {arm: [(step, value), ...]}}`` for the keys and arms that have points, keys and
    arms in the given order. Raises FileNotFoundError naming an arm without metrics.csv."""
    out: dict[str, dict[str, Series]] = {}
    for arm, run_dir in arm_dirs.items():
        csv_path = Path(run_dir) / "metrics.csv"
        if not csv_path.exists():
            raise FileNotFoundError(f"curves: arm {arm!r} has no {csv_path} (was it trained?)")
    for key in keys:
        per_arm = {arm: loss_curve(Path(d) / "metrics.csv", key) for arm, d in arm_dirs.items()}
        per_arm = {arm: s for arm, s in per_arm.items() if s}
        if per_arm:
            out[key] = per_arm
    return out


def curves_figure(curves: Mapping[str, Mapping[str, Series]]) -> Any:
    """A matplotlib Figure (Agg) with one panel per key, one line per arm (the same colour
    for an arm in every panel), x the training step."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("curves: no arm logged any of the keys; nothing to plot")
    arms = list(dict.fromkeys(a for per_arm in curves.values() for a in per_arm))
    colours = {a: f"C{i % 10}" for i, a in enumerate(arms)}
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.5), squeeze=False)
    for ax, (key, per_arm) in zip(axes[0], curves.items()):
        for arm, series in per_arm.items():
            steps, values = zip(*series)
            ax.plot(steps, values, marker="o", markersize=3, label=arm, color=colours[arm])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_curves(arm_dirs: Mapping[str, Path], out_png: Path,
                keys: Sequence[str] = DEFAULT_KEYS) -> Path:
    """Write ``out_png`` with the curves of ``keys`` for every arm; return its path.

    Raises FileNotFoundError for an arm without metrics.csv and ValueError when no arm logged
    any key (e.g. accuracy keys of runs trained without ``ValGenerationCallback``)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(read_curves(arm_dirs, keys))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
