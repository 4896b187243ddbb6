"""compare's records about an arm: failure lines, evaluation keys and what makes them stale,
per-arm arguments, and prediction differences between arms (no training here)."""

from __future__ import annotations

import json
import os

import pytest

from attanchor.eval.arm_state import (
    eval_key,
    fingerprint,
    first_line,
    format_differences,
    prediction_differences,
    read_status,
    stale_reason,
    write_status,
)
from attanchor.eval.compare import arm_overrides


def test_first_line_keeps_the_type_and_the_first_line():
    assert first_line(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert first_line(ValueError("\n  \n  second\n")) == "ValueError: second"
    assert first_line(SystemExit()) == "SystemExit"
    assert first_line(RuntimeError("")) == "RuntimeError"


def test_status_round_trip(tmp_path):
    arm = tmp_path / "arm"
    assert read_status(arm) is None
    write_status(arm, "failed", "ValueError: x")
    assert read_status(arm) == {"status": "failed", "error": "ValueError: x"}
    write_status(arm, "trained")
    assert read_status(arm) == {"status": "trained"}
    with pytest.raises(ValueError, match="'done'"):
        write_status(arm, "done")


def _evaluation(where, key):
    where.mkdir(parents=True)
    (where / "metrics.json").write_text("{}")
    (where / "key.json").write_text(json.dumps(key))


def test_a_changed_data_file_limit_checkpoint_or_override_makes_the_evaluation_stale(tmp_path):
    ckpt, data = tmp_path / "last.ckpt", tmp_path / "pope.jsonl"
    ckpt.write_bytes(b"12345")
    data.write_text('{"question_id": 0}\n')
    os.utime(ckpt, ns=(10**18, 10**18))
    assert fingerprint(ckpt) == f"5-{10**18}"

    def key(limit=8, override=None):
        return eval_key(ckpt, {"pope": str(data)}, str(tmp_path), limit, override)

    assert stale_reason(tmp_path / "eval", key()) == "no evaluation yet"
    _evaluation(tmp_path / "eval", key())
    assert stale_reason(tmp_path / "eval", key()) is None
    assert stale_reason(tmp_path / "eval", key(limit=6)) == "limit changed (8 -> 6)"
    assert stale_reason(tmp_path / "eval", key(override={"strategy": "none"})) == \
        "anchor_override changed (None -> {'strategy': 'none'})"
    data.write_text('{"question_id": 1}\n')  # same size, other bytes
    assert stale_reason(tmp_path / "eval", key()) == "data changed (pope)"
    data.write_text('{"question_id": 0}\n')
    os.utime(ckpt, ns=(10**18 + 1, 10**18 + 1))  # the checkpoint was rewritten
    assert stale_reason(tmp_path / "eval", key()).startswith("fingerprint changed")
    (tmp_path / "eval" / "key.json").unlink()
    assert stale_reason(tmp_path / "eval", key()) == "evaluated without a key (older attanchor)"


def test_a_directory_checkpoint_is_fingerprinted_over_its_files(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "a").write_bytes(b"12")
    (tmp_path / "export" / "b").write_bytes(b"345")
    for name, t in (("a", 100), ("b", 200)):
        os.utime(tmp_path / "export" / name, ns=(t, t))
    assert fingerprint(tmp_path / "export") == "5-300"
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        fingerprint(tmp_path / "missing")


def test_pause_tokens_go_to_the_image_into_text_arm_only():
    assert arm_overrides("none", 4) == ["--model.anchor.strategy", "none",
                                        "--model.anchor.pause_tokens", "0"]
    assert arm_overrides("image_into_text", 4) == ["--model.anchor.strategy",
                                                   "image_into_text",
                                                   "--model.anchor.pause_tokens", "4"]
    assert arm_overrides("image_into_text", None) == ["--model.anchor.strategy",
                                                      "image_into_text"]


def test_prediction_differences_count_questions_answered_differently(tmp_path):
    def preds(name, answers):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": i, "prediction": a}) + "\n"
                                for i, a in enumerate(answers)))
        return path

    files = {"vqa": {"none": {"0": preds("n0", ["one", "yes", "two"]),
                              "1": preds("n1", ["one", "no", "two"])},
                     "random": {"0": preds("r0", ["one", "no", "three"])}}}
    diffs = prediction_differences(files)
    assert diffs == {"vqa": {"none vs random": {"0": (2, 3)}}}  # seed 1: random lacks it
    assert format_differences(diffs) == "vqa  none vs random: seed 0 2/3"
