"""Position-only arms: the baseline sequence, unchanged, read under other position ids.

Anchoring shortens the rotary distance between a prompt word and the image patch it describes
by *copying* tokens. These arms are the cheapest alternative fix of the same distance problem:
no token is added, removed or moved; only the position ids of the image tokens change, so
that the words after an image are nearer to it in rotary distance (in the spirit of
concentric and variable visual position encodings, e.g. CCA and V2PE). A run of image tokens
is read as ``k`` images of ``grid x grid`` patches in row-major order (LLaVA-1.5: one image,
24 x 24). Modes (``POSITION_MODES``):

* ``compress_image_positions``: every grid row of an image shares one position id, so an
  image spans ``grid`` positions instead of ``grid**2`` (576 -> 24 for LLaVA-1.5).
* ``concentric_image_positions``: a patch's position is its ring, its distance from the
  image border (``min(r, c, g-1-r, g-1-c)``), so the periphery comes first and the centre
  last, nearest the words that follow; an image spans ``ceil(grid / 2)`` positions (576 ->
  12). Only CCA's position assignment: its concentric causal mask is not reproduced.

Text positions count on by one after each text token; the token after an image run sits one
past the run's last id. Example (B=1, grid=2: four image tokens ``I``, row-major)::

    tokens     : [T0, I00, I01, I10, I11, T1, T2]
    baseline   : [ 0,   1,   2,   3,   4,  5,  6]
    compress   : [ 0,   1,   1,   2,   2,  3,  4]
    concentric : [ 0,   1,   1,   1,   1,  2,  3]   (a 2 x 2 image is all border)

With ``grid=4`` the concentric image holds 12 border patches at id 1 and the 4 centre patches
(rows/columns 1..2) at id 2, and the next word gets id 3 instead of 17.

Invariants: padding follows ``regroup``'s convention (left pads 0, right pads count on); a
sequence without image tokens gets the baseline ids (HF's ``cumsum(mask) - 1``); ids never
decrease along the real tokens. ``position_only_forward`` / ``position_only_generate`` run a
wrapped LLaVA on these ids (generation: explicit ids at prefill, HF's ``generate`` continues
them by one per new token).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from attanchor.anchoring.config import POSITION_ONLY_STRATEGIES

POSITION_MODES = POSITION_ONLY_STRATEGIES  # the strategy names are the modes


def _image_runs(image_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) bool -> index within its run of each image token (B, L) (0 elsewhere), and a
    (B, L) bool marking the last token of every run."""
    B, L = image_mask.shape
    idx = torch.arange(L, device=image_mask.device).expand(B, L)
    prev = torch.zeros_like(image_mask)
    prev[:, 1:] = image_mask[:, :-1]
    nxt = torch.zeros_like(image_mask)
    nxt[:, :-1] = image_mask[:, 1:]
    starts = image_mask & ~prev
    # Index of the current run's first token: a running max of the start indices.
    start_idx = torch.where(starts, idx, torch.full_like(idx, -1)).cummax(dim=1).values
    within = torch.where(image_mask, idx - start_idx, torch.zeros_like(idx))
    return within, image_mask & ~nxt


def infer_grid(image_mask: Tensor) -> int:
    """The grid side of the image runs: every run must hold the same square number of tokens.

    Raises ValueError naming the run lengths otherwise (LLaVA-NeXT's tiles and newline tokens
    make non-square runs: pass ``grid`` explicitly, or use another arm)."""
    within, ends = _image_runs(image_mask.bool())
    lengths = sorted(set((within[ends] + 1).tolist()))
    if not lengths:
        return 1  # no image tokens: the grid never matters
    side = math.isqrt(lengths[0])
    if len(lengths) != 1 or side * side != lengths[0]:
        raise ValueError(f"position_only_ids: image runs of lengths {lengths} are not all one "
                         "square grid; pass grid= (the patches per image side)")
    return side


def position_only_ids(attention_mask: Tensor, image_mask: Tensor, mode: str,
                      grid: int | None = None) -> Tensor:
    """Position ids (B, L) int64 for ``mode`` (``POSITION_MODES``) over a baseline sequence.

    Args:
        attention_mask: (B, L), 1 on real tokens; one padding side per batch.
        image_mask: (B, L) bool, True on image tokens (never on padding).
        mode: ``compress_image_positions`` or ``concentric_image_positions``.
        grid: patches per image side; None infers it from the runs (``infer_grid``).

    Raises ValueError for an unknown mode, image tokens on padding, or an image run whose
    length is not a multiple of ``grid**2``.
    """
    if mode not in POSITION_MODES:
        raise ValueError(f"position_only_ids: mode={mode!r}: allowed are {POSITION_MODES}")
    real, image = attention_mask.bool(), image_mask.bool()
    if (image & ~real).any():
        raise ValueError("position_only_ids: image tokens fall on padding")
    g = infer_grid(image) if grid is None else int(grid)
    if g < 1:
        raise ValueError(f"position_only_ids: grid={grid} must be >= 1")
    within, ends = _image_runs(image)  # (B, L), (B, L)
    bad = ends & ((within + 1) % (g * g) != 0)
    if bad.any():
        lengths = sorted(set((within[bad] + 1).tolist()))
        raise ValueError(f"position_only_ids: image runs of lengths {lengths} are not whole "
                         f"{g} x {g} images; pass the right grid=")
    image_k, local = within // (g * g), within % (g * g)  # which image of the run, its patch
    r, c = local // g, local % g
    if mode == "compress_image_positions":
        span, offset = g, r
    else:
        ring = torch.minimum(torch.minimum(r, c), torch.minimum(g - 1 - r, g - 1 - c))
        span, offset = (g + 1) // 2, ring
    offset = image_k * span + offset  # (B, L): the image's id relative to its run's start
    leading = (~real).long().cumprod(dim=1).bool()  # left pads
    # Each token consumes id slots: a text token or a right pad one, a run span * images at
    # its last token, the tokens inside a run none. A token's base id is the slots before it.
    step = torch.where(image, torch.zeros_like(within), torch.ones_like(within))
    step = torch.where(ends, (image_k + 1) * span, step)
    step = torch.where(leading, torch.zeros_like(step), step)
    base = step.cumsum(dim=1) - step  # exclusive cumsum, (B, L)
    return torch.where(image, base + offset, base).long()


def position_only_forward(anchored: Any, mode: str, input_ids: Tensor,
                          pixel_values: Tensor | None, attention_mask: Tensor,
                          labels: Tensor | None = None, grid: int | None = None,
                          **kw: Any) -> Any:
    """HF's causal-LM output for the baseline sequence under ``mode``'s position ids.

    ``anchored`` is an ``AnchoredVLM`` (its ``baseline_embeds`` builds the sequence HF's LLaVA
    builds, and runs the vision tower on a dummy image without pixels); the logits are over
    the baseline sequence (B, L, V) and the loss uses the unchanged labels.
    """
    image_kw = {k: kw.pop(k) for k in ("vision_feature_layer",
                                       "vision_feature_select_strategy") if k in kw}
    embeds, image_mask = anchored.baseline_embeds(input_ids, pixel_values, **image_kw)
    pos = position_only_ids(attention_mask, image_mask, mode, grid)  # (B, L)
    return anchored.model(inputs_embeds=embeds, attention_mask=attention_mask,
                          position_ids=pos, labels=labels, **kw)


@torch.no_grad()
def position_only_generate(anchored: Any, mode: str, input_ids: Tensor,
                           pixel_values: Tensor | None, attention_mask: Tensor,
                           grid: int | None = None, **gen_kwargs: Any) -> Tensor:
    """Greedy/sampled continuation of left-padded prompts under ``mode``'s position ids;
    returns only the new tokens (B, T_new).

    The prefill gets the explicit ids; HF's ``generate`` (transformers >= 5) then extends
    ``position_ids`` by ``last + 1`` per new token (``_update_model_kwargs_for_generation``),
    so decoded tokens continue after the compressed prompt, as a full re-forward would give.
    """
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("position_only_generate: pad prompts on the left "
                         "(collate(..., padding_side='left'))")
    embeds, image_mask = anchored.baseline_embeds(input_ids, pixel_values)
    pos = position_only_ids(attention_mask, image_mask, mode, grid)  # (B, L)
    return anchored.model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                   position_ids=pos, **gen_kwargs)
