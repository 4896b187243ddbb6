"""Calibrating the anchoring threshold tau from the distribution of best-match similarities.

For every candidate text token T_n of a row, s_n = max_m cos(T_n, I_m) over that row's image
tokens (shared/METHOD.md, Algorithm 1, step 1). ``text_into_image`` with threshold tau anchors
exactly the candidates with s_n >= tau, so the tau that makes a fraction rho of candidates
anchors is read off the empirical distribution of s_n. The lead's ``attanchor calibrate`` gathers
the s_n over batches with ``best_match_similarities`` and calls the two functions below.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attanchor.anchoring.regroup import best_match, pack_positions


@torch.no_grad()
def best_match_similarities(embeds: Tensor, image_mask: Tensor, candidate_mask: Tensor) -> Tensor:
    """s_n = max over the row's image tokens of cos(T_n, I_m), for every candidate, in fp32.

    Args:
        embeds: (B, L, d) baseline sequence (text embeddings with image features in place).
        image_mask: (B, L) bool, True at image tokens.
        candidate_mask: (B, L) bool, True at candidates (never at an image token).

    Returns a 1-D float32 tensor on `embeds`' device, one value per candidate, in row-major
    order (row 0's candidates left to right, then row 1's, ...): ``candidate_mask.sum()`` values.
    A zero vector has cosine 0 with everything. Raises ValueError for a row that has candidates
    but no image token (there is nothing to match) and for a candidate that is an image token.

    Example: row [I=(1,0), I=(0,1), T=(1,1)] -> [cos 45 deg] = [0.7071].
    """
    if embeds.dim() != 3:
        raise ValueError(f"embeds must be (B, L, d), got shape {tuple(embeds.shape)}")
    b, length, _ = embeds.shape
    for name, mask in (("image_mask", image_mask), ("candidate_mask", candidate_mask)):
        if mask.shape != (b, length) or mask.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor of shape {(b, length)}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
    if (image_mask & candidate_mask).any():
        raise ValueError("candidate_mask marks image tokens; candidates are text tokens only")
    lonely = (candidate_mask.any(1) & ~image_mask.any(1)).nonzero().flatten().tolist()
    if lonely:
        raise ValueError(f"rows {lonely} have candidates but no image tokens; leave text-only "
                         "rows out of calibration or clear their candidate_mask")
    # The regroup's own scoring (fp32, chunked): calibration sees exactly what selection sees.
    cand_pos, cand_valid = pack_positions(candidate_mask)  # (B, N)
    rows = torch.arange(b, device=embeds.device)[:, None]
    scores, _ = best_match(embeds[rows, cand_pos], embeds, image_mask)  # (B, N)
    return scores[cand_valid]  # (N_candidates,) row-major


def _as_array(best_similarities: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(best_similarities, Tensor):
        values = best_similarities.detach().to("cpu", torch.float64).numpy()
    else:
        values = np.asarray(best_similarities, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"best_similarities must be a non-empty 1-D array, got shape "
                         f"{values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"best_similarities holds {int((~np.isfinite(values)).sum())} "
                         "non-finite values")
    return values


def threshold_for_fraction(best_similarities: Tensor | np.ndarray, target_fraction: float) -> float:
    """The largest tau such that at least `target_fraction` of the candidates have s >= tau.

    Definition (no interpolation): sort the N values in descending order, s_(1) >= ... >= s_(N);
    with k = ceil(target_fraction * N) (the same count as ``top_fraction``'s
    ceil(rho * candidates)), tau = s_(k), an observed value. When the values are distinct,
    exactly k candidates have s >= tau, i.e. the fraction k / N, the smallest fraction >= the
    target that N candidates allow. Ties at s_(k) all pass the rule s >= tau, so the realised
    fraction can exceed k / N; ``fraction_at_threshold`` gives it. target_fraction in (0, 1].

    Example: values 0.1, 0.2, ..., 1.0 (N = 10), target 0.25 -> k = 3 -> tau = 0.8
    (0.8, 0.9, 1.0 pass: 30%).
    """
    if not 0.0 < float(target_fraction) <= 1.0:
        raise ValueError(f"target_fraction={target_fraction} must lie in (0, 1]")
    values = np.sort(_as_array(best_similarities))[::-1]  # descending
    # The small tolerance keeps 0.3 * 10 at 3 despite 0.30000000000000004 in floating point.
    k = max(1, math.ceil(float(target_fraction) * values.size - 1e-9))
    return float(values[k - 1])


def fraction_at_threshold(best_similarities: Tensor | np.ndarray, threshold: float) -> float:
    """Fraction of candidates with s >= threshold (what anchoring with this tau would select)."""
    values = _as_array(best_similarities)
    return float((values >= threshold).mean())


def similarity_histogram_png(best_similarities: Tensor | np.ndarray, out_png: str | Path,
                             threshold: float | None = None, paper_tau: float | None = 0.12,
                             bins: int = 60) -> Path:
    """Histogram of best-match similarities with the chosen and the paper's tau marked.

    Each marked tau is labelled with the fraction of candidates it would anchor. Returns the
    PNG path (parent folders are created).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = _as_array(best_similarities)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.75)
    marks = [("chosen", threshold, "tab:red"), ("paper", paper_tau, "tab:gray")]
    for label, tau, color in marks:
        if tau is not None:
            frac = fraction_at_threshold(values, tau)
            ax.axvline(tau, color=color, ls="--",
                       label=f"{label} tau = {tau:.4f}: {100 * frac:.1f}% anchored")
    ax.set(xlabel="best-match cosine similarity s_n (candidate vs its best image token)",
           ylabel="candidates",
           title=f"{values.size} candidates: median {np.median(values):.3f}, "
                 f"max {values.max():.3f}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
