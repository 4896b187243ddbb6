"""bench/packing.py: the generated length mix, the anchored lengths, and a smoke of main()."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_packing", ROOT / "bench" / "packing.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_packing", mod)
    spec.loader.exec_module(mod)
    return mod


def test_llava_like_mix_has_the_documented_shape():
    bench = load_bench()
    lengths, mm, cands = bench.llava_like(20_000, seed=0)
    assert len(lengths) == len(mm) == len(cands) == 20_000
    assert max(lengths) <= 2048
    assert all(n >= 576 + 8 for n, m in zip(lengths, mm) if m)  # image tokens + some text
    text_only = 1 - sum(mm) / len(mm)
    assert 0.05 < text_only < 0.07  # ShareGPT's 6 %
    assert all(c == 0 for c, m in zip(cands, mm) if not m)


def test_anchored_lengths_add_ceil_of_a_tenth_of_the_candidates():
    bench = load_bench()
    assert bench.anchored_lengths([10, 20, 30], [0, 11, 10]) == [10, 22, 31]


def test_packed_padding_by_hand():
    bench = load_bench()
    # one batch [3, 2, 2, 1], rows of 5 -> rows of 4 and 4 tokens: no padding
    assert bench.packed_padding([3, 2, 2, 1], [0, 1, 2, 3], 4, 5) == 0.0
    # [4, 1] in rows of 4: two rows (4 and 1 tokens), both 4 wide -> 3 pads of 8 tokens
    assert bench.packed_padding([4, 1], [0, 1], 2, 4) == pytest.approx(3 / 8)


def test_smoke_main_prints_and_writes_the_figures(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "packing.json"
    res = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    for name in ("easy-vqa", "llava-665k-like"):
        row = res["padding"][name]
        for key in ("baseline_shuffled", "baseline_grouped", "baseline_packed",
                    "anchored_shuffled", "anchored_grouped", "anchored_packed"):
            assert 0.0 <= row[key] < 1.0
        assert row["anchored_mean_length"] > row["mean_length"]
    llava = res["padding"]["llava-665k-like"]
    assert llava["baseline_grouped"] < llava["baseline_shuffled"] / 2
    arms = res["throughput"]["arms"]
    assert set(arms) == {f"{s}/{lay}" for s in ("none", "text_into_image")
                         for lay in ("padded", "grouped", "packed")}
    # the grouped batches are cut from a length-sorted megabatch: no more slots than padded
    assert arms["none/grouped"]["slots_per_step"] <= arms["none/padded"]["slots_per_step"]
    assert arms["none/padded"]["vs_padded_baseline"] == 1.0
    assert all(a["tokens_per_s"] > 0 for a in arms.values())
    assert "padding fraction" in capsys.readouterr().out
