"""bench/gpu_smoke.py with --tiny on the CPU: both arms train, generation runs, figures land."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS, WARMUP, GEN_TOKENS, BATCH, GEN_BATCHES = 3, 1, 5, 3, 2


def test_tiny_smoke_run_writes_the_figures(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--tiny", "--device", "cpu",
         "--steps", str(STEPS), "--warmup", str(WARMUP), "--batch", str(BATCH),
         "--gen-tokens", str(GEN_TOKENS), "--gen-batches", str(GEN_BATCHES),
         "--gen-repeats", "1", "--sync-debug", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    base, anch = fig["arms"]["none"], fig["arms"]["text_into_image"]
    for arm in (base, anch):
        assert arm["steps"] == STEPS and arm["warmup_steps"] == WARMUP
        assert len(arm["losses"]) == STEPS + WARMUP
        assert all(math.isfinite(x) for x in arm["losses"])
        assert arm["tokens_per_s"] > 0 and arm["peak_memory_bytes"] is None  # CPU: no CUDA peak
    # Both arms trained on the same batches: the same baseline tokens and widths.
    assert base["baseline_tokens_per_step"] == anch["baseline_tokens_per_step"]
    assert base["baseline_seq_len_mean"] == anch["baseline_seq_len_mean"]
    # The tiny model: (32 / 8)^2 = 16 image tokens; questions of 6..11 candidate words, so the
    # top 10 % is ceil(0.1 q) = 1 copy a row (2 when q = 11): the mean lies in [1, 2] and every
    # anchored row is longer than its baseline row.
    assert fig["model"]["image_tokens"] == 16
    assert base["anchors_per_row_mean"] == 0.0 and base["seq_len_mean"] == base[
        "baseline_seq_len_mean"]
    assert 1.0 <= anch["anchors_per_row_mean"] <= 2.0
    assert anch["seq_len_mean"] > anch["baseline_seq_len_mean"]
    assert fig["tokens_per_s_ratio"] == anch["tokens_per_s"] / base["tokens_per_s"]
    gen = fig["generation"]
    assert gen["plain_shape"] == gen["anchored_shape"] == [BATCH, GEN_TOKENS]
    assert gen["plain_s"] > 0 and gen["anchored_s"] > 0 and 1.0 <= gen["anchors_per_row_mean"]
    # Host syncs, counted on the CPU too: the static regroup and its statistics make none.
    debug = fig["sync_debug"]
    assert debug["static"]["regroup_syncs"] == 0, debug["static"]["regroup_sites"]
    assert debug["dynamic"]["regroup_syncs"] > 0  # int(n.max()), the value checks, ...
    assert debug["static"]["forward_syncs"] < debug["dynamic"]["forward_syncs"]
    assert debug["cuda"].startswith("skipped: no CUDA device")
    assert fig["device"] == "cpu" and fig["dtype"] == "float32"  # CPU default (bf16 is slow)
    assert fig["model"]["trainable_parameters"] < fig["model"]["parameters"]
    assert "anchored / baseline tokens/s:" in proc.stdout
