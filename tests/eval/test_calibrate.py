"""Calibration: the best-match similarity, the threshold quantile rule, the histogram."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from attanchor.eval.calibrate import (
    best_match_similarities,
    fraction_at_threshold,
    similarity_histogram_png,
    threshold_for_fraction,
)


def test_best_match_hand_computed() -> None:
    # Row 0: I=(1,0), I=(0,1), T=(1,1) candidate, T=(-1,0) candidate, pad (not a candidate).
    # Row 1: T=(0,2) candidate, I=(3,0), I=(-1,-1): best cos of (0,2) is 0 with (3,0).
    embeds = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [5.0, 5.0]],
        [[0.0, 2.0], [3.0, 0.0], [-1.0, -1.0], [0.0, 0.0], [0.0, 0.0]],
    ])
    image = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    cand = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 0, 1, 0]], dtype=torch.bool)
    s = best_match_similarities(embeds, image, cand)
    # (1,1): cos 45 deg with both; (-1,0): max(-1, 0) = 0; (0,2): max(0, -0.7071) = 0;
    # zero vector: cosine 0 with everything.
    expected = torch.tensor([1 / math.sqrt(2), 0.0, 0.0, 0.0])
    assert s.dtype == torch.float32 and s.shape == (4,)
    torch.testing.assert_close(s, expected)


def test_best_match_matches_loop_reference_in_bf16() -> None:
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(3, 12, 16, generator=g).to(torch.bfloat16)
    image = torch.zeros(3, 12, dtype=torch.bool)
    image[:, 2:7] = True
    cand = torch.zeros(3, 12, dtype=torch.bool)
    cand[:, 8:11] = True
    cand[1, 0] = True
    got = best_match_similarities(embeds, image, cand)
    ref = []
    x = embeds.float()
    for b in range(3):
        for n in cand[b].nonzero().flatten().tolist():
            ref.append(max(float(torch.cosine_similarity(x[b, n], x[b, m], dim=0))
                           for m in image[b].nonzero().flatten().tolist()))
    torch.testing.assert_close(got, torch.tensor(ref), atol=1e-6, rtol=1e-6)


def test_best_match_errors() -> None:
    embeds = torch.randn(2, 4, 3)
    image = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    cand = torch.tensor([[0, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"rows \[1\] have candidates but no image tokens"):
        best_match_similarities(embeds, image, cand)
    with pytest.raises(ValueError, match="marks image tokens"):
        best_match_similarities(embeds, image, image)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        best_match_similarities(embeds, image.long(), cand)


# A fixed synthetic distribution: 0.01, 0.02, ..., 1.00 (N = 100), shuffled.
SYNTH = np.random.default_rng(0).permutation(np.arange(1, 101) / 100.0)


@pytest.mark.parametrize(
    ("fraction", "tau"),
    # k = ceil(f * 100); tau = the k-th largest = (101 - k) / 100.
    [(0.1, 0.91), (0.25, 0.76), (0.105, 0.90), (0.01, 1.00), (1.0, 0.01), (0.001, 1.00)],
)
def test_threshold_for_fraction_on_fixed_distribution(fraction: float, tau: float) -> None:
    got = threshold_for_fraction(SYNTH, fraction)
    assert got == pytest.approx(tau)
    k = math.ceil(fraction * 100 - 1e-9)
    assert fraction_at_threshold(SYNTH, got) == pytest.approx(k / 100)
    # The largest such tau: anything above it selects fewer than the target.
    assert fraction_at_threshold(SYNTH, got + 1e-6) < fraction


def test_threshold_for_fraction_ties_and_tensors() -> None:
    values = torch.tensor([0.5, 0.3, 0.3, 0.3, 0.1])
    # k = ceil(0.4 * 5) = 2 -> tau = 0.3; the three tied values all pass: 4/5 anchored.
    assert threshold_for_fraction(values, 0.4) == pytest.approx(0.3)
    assert fraction_at_threshold(values, 0.3) == pytest.approx(0.8)
    assert threshold_for_fraction(values, 0.2) == pytest.approx(0.5)


def test_threshold_for_fraction_errors() -> None:
    with pytest.raises(ValueError, match="must lie in"):
        threshold_for_fraction(SYNTH, 0.0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        threshold_for_fraction(np.zeros((2, 2)), 0.5)
    with pytest.raises(ValueError, match="1 non-finite"):
        threshold_for_fraction(np.array([0.1, np.nan]), 0.5)


def test_similarity_histogram_png(tmp_path) -> None:
    out = similarity_histogram_png(SYNTH, tmp_path / "sub" / "hist.png", threshold=0.91)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (700, 400)
