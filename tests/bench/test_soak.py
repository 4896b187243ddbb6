"""bench/soak.py: the RSS-growth figure by hand, and a short soak through the real CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_soak():
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_soak", mod)
    spec.loader.exec_module(mod)
    return mod


def test_rss_growth_by_hand():
    soak = load_soak()
    g = soak.rss_growth([(0, 100), (10, 150), (20, 150), (30, 151), (40, 152)], 10)
    assert g["warm_rss"] == 150 and g["final_rss"] == 152
    assert g["growth_pct"] == pytest.approx(100 * 2 / 150)
    # Medians: one spike (a checkpoint write) in the last window does not decide it.
    g = soak.rss_growth([(s, 200) for s in range(0, 101, 2)] + [(100, 900)], 0)
    assert g["final_rss"] == 200 and g["growth_pct"] == 0
    with pytest.raises(ValueError, match="no RSS sample in a window"):
        soak.rss_growth([(0, 1), (100, 1)], 10)
    with open("/proc/self/statm") as f:  # the same figure as the kernel's, within a page
        pages = int(f.read().split()[1])
    assert abs(soak.current_rss() - pages * os.sysconf("SC_PAGE_SIZE")) < 64 * 2**20


@pytest.mark.slow
def test_short_soak_runs_the_demo_recipe_and_reports(tmp_path, capsys):
    soak = load_soak()
    code = soak.main(["--steps", "24", "--batch-size", "4", "--sample-every", "2",
                      "--warmup-fraction", "0.25", "--max-growth-pct", "1000",
                      "--out", str(tmp_path)])
    assert code == 0
    r = json.loads((tmp_path / "soak.json").read_text())
    assert r["steps"] == 24 and r["warmup_step"] == 6
    assert [s for s, _ in r["samples_mib"]] == list(range(2, 25, 2))
    assert all(rss > 50 for _, rss in r["samples_mib"])  # MiB: a real process's RSS
    assert "soak: 24 steps" in capsys.readouterr().out
    assert (tmp_path / "runs" / "soak" / "text_into_image-seed0" / "metrics.csv").exists()
