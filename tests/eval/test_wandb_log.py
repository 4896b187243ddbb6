"""W&B logging of a comparison, offline: the table, the figures and the summary are read back
from the offline run's files (the table's JSON, the media files, the run's record log)."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from attanchor.eval.report import summarize_arms
from attanchor.eval.wandb_log import COLUMNS, log_comparison, summary_rows

RESULTS = {"none": {0: {"pope/f1": 0.5}, 1: {"pope/f1": 0.75}},
           "text_into_image": {0: {"pope/f1": 0.75}, 1: {"pope/f1": 0.875}}}


def run_records(run_dir: Path) -> list:
    """The protobuf records of an offline run's ``run-<id>.wandb``: W&B's 7-byte header, then
    LevelDB's log format (32 KiB blocks; records of crc32, length, type, data; type 1 a whole
    record, 2/3/4 its first/middle/last fragments)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def finished_records(run_dir: Path) -> list:
    """``run_records`` once W&B's writer has flushed the run's exit record: ``finish()`` can
    return before wandb-core's writer reaches the disk on a loaded machine."""
    for _ in range(300):
        records = run_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        time.sleep(0.1)
    raise AssertionError(f"{run_dir}: no exit record was written")


def png(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (4, 3), colour).save(path)
    return path


def test_summary_rows_from_summarize_arms():
    rows = summary_rows(summarize_arms(RESULTS, "none"))
    assert [(r["metric"], r["arm"], r["n"]) for r in rows] == [("pope/f1", "none", 2),
                                                              ("pope/f1", "text_into_image", 2)]
    base, arm = rows
    assert base["mean"] == 0.625 and arm["mean"] == 0.8125  # (0.5+0.75)/2, (0.75+0.875)/2
    assert base["diff"] is None and base["ci_low"] is None
    assert arm["diff"] == 0.1875  # seed diffs 0.25 and 0.125
    assert arm["ci_low"] < 0.1875 < arm["ci_high"]
    assert list(base) == list(COLUMNS)


def test_offline_run_holds_table_figures_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    rows = summary_rows(summarize_arms(RESULTS, "none"))
    report = png(tmp_path / "report.png", (255, 0, 0))
    curves = png(tmp_path / "curves.png", (0, 0, 255))
    run_dir = log_comparison("demo", rows, report, save_dir=tmp_path / "cmp",
                             images={"curves": curves})
    assert run_dir is not None and run_dir.parent == tmp_path / "cmp" / "wandb"
    assert run_dir.name.startswith("offline-run-")
    (table,) = (run_dir / "files" / "media" / "table" / "compare").glob("summary_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == list(COLUMNS)
    assert [row[:4] for row in logged["data"]] == [["pope/f1", "none", 2, 0.625],
                                                   ["pope/f1", "text_into_image", 2, 0.8125]]
    assert logged["data"][1][5] == 0.1875
    media = run_dir / "files" / "media" / "images" / "compare"
    (rep,), (cur,) = media.glob("report_*.png"), media.glob("curves_*.png")
    assert Image.open(rep).getpixel((0, 0)) == (255, 0, 0)
    assert Image.open(cur).getpixel((3, 2)) == (0, 0, 255)
    records = finished_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.job_type, run.display_name) == ("demo", "compare", "demo-compare")
    summary = {u.key: json.loads(u.value_json) for r in records
               if r.WhichOneof("record_type") == "summary" for u in r.summary.update if u.key}
    assert summary["pope/f1/none/mean"] == 0.625
    assert summary["pope/f1/text_into_image/mean"] == 0.8125
    assert summary["pope/f1/text_into_image/diff"] == 0.1875
    assert "pope/f1/none/diff" not in summary  # the baseline has no difference


def test_missing_figure_warns_once_and_logs_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.warns(UserWarning, match="do not exist") as caught:
        run_dir = log_comparison("demo", [{"metric": "m", "arm": "a", "mean": 1.0}],
                                 tmp_path / "no-report.png", save_dir=tmp_path)
    assert len(caught) == 1
    (table,) = (run_dir / "files" / "media" / "table" / "compare").glob("*.table.json")
    assert json.loads(table.read_text()) == {"columns": ["metric", "arm", "mean"],
                                             "data": [["m", "a", 1.0]]}


def test_wandb_missing_or_failing_only_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.warns(UserWarning, match="not installed"):
        assert log_comparison("demo", [], None, save_dir=tmp_path) is None
    monkeypatch.delitem(sys.modules, "wandb")
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")  # wandb.init rejects it
    with pytest.warns(UserWarning, match="W&B logging of the comparison failed") as caught:
        assert log_comparison("demo", [{"arm": "a"}], None, save_dir=tmp_path) is None
    assert len(caught) == 1
