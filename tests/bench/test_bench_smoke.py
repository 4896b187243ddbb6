"""`python -m bench --smoke`: every benchmark runs on tiny shapes and writes its JSON; the
suite's summary holds positive finite ratios and boolean targets (no timing asserts)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OWN = ("train_step", "generation", "regroup", "data")


@pytest.mark.slow
def test_bench_smoke_writes_every_json_with_finite_ratios(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True
    names = set(summary["benchmarks"])
    assert set(OWN) <= names
    if (ROOT / "bench" / "packing.py").exists():
        assert "packing" in names
    for name, b in summary["benchmarks"].items():
        assert (out / f"{name}.json").exists(), name
        assert b["ratios"], f"{name}: no ratios"
        for k, v in b["ratios"].items():
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (name, k, v)
        assert all(isinstance(m, bool) for m in b["targets"].values()), name
    # The figures the README quotes, by name.
    ratios = {n: b["ratios"] for n, b in summary["benchmarks"].items()}
    assert {"text_into_image_vs_baseline", "none_padded_vs_baseline",
            "text_into_image_static_vs_baseline"} <= set(ratios["train_step"])
    assert {"tiny/anchored_vs_plain", "tiny/anchored_vs_plain_padded",
            "tiny/anchored_vs_embeds_padded"} == set(ratios["generation"])
    assert {"smoke/dynamic/fwd", "smoke/dynamic/fwd_bwd", "smoke/static/fwd",
            "smoke/static/fwd_bwd"} == set(ratios["regroup"])
    assert set(ratios["data"]) == {"easy_vqa_cold_per_worker_vs_tiny_step",
                                   "jpeg_336_per_worker_vs_gpu_estimate"}
    regroup = json.loads((out / "regroup.json").read_text())
    # One memory run per mode; the similarity chunk bound is B * q * L * 4 bytes.
    assert [r["static"] for r in regroup["memory"]["runs"]] == [False, True]
    data = json.loads((out / "data.json").read_text())
    assert data["jpeg_336"]["image_tokens"] == 576  # (336 / 14) ** 2: the CLIP-L/336 grid
    assert data["jpeg_336"]["size"] == [640, 480]
    assert data["jpeg_336"]["workers_needed"] >= 1
    assert "=== summary" in proc.stdout
