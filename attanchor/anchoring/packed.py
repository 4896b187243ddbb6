"""Packed anchored forward: several samples per row, each regrouped, numbered and attended
to as if it were alone.

A packed batch (``attanchor.data.packing``) lays samples end to end in rows; ``pack_ids``
(R, W) names each position's sample (-1: padding). The forward

1. unpacks the rows into one right-padded row per sample (integer gathers only),
2. builds each sample's baseline through the model's family and regroups it **per sample**
   (``regroup`` on the (N, L) batch), so every strategy means exactly what it means
   unpacked: a candidate only ever sees images of its own sample, ``top_fraction`` and
   ``max_anchors`` count per sample, the ``random`` control draws per ``sample_index``,
   pause tokens sit before each sample's own answer. (Regrouping the packed row itself with
   ``segment_ids = sample * K + turn`` would keep copies inside their sample too, but the
   selection rules and the random control count per *row*; the packed run would then train
   on other anchors than the unpacked one.)
3. repacks the regrouped samples into the same rows, end to end (one gather that carries the
   gradient), with each sample's own positions (0..n'-1 for LLaVA; the family's positions, so
   Qwen-style (3, N, L') rope indices computed per sample repack the same way), and
4. runs the language model with attention confined to each sample: ``attention="mask"``
   builds a 4-D block-diagonal causal bool mask (R, 1, W', W'), which Hugging Face passes to
   ``sdpa`` / ``eager`` unchanged (``masking_utils._preprocess_mask_arguments``: a 4-D mask
   is "already prepared"); ``attention="positions"`` passes ``attention_mask=None`` and lets
   Hugging Face detect packing from the position ids restarting at 0
   (``masking_utils.find_packed_sequence_indices`` for sdpa / eager, the varlen kernel for
   flash-attention, which takes no 4-D mask). ``auto`` picks positions for flash-attention,
   the mask otherwise. Row padding is a run of its own (positions from 0, its own segment),
   so no query row is fully masked. Both modes give the same losses on a CPU (tested).

Model families: baselines and positions come from the model's family adapter
(``AnchoredVLM.baseline``, ``family.positions``) on the unpacked per-sample batch, so a
Qwen-style family computes each sample's own rope index (its ``get_rope_index`` over that
sample alone) and the (3, N, L') positions repack like 1-D ones; Qwen's 3-D positions need
``attention="mask"`` (HF cannot read sample boundaries from them). Tested: LLaVA (1-D).
Qwen2.5-VL batches are refused for now: their per-token ``mm_token_type_ids`` would have to
be unpacked with the ids and ``packed_collate`` does not carry them yet.

Example (``text_into_image``; samples s0 = ``[T, I, c]`` (c a candidate that matches I) and
s1 = ``[T, I]`` packed in one row)::

    packed     : [T0 I0 c0 | T1 I1]          pack_ids  [0, 0, 0, 1, 1]
    regrouped  : [T0 I0 c0* c0 | T1 I1]      sample    [0, 0, 0, 0, 1, 1]
    positions  : [0, 1, 2, 3, 0, 1]          s1 attends to s1 only, causally

The first label of every sample is forced to -100: unpacked, nothing predicts it; packed, it
would be the target of the previous sample's last token. Per-token losses therefore equal the
unpacked anchored forward's (``tests/anchoring/test_packed.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attanchor.anchoring.regroup import IGNORE_INDEX, Regrouped, regroup

ATTENTION_MODES = ("auto", "mask", "positions")


@dataclass
class PackedLayout:
    """Where each position of the repacked rows comes from. All (R, W') long.

    ``sample``: the sample (index into the batch's ``ids``) of each position, -1 on padding.
    ``offset``: the position inside that sample's regrouped sequence (-1 on padding).
    ``position_ids``: what the language model saw ((R, W') or (3, R, W')).
    ``labels``: the repacked regrouped labels. ``regrouped``: the per-sample regroup (N, L').
    """

    sample: Tensor
    offset: Tensor
    position_ids: Tensor
    labels: Tensor
    regrouped: Regrouped


def sample_spans(pack_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(R, W) pack ids -> flat start (N,) and length (N,) of every sample in ``pack_ids``'s
    row-major flattening. Raises ValueError unless each sample is one contiguous run, samples
    are numbered 0..N-1 in row-major order and pack ids are >= 0 exactly on real tokens."""
    if pack_ids.shape != attention_mask.shape or pack_ids.dim() != 2:
        raise ValueError(f"packed: pack_ids {tuple(pack_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must be the same (R, W)")
    real = attention_mask.bool()
    if not torch.equal(pack_ids >= 0, real):
        raise ValueError("packed: pack_ids must be >= 0 exactly where attention_mask is 1 "
                         "(build packed batches with attanchor.data.packing.packed_collate)")
    flat = pack_ids.flatten()
    pos = torch.arange(flat.numel(), device=flat.device)
    ids = flat[flat >= 0]
    if ids.numel() == 0:
        raise ValueError("packed: the batch holds no sample")
    N = int(ids.max()) + 1
    length = torch.bincount(ids, minlength=N)
    start = torch.full((N,), flat.numel(), dtype=torch.long, device=flat.device)
    start = start.scatter_reduce(0, ids, pos[flat >= 0], reduce="amin")
    ordered = bool((ids[1:] >= ids[:-1]).all()) if ids.numel() > 1 else True
    if (length == 0).any() or not ordered or bool((start[1:] < start[:-1]).any()):
        raise ValueError("packed: samples must be numbered 0..N-1 in row-major order")
    row_end = (start // pack_ids.shape[1] + 1) * pack_ids.shape[1]
    if bool((start + length > row_end).any()):
        raise ValueError("packed: a sample crosses a row boundary")
    return start, length


def block_causal_mask(segments: Tensor) -> Tensor:
    """(R, W) segment id per position -> (R, 1, W, W) bool: query q may attend to key k iff
    k <= q and both share a segment. Example: segments [0, 0, 1] -> rows
    [1 0 0], [1 1 0], [0 0 1]."""
    W = segments.shape[1]
    causal = torch.ones((W, W), dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]  # (R, W, W)
    return (same & causal)[:, None]


def _attention_mode(model: Any, attention: str) -> str:
    if attention not in ATTENTION_MODES:
        raise ValueError(f"packed: attention={attention!r}: allowed are {ATTENTION_MODES}")
    if attention != "auto":
        return attention
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return "positions" if impl.startswith("flash") else "mask"


def _pad_id(model: Any, image_token_id: int) -> int:
    cfg = model.config
    pad = getattr(getattr(cfg, "text_config", None), "pad_token_id", None)
    pad = getattr(cfg, "pad_token_id", None) if pad is None else pad
    pad = 0 if pad is None else int(pad)
    if pad == image_token_id:
        raise ValueError(f"packed: the pad token id {pad} is the image token id")
    return pad


def packed_forward(anchored: Any, input_ids: Tensor, pixel_values: Tensor | None,
                   attention_mask: Tensor, pack_ids: Tensor, labels: Tensor | None = None,
                   candidate_mask: Tensor | None = None, sample_index: Tensor | None = None,
                   epoch: int = 0, *, attention: str = "auto", **kw: Any
                   ) -> tuple[Any, PackedLayout]:
    """The anchored forward of a packed batch (module doc): HF's causal-LM output over the
    repacked rows (logits (R, W', V), loss on the regrouped labels) and its ``PackedLayout``.

    ``anchored``: an ``AnchoredVLM``. Packed tensors are (R, W) (``packed_collate``);
    ``sample_index`` (N,) per sample in packed order. ``attention``: ``mask`` (4-D block
    mask; CPU / sdpa / eager), ``positions`` (no mask, HF detects packing from the position
    ids; flash-attention) or ``auto`` (positions for flash-attention, else mask). ``kw``: the
    family's other image keys (``image_sizes``, ...) and vision-feature options.
    """
    start, length = sample_spans(pack_ids, attention_mask)
    R, W = input_ids.shape
    N, dev = start.shape[0], input_ids.device
    model = anchored.model
    if "mm_token_type_ids" in kw:  # (R, W) per-token input: it would need unpacking too
        raise NotImplementedError("packed: Qwen2.5-VL batches (mm_token_type_ids) are not "
                                  "packed yet; set data.packing false for this family")
    images, image_kw = anchored._split_images(pixel_values, kw)  # pops them out of kw
    mode = _attention_mode(model, attention)
    if candidate_mask is None:
        if anchored.config.active:
            raise ValueError(f"packed: strategy {anchored.config.strategy!r} needs "
                             "candidate_mask (R, W) from packed_collate")
        candidate_mask = torch.zeros_like(input_ids, dtype=torch.bool)

    # 1. unpack: (R, W) -> (N, Lmax), right-padded, one row per sample (integer gathers).
    Lmax = int(length.max())
    ar = torch.arange(Lmax, device=dev)
    valid = ar < length[:, None]  # (N, Lmax)
    src = (start[:, None] + ar).clamp(max=R * W - 1)

    def unpack(t: Tensor, fill: Any) -> Tensor:
        return t.flatten()[src].masked_fill(~valid, fill)

    ids_u = unpack(input_ids, _pad_id(model, anchored.image_token_id))
    attn_u = valid.to(attention_mask.dtype)
    cand_u = unpack(candidate_mask.bool(), False)
    labels_u = None
    if labels is not None:
        labels_u = unpack(labels, IGNORE_INDEX)
        labels_u[:, 0] = IGNORE_INDEX  # module doc: a sample's first token is no target

    # 2. baseline and regroup per sample: (N, Lmax, d) -> (N, L', d).
    base = anchored.baseline(ids_u, attn_u, images, **image_kw)
    pause = anchored._pause_embedding(dev) if anchored.config.active else None
    r = regroup(base.embeds, attn_u, base.image_mask, cand_u, labels_u, anchored.config,
                pause_embedding=pause, sample_index=sample_index, epoch=epoch, side="right")
    if anchored.config.active:
        anchored._record(r, attn_u)
    else:
        anchored._record_identity(attention_mask)
    positions = anchored.family.positions(base, r)  # (N, L') or (3, N, L')

    # 3. repack: sample s keeps its row; within the row samples stay end to end, in order.
    n_out = r.attention_mask.sum(dim=1)  # (N,) regrouped lengths
    row = start // W  # (N,)
    before = torch.cumsum(n_out, 0) - n_out  # exclusive, over the row-major sample order
    first = torch.full((R,), N, dtype=torch.long, device=dev).scatter_reduce(
        0, row, torch.arange(N, device=dev), reduce="amin")
    new_start = before - before[first[row]]  # (N,) offset inside its row
    row_len = torch.zeros(R, dtype=torch.long, device=dev).index_add_(0, row, n_out)
    Wp = int(row_len.max())
    Lp = r.inputs_embeds.shape[1]
    out_valid_u = r.attention_mask.bool()  # (N, L'), right-padded
    q = torch.arange(Lp, device=dev).expand(N, Lp)
    dst = (row[:, None] * Wp + new_start[:, None] + q)[out_valid_u]  # (T,) into (R * W')
    src_flat = (torch.arange(N, device=dev)[:, None] * Lp + q)[out_valid_u]  # into (N * L')
    gather = torch.zeros(R * Wp, dtype=torch.long, device=dev).index_put_((dst,), src_flat)
    real = torch.zeros(R * Wp, dtype=torch.bool, device=dev).index_put_(
        (dst,), torch.ones_like(dst, dtype=torch.bool)).view(R, Wp)
    d = r.inputs_embeds.shape[-1]
    # (N, L', d) -> (R, W', d): index_select carries the gradient into every sample token.
    embeds = r.inputs_embeds.reshape(N * Lp, d).index_select(0, gather).view(R, Wp, d)
    embeds = embeds.masked_fill(~real[..., None], 0)
    sample = torch.where(real, gather.view(R, Wp) // Lp, -1)
    offset = torch.where(real, gather.view(R, Wp) % Lp, -1)
    pad_pos = torch.arange(Wp, device=dev) - row_len[:, None]  # padding: its own run from 0
    lead = positions.shape[:-2]  # () for 1-D positions, (3,) for Qwen-style
    pos = positions.reshape(*lead, N * Lp)[..., gather].view(*lead, R, Wp)
    pos = torch.where(real, pos, pad_pos.clamp(min=0))
    out_labels = None
    if r.labels is not None:
        out_labels = r.labels.reshape(-1)[gather].view(R, Wp).masked_fill(~real, IGNORE_INDEX)

    # 4. attention confined per sample; padding is its own segment (never a fully masked row).
    if mode == "mask":
        segments = torch.where(real, sample, N + torch.arange(R, device=dev)[:, None])
        mask = block_causal_mask(segments)  # (R, 1, W', W')
    else:
        if pos.dim() != 2:
            raise ValueError("packed: attention='positions' needs 1-D position ids; "
                             "Qwen-style (3, B, L) positions need attention='mask'")
        mask = None
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                labels=out_labels, use_cache=False, **kw)
    return out, PackedLayout(sample=sample, offset=offset, position_ids=pos,
                             labels=out_labels if out_labels is not None else
                             torch.full((R, Wp), IGNORE_INDEX, device=dev), regrouped=r)
