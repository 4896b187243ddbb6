"""`attanchor reproduce`: a finished run re-trained from its config.yaml matches bit for bit on
a CPU, and a changed metric, weight, data file or package version is named."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from attanchor.cli import main as attanchor
from attanchor.train.reproduce import compare_metrics, compare_runs, metrics_table
from tests.train.test_cli import fit

STEPS = ("--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
         "--trainer.val_check_interval", "4", "--run.wandb", "false")


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    """One original run of the demo recipe (4 steps) and its reproduction."""
    root = tmp_path_factory.mktemp("reproduce")
    fit(tiny_world, root / "runs", *STEPS)
    original = root / "runs" / "demo" / "text_into_image-seed0"
    code = attanchor(["reproduce", str(original), "--out", str(root / "again")])
    return {"original": original, "new": root / "again" / "demo" / "text_into_image-seed0",
            "code": code, "root": root}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("wandb"))
    return dst


def test_reproduction_matches_bit_for_bit(runs):
    assert runs["code"] == 0
    verdict = json.loads((runs["new"] / "reproduce.json").read_text())
    assert verdict["match"] is True
    assert verdict["rtol"] == 0.0 and verdict["atol"] == 0.0  # CPU: bit-identical
    table = metrics_table(runs["original"])
    assert sorted(s for s, k in table if k == "train/loss") == [0, 1, 2, 3]
    assert (3, "val/loss") in table
    assert not any(k.endswith("_per_s") for _, k in table)  # wall-clock rates are not compared
    assert verdict["metrics_compared"] == len(table)
    assert verdict["weight_diffs"] == [] and verdict["env_diffs"] == []


def test_a_changed_metric_is_named_with_its_step(runs, tmp_path, capsys):
    edited = copy_run(runs["original"], tmp_path / "edited")
    rows = list(csv.DictReader(open(edited / "metrics.csv", newline="")))
    row = next(r for r in rows if r["step"] == "2" and r.get("train/loss"))
    row["train/loss"] = repr(float(row["train/loss"]) + 1e-7)
    with open(edited / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code = attanchor(["reproduce", str(edited), "--against", str(runs["new"])])
    assert code == 1
    verdict = json.loads((runs["new"] / "reproduce.json").read_text())
    assert [(d["step"], d["key"]) for d in verdict["metric_diffs"]] == [(2, "train/loss")]
    out = capsys.readouterr().out
    assert out.startswith("MISMATCH") and "metric train/loss at step 2" in out
    # The same difference passes a tolerance that covers it (what --rtol is for on a GPU).
    assert compare_runs(edited, runs["new"], rtol=1e-3)["metric_diffs"] == []


def test_a_changed_package_version_and_data_file_are_named(runs, tmp_path):
    edited = copy_run(runs["original"], tmp_path / "edited")
    env = json.loads((edited / "env.json").read_text())
    env["packages"]["transformers"] = "5.0.0"
    data = next(iter(env["data_files"]))
    env["data_files"][data]["sha256"] = "0" * 64
    (edited / "env.json").write_text(json.dumps(env))
    verdict = compare_runs(edited, runs["new"])
    assert verdict["match"] is False and verdict["metric_diffs"] == []
    import transformers

    assert {"what": "package", "name": "transformers", "original": "5.0.0",
            "now": transformers.__version__} in verdict["env_diffs"]
    assert [d["name"] for d in verdict["env_diffs"] if d["what"] == "data"] == [data]


def test_a_changed_weight_is_named(runs, tmp_path):
    edited = copy_run(runs["original"], tmp_path / "edited")
    path = edited / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    name = sorted(ckpt["state_dict"])[0]
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1e-6
    torch.save(ckpt, path)
    diffs = compare_runs(edited, runs["new"])["weight_diffs"]
    assert [d["tensor"] for d in diffs] == [name]


def test_compare_metrics_golden():
    a = {(0, "train/loss"): "1.0", (1, "train/loss"): "0.5", (1, "val/loss"): "nan"}
    b = {(0, "train/loss"): "1.0", (1, "train/loss"): "0.5005", (1, "val/loss"): "nan",
         (2, "train/loss"): "0.4"}
    assert compare_metrics(a, b) == [
        {"step": 1, "key": "train/loss", "original": "0.5", "reproduced": "0.5005"},
        {"step": 2, "key": "train/loss", "original": None, "reproduced": "0.4"}]
    assert [d["step"] for d in compare_metrics(a, b, rtol=1e-3)] == [2]


def test_metrics_table_reads_resume_parts_latest_value_wins(tmp_path):
    (tmp_path / "metrics.part1.csv").write_text("step,train/loss\n0,1.0\n1,0.9\n")
    (tmp_path / "metrics.csv").write_text("step,train/loss,train/tokens_per_s\n1,0.8,99\n2,0.7,98\n")
    assert metrics_table(tmp_path) == {(0, "train/loss"): "1.0", (1, "train/loss"): "0.8",
                                       (2, "train/loss"): "0.7"}


def test_reproduce_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        attanchor(["reproduce", str(tmp_path)])
    assert "no config.yaml" in capsys.readouterr().err
