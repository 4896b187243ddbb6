"""compare never lies about an arm (issue 11 item 7), with the faults injected: an arm whose
training fails (a bad per-arm setting) is reported as failed with its error and never
evaluated; an evaluation is redone when its data file, limit or checkpoint changes; the
reference checkpoint is its own row with per-question statistics against it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from attanchor.anchoring import AnchorConfig
from attanchor.eval.arm_state import read_status
from attanchor.eval.compare import REFERENCE, compare
from tests.conftest import world_overrides
from tests.eval.test_end_to_end import DEMO, FAST

# demo/anchored.yaml selects by top_fraction; adding a threshold is invalid for every
# anchoring arm ("set exactly one"), and ignored by `none`: one arm fails, one trains.
BAD = ["--model.anchor.threshold", "0.5"]
ERROR = ("ValueError: AnchorConfig: set exactly one of threshold and top_fraction (got "
         "threshold=0.5, top_fraction=0.1)")


def _run(world, out, pope, limit=8, **kw):
    logs: list[str] = []
    res = compare(DEMO, seeds=[0], strategies=["none", "text_into_image"],
                  evals={"pope": str(pope)}, image_root=str(world["images"]), limit=limit,
                  batch_size=8, reference=str(out / "reference"),
                  overrides=[*world_overrides(world, out / "runs"), *FAST, *BAD],
                  log=logs.append, **kw)
    return res, logs


@pytest.fixture(scope="module")
def faulty(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    shutil.copytree(tiny_world["model"], out / "reference")  # a baseline export: say so
    (out / "reference" / "anchor_config.json").write_text(
        json.dumps(AnchorConfig(strategy="none").to_dict()))
    pope = out / "pope.jsonl"
    shutil.copy(tiny_world["data"] / "pope.jsonl", pope)
    res, logs = _run(tiny_world, out, pope)
    return {"out": out, "pope": pope, "res": res, "logs": logs}


def test_a_failed_arm_is_reported_failed_and_not_evaluated(faulty):
    res, runs = faulty["res"], faulty["out"] / "runs" / "demo"
    assert set(res["failed"]) == {"text_into_image"}
    assert res["failed"]["text_into_image"][0].startswith(ERROR)
    assert set(res["results"]) == {"none", REFERENCE}  # the failed arm has no row of numbers
    assert not (runs / "text_into_image-seed0" / "eval").exists()
    assert read_status(runs / "text_into_image-seed0")["status"] == "failed"
    assert read_status(runs / "none-seed0") == {"status": "trained"}
    assert f"FAILED  text_into_image seed 0: {ERROR}" in res["table"]
    report = Path(res["paths"]["report_md"]).read_text()
    assert "## Failed arms" in report and f"| text_into_image | 0 | {ERROR}" in report
    saved = json.loads(Path(res["paths"]["metrics_json"]).read_text())
    assert saved["failed"]["text_into_image"]["0"].startswith(ERROR)


def test_the_reference_is_its_own_row_with_per_question_statistics(faulty):
    res, out = faulty["res"], faulty["out"]
    ref = json.loads((out / "runs" / "demo" / REFERENCE / "eval" / "pope" /
                      "metrics.json").read_text())
    assert res["results"][REFERENCE] == {0: {
        "pope/accuracy": ref["accuracy"], "pope/precision": ref["precision"],
        "pope/recall": ref["recall"], "pope/f1": ref["f1"], "pope/yes_ratio": ref["yes_ratio"],
        "pope/anchors_per_prompt": 0.0}}
    per_seed = res["per_question_reference"]["pope"]["none"]["per_seed"]["0"]
    assert per_seed["n"] == 8 and per_seed["accuracy_baseline"] == ref["accuracy"]
    assert "per-question statistics vs pretrained" in res["table"]
    (d, n), = res["differences"]["pope"][f"{REFERENCE} vs none"].values()
    assert n == 8 and 0 <= d <= 8


def test_changed_data_limit_or_checkpoint_re_evaluate_and_the_same_call_reuses(faulty,
                                                                             tiny_world):
    out, pope = faulty["out"], faulty["pope"]
    arm = out / "runs" / "demo" / "none-seed0"
    _, logs = _run(tiny_world, out, pope)  # nothing changed: both evaluations reused
    assert sum("reusing" in line for line in logs) == 2
    assert not any(line.startswith(f"[compare] training {arm}") for line in logs)
    # The failed arm is tried again (and fails again), never evaluated.
    assert any("(it failed before)" in line for line in logs)

    rows = pope.read_text().splitlines(keepends=True)
    pope.write_text("".join(reversed(rows)))  # other questions first: a changed data file
    _, logs = _run(tiny_world, out, pope)
    assert f"[compare] evaluating {arm} (pope: data changed (pope))" in logs
    assert any(line.startswith(f"[compare] evaluating {out / 'runs' / 'demo' / REFERENCE}")
               for line in logs)
    first = json.loads((arm / "eval" / "pope" / "predictions.jsonl").read_text().splitlines()[0])
    assert first["id"] == str(json.loads(rows[-1])["question_id"])

    _, logs = _run(tiny_world, out, pope, limit=6)
    assert f"[compare] evaluating {arm} (pope: limit changed (8 -> 6))" in logs
    assert len((arm / "eval" / "pope" / "predictions.jsonl").read_text().splitlines()) == 6

    ckpt = arm / "checkpoints" / "best.ckpt"
    if not ckpt.exists():
        ckpt = arm / "checkpoints" / "last.ckpt"
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the checkpoint was rewritten
    _, logs = _run(tiny_world, out, pope, limit=6)
    assert any(line.startswith(f"[compare] evaluating {arm} (pope: fingerprint changed")
               for line in logs)
