"""report.png: the loss curves of every arm and seed and one bar panel per metric.

``plot_report(summary, curves, out_png)`` draws ``attanchor.eval.report.summarize_arms``'
summary (bars: mean, sd error bar, per-seed dots) beside ``curves[arm][seed] -> [(step,
loss)]``; ``check_curves`` raises naming the first malformed point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def check_curves(curves: Mapping[str, Mapping[Any, Sequence[Sequence[float]]]]) -> None:
    for arm, seeds in curves.items():
        for seed, points in seeds.items():
            for i, point in enumerate(points):
                if len(point) != 2 or not all(isinstance(x, int | float) for x in point):
                    raise ValueError(f"curves[{arm!r}][{seed!r}][{i}] = {point!r}: expected "
                                     "(step, loss)")


def plot_report(summary: dict[str, Any], curves: Mapping[str, Mapping[Any, Sequence[Sequence[float]]]],
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
