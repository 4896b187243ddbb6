"""W&B for ``attanchor compare``: the per-arm summary table and report.png, in the arms' group.

Every arm's training run is logged to the W&B group ``run.name`` (``attanchor.train.cli``).
``log_comparison`` adds one more run to that group, job type ``compare``, holding the summary
as a ``wandb.Table`` (``compare/summary``, one row per metric and arm), the report figure as a
``wandb.Image`` (``compare/report``, plus any extra figures such as the accuracy curves) and
each row's mean and difference in the run summary (``<metric>/<arm>/mean``), so the group's
page shows the comparison beside the curves. Offline unless ``WANDB_MODE`` says otherwise
(sync later with ``wandb sync``). W&B is never required: wandb missing, or failing anywhere,
gives one warning and ``None``; compare goes on. Example::

    summary_rows(summarize_arms({"none": {0: {"pope/f1": 0.5}},
                                 "text_into_image": {0: {"pope/f1": 0.75}}}))
    -> [{"metric": "pope/f1", "arm": "none", "n": 1, "mean": 0.5, "sd": None,
         "diff": None, "ci_low": None, "ci_high": None},
        {"metric": "pope/f1", "arm": "text_into_image", "n": 1, "mean": 0.75, "sd": None,
         "diff": 0.25, "ci_low": None, "ci_high": None}]
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLUMNS = ("metric", "arm", "n", "mean", "sd", "diff", "ci_low", "ci_high")


def summary_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``report.summarize_arms``'s summary -> one row per (metric, arm), in ``COLUMNS``:
    ``diff`` is the paired mean difference to the baseline arm (None for the baseline and
    when nothing pairs), ``ci_low``/``ci_high`` its interval (None with one seed)."""
    rows = []
    for metric, per_arm in summary["metrics"].items():
        for arm, e in per_arm.items():
            d = e.get("diff") or {}
            rows.append({"metric": metric, "arm": arm, "n": e["n"], "mean": e["mean"],
                         "sd": e["sd"], "diff": d.get("mean_diff"), "ci_low": d.get("ci_low"),
                         "ci_high": d.get("ci_high")})
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``COLUMNS`` first (those present), then any other key in order of first appearance."""
    seen = dict.fromkeys(k for r in rows for k in r)
    return [c for c in COLUMNS if c in seen] + [k for k in seen if k not in COLUMNS]


def log_comparison(group: str, summary_rows: Sequence[Mapping[str, Any]],
                   report_png: Path | None, *, project: str = "attanchor",
                   save_dir: Path | None = None, images: Mapping[str, Path] | None = None,
                   name: str | None = None) -> Path | None:
    """Log the comparison to a ``compare`` run of W&B group ``group``; return its local run
    directory (``<save_dir>/wandb/offline-run-*`` offline), or None when W&B is unavailable or
    failed (one warning, never an exception).

    Args:
        group: the arms' W&B group (the recipe's ``run.name``).
        summary_rows: one mapping per row (``summary_rows(summary)``); the table's columns are
            ``COLUMNS`` first, then any other key.
        report_png: compare's report.png, logged as ``compare/report``; a missing file is
            warned about and skipped (the table is still logged).
        save_dir: where W&B writes (None: ``WANDB_DIR`` or the working directory).
        images: more figures, ``{key: png}``, logged as ``compare/<key>``.
        name: the run's name (default ``<group>-compare``).
    """
    try:
        import wandb
    except ImportError:
        warnings.warn("wandb is not installed: the comparison is not logged to W&B "
                      "(pip install wandb)", stacklevel=2)
        return None
    figures = {"report": report_png, **dict(images or {})}
    missing = [f"{k}={p}" for k, p in figures.items() if p is not None and not Path(p).is_file()]
    figures = {k: Path(p) for k, p in figures.items() if p is not None and Path(p).is_file()}
    run = None
    try:
        columns = _columns(summary_rows)
        table = wandb.Table(columns=columns,
                            data=[[r.get(c) for c in columns] for r in summary_rows])
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, group=group, name=name or f"{group}-compare",
                         job_type="compare", dir=None if save_dir is None else str(save_dir),
                         mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new")
        payload: dict[str, Any] = {"compare/summary": table}
        payload.update({f"compare/{k}": wandb.Image(str(p)) for k, p in figures.items()})
        run.log(payload)
        for r in summary_rows:
            if "metric" in r and "arm" in r:
                for field in ("mean", "diff"):
                    if r.get(field) is not None:
                        run.summary[f"{r['metric']}/{r['arm']}/{field}"] = r[field]
        run_dir = Path(run.dir).parent  # run.dir is <run directory>/files
        run.finish()
        run = None
    except Exception as exc:  # W&B must never break a comparison
        warnings.warn(f"W&B logging of the comparison failed ({type(exc).__name__}: {exc}); "
                      "the report files are unaffected", stacklevel=2)
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: S110  (already warned; nothing more to do)
                pass
        return None
    if missing:
        warnings.warn(f"W&B: figure(s) {missing} do not exist and were not logged",
                      stacklevel=2)
    return run_dir
