"""Anchor statistics of one batch, as counts and sums that reduce correctly across ranks.

Every rank must log the same keys at every step: a key one rank skips (a NaN mean on a batch
without a candidate, say) leaves the others waiting in a synchronised reduction. So each
statistic here is always defined, and the ones that matter across ranks are sums (reduced
with ``sum``); a mean is then a ratio of two logged sums, e.g.
``anchor_similarity_sum / anchor_count`` (undefined, not NaN-logged, when the count is 0).

=======================  ======================================================  ==========
key                      value for the batch                                     reduce
=======================  ======================================================  ==========
anchor_rows              rows (samples) in the batch                             sum
anchor_count             copies inserted, summed over rows (pause tokens not)    sum
anchor_similarity_sum    sum of the cosine that selected each copy (0 if none)   sum
anchor_tokens_in         real tokens of the baseline sequence                    sum
anchor_tokens_out        real tokens after regrouping (copies + pauses added)    sum
anchors_mean             anchor_count / anchor_rows                              mean
anchors_max              most copies in one row                                  max
growth_pct               100 * (tokens_out - tokens_in) / tokens_in              mean
=======================  ======================================================  ==========
"""

from __future__ import annotations

from torch import Tensor

from attanchor.anchoring.regroup import Regrouped

# key -> Lightning ``reduce_fx``: how a key aggregates over steps and over ranks.
STAT_REDUCE = {
    "anchor_rows": "sum",
    "anchor_count": "sum",
    "anchor_similarity_sum": "sum",
    "anchor_tokens_in": "sum",
    "anchor_tokens_out": "sum",
    "anchors_mean": "mean",
    "anchors_max": "max",
    "growth_pct": "mean",
}


def batch_anchor_stats(regrouped: Regrouped | None, attention_mask: Tensor) -> dict[str, float]:
    """The statistics of ``STAT_REDUCE`` for one batch, every key always present and finite.

    Args:
        regrouped: ``AnchoredVLM.last_regrouped`` after the batch's forward; None for the
            identity (strategy ``none``), which inserts nothing.
        attention_mask: the batch's baseline mask (B, L).

    Example: two rows of 10 real tokens, 3 and 0 copies with cosines 0.2, 0.3, 0.5 ->
    rows 2, count 3, similarity_sum 1.0, tokens 20 -> 23, mean 1.5, max 3, growth 15.0.
    """
    rows = int(attention_mask.shape[0])
    tokens_in = float(attention_mask.sum())
    if regrouped is None:
        count, sim_sum, most, tokens_out = 0.0, 0.0, 0.0, tokens_in
    else:
        counts = regrouped.num_anchors  # (B,)
        # A copy has an origin; pause tokens (origin -1) carry no similarity.
        copies = regrouped.inserted & (regrouped.origin >= 0)  # (B, L')
        count = float(counts.sum())
        sim_sum = float(regrouped.similarity[copies].float().sum()) if bool(copies.any()) else 0.0
        most = float(counts.max()) if counts.numel() else 0.0
        tokens_out = float(regrouped.attention_mask.sum())
    return {
        "anchor_rows": float(rows),
        "anchor_count": count,
        "anchor_similarity_sum": sim_sum,
        "anchor_tokens_in": tokens_in,
        "anchor_tokens_out": tokens_out,
        "anchors_mean": count / rows if rows else 0.0,
        "anchors_max": most,
        "growth_pct": 100.0 * (tokens_out - tokens_in) / max(tokens_in, 1.0),
    }
