"""AnchoredVLM: a Hugging Face VLM whose language model sees regrouped sequences.

The wrapper builds the baseline sequence through the model's family adapter
(``anchoring.family``: the public API of LLaVA, LLaVA-NeXT or Qwen2.5-VL), regroups it on the
device, then runs the language model and LM head through the model's own
``forward(inputs_embeds=..., position_ids=family.positions(...))``. With anchoring inactive
(strategy ``none``, or a threshold above 1 with no pause tokens) it delegates to the wrapped
model untouched, so logits, loss and greedy generation equal Hugging Face's exactly.

The vision tower and projector run for every batch: a batch without images runs them on one
all-zero dummy image (the family's) whose features enter the embeddings multiplied by zero (as
LLaVA and LLaMA-Factory do). Every rank then runs the same modules (ZeRO-3 / FSDP gather the
same parameters; DDP sees a gradient, zero, for every trainable projector weight), and the
values are unchanged: x + 0 == x, so a text-only batch still equals Hugging Face's text-only
forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attanchor.anchoring.config import POSITION_ONLY_STRATEGIES, AnchorConfig
from attanchor.anchoring.family import Baseline, family_for
from attanchor.anchoring.positions import position_only_forward, position_only_generate
from attanchor.anchoring.regroup import Regrouped, regroup
from attanchor.anchoring.syncs import LazyStats


class AnchoredVLM(nn.Module):
    """Wrap a supported HF VLM (optionally peft-wrapped) with anchoring.

    Args:
        model: the HF model: ``LlavaForConditionalGeneration`` (LLaVA-1.5, tiny-llava),
            ``LlavaNextForConditionalGeneration`` (LLaVA-1.6) or
            ``Qwen2_5_VLForConditionalGeneration``; any other class raises ValueError.
        config: the anchoring configuration.

    ``family`` is the model's adapter (``anchoring.family.family_for``).

    After every ``forward``/``generate``, ``last_regrouped`` holds the (detached) regrouped
    batch and ``last_stats`` its anchor statistics, for logging.
    """

    def __init__(self, model: nn.Module, config: AnchorConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.family = family_for(model)
        self.last_regrouped: Regrouped | None = None
        # Copies inserted per row in the last call, (B,); None before the first call.
        self.last_anchor_counts: Tensor | None = None
        self.last_stats: dict[str, float] = {}

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def _split_images(self, pixel_values: Tensor | None, kw: dict[str, Any]
                      ) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
        """Pop the family's image keys (``image_sizes``, ...) and the vision-feature options
        out of ``kw``: (images or None without pixel_values, image_kw)."""
        extra = {k: kw.pop(k) for k in self.family.image_keys if k != "pixel_values" and k in kw}
        image_kw = {k: kw.pop(k) for k in ("vision_feature_layer",
                                           "vision_feature_select_strategy") if k in kw}
        if pixel_values is None:
            return None, image_kw
        return {"pixel_values": pixel_values, **extra}, image_kw

    def baseline(self, input_ids: Tensor, attention_mask: Tensor | None,
                 images: dict[str, Tensor] | None, **image_kw: Any) -> Baseline:
        """The family's baseline sequence (``family.Baseline``); vision-feature options are
        passed on only when given, so a family need not know them."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.family.baseline(self.model, input_ids, attention_mask, images, **image_kw)

    def baseline_embeds(self, input_ids: Tensor, pixel_values: Tensor | None,
                        attention_mask: Tensor | None = None, **kw: Any
                        ) -> tuple[Tensor, Tensor]:
        """The baseline sequence HF builds: (B, L) ids -> (B, L, d) embeds, (B, L) image mask
        (the positions that may host a copy: NeXT's newline slots excluded).

        Text positions hold the embedding-table lookup; image placeholder positions hold the
        projected image features, in order. ``kw``: the family's other image keys
        (``image_sizes``, ...) and vision-feature options. Without ``pixel_values`` the vision
        tower still runs on a dummy image (module doc). Raises ValueError when the placeholder
        count and the feature count disagree.
        """
        images, image_kw = self._split_images(pixel_values, dict(kw))
        base = self.baseline(input_ids, attention_mask, images, **image_kw)
        return base.embeds, base.image_mask

    def _pause_embedding(self, device: torch.device) -> Tensor | None:
        """The pad token's embedding (d,), looked up through the embedding module's forward:
        under ZeRO-3 its weight is an empty placeholder outside a forward."""
        if not self.config.pause_tokens:
            return None
        pad_id = self.model.config.text_config.pad_token_id
        if pad_id is None:
            pad_id = self.model.config.pad_token_id
        if pad_id is None:
            raise ValueError("pause_tokens need a pad token id in the model's config")
        ids = torch.full((1,), int(pad_id), dtype=torch.long, device=device)
        return self.model.get_input_embeddings()(ids)[0]

    def _regroup(self, input_ids: Tensor, images: dict[str, Tensor] | None,
                 attention_mask: Tensor, candidate_mask: Tensor | None, labels: Tensor | None,
                 image_kw: dict[str, Any], side: str | None = None, *,
                 sample_index: Tensor | None = None, epoch: int = 0,
                 segment_ids: Tensor | None = None) -> tuple[Baseline, Regrouped]:
        """Baseline through the family, then the (family-independent) regroup."""
        if candidate_mask is None:
            raise ValueError(
                f"AnchoredVLM: strategy {self.config.strategy!r} needs candidate_mask (B, L); "
                "build it with attanchor.data (render + collate) or set strategy='none'"
            )
        base = self.baseline(input_ids, attention_mask, images, **image_kw)
        pause = self._pause_embedding(input_ids.device)
        out = regroup(base.embeds, attention_mask, base.image_mask, candidate_mask.bool(),
                      labels, self.config, pause_embedding=pause, sample_index=sample_index,
                      epoch=epoch, segment_ids=segment_ids, side=side)
        self._record(out, attention_mask)
        return base, out

    def _record(self, out: Regrouped, attention_mask: Tensor) -> None:
        """Keep the batch and its statistics as device tensors: nothing is read back here
        (``last_stats`` turns a value into a float when it is read; ``LazyStats``)."""
        with torch.no_grad():
            n_in = attention_mask.sum().float()
            n_out = out.attention_mask.sum().float()
            counts = out.num_anchors.float()
            copy = out.inserted & (out.origin >= 0)  # copies (pause tokens have origin -1)
            # Mean over a mask without boolean indexing (a value-dependent shape): 0/0 = nan.
            sim_mean = out.similarity.nan_to_num().masked_fill(~copy, 0).sum() / copy.sum()
            self.last_anchor_counts = out.num_anchors.detach()
            self.last_regrouped = Regrouped(**{
                k: (v.detach() if isinstance(v, Tensor) else v) for k, v in vars(out).items()})
            empty = counts.numel() == 0
            self.last_stats = LazyStats({
                "anchors_mean": 0.0 if empty else counts.mean(),
                "anchors_max": 0.0 if empty else counts.max(),
                "growth_pct": 100.0 * (n_out - n_in) / n_in.clamp(min=1.0),
                "anchor_similarity_mean": sim_mean,
            })

    def _record_identity(self, attention_mask: Tensor) -> None:
        self.last_regrouped = None
        self.last_anchor_counts = torch.zeros(attention_mask.shape[0], dtype=torch.long)
        self.last_stats = {"anchors_mean": 0.0, "anchors_max": 0.0, "growth_pct": 0.0,
                           "anchor_similarity_mean": math.nan}

    def _check_position_only(self) -> None:
        """The position-only arms renumber a square 1-D image grid: LLaVA only (NeXT's tiles
        and newlines are not square; Qwen's positions are already 3-D)."""
        if self.family.name != "llava":
            raise ValueError(
                f"strategy {self.config.strategy!r} changes 1-D position ids of square image "
                f"grids and supports the llava family only, not {self.family.name!r}; use an "
                "anchoring strategy or 'none' for this model")

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        candidate_mask: Tensor | None = None,
        sample_index: Tensor | None = None,
        epoch: int = 0,
        segment_ids: Tensor | None = None,
        **kw: Any,
    ) -> Any:
        """HF's causal-LM output; with anchoring, logits are over the regrouped sequence
        (B, L', V) and the loss uses the regrouped labels (copies are never trained on).

        ``sample_index`` (B,) int64, stable per sample (collate's), and ``epoch`` seed the
        ``random`` control per sample; ``segment_ids`` (B, L) override the label-derived
        segments (``regroup``). The family's other image keys (``image_sizes``, ...) come in
        ``kw``. Without ``pixel_values`` the vision tower and projector still run, on a dummy
        image that contributes zero (module doc).
        """
        if self.config.strategy in POSITION_ONLY_STRATEGIES:
            self._check_position_only()
            self._record_identity(attention_mask)
            return position_only_forward(self, self.config.strategy, input_ids, pixel_values,
                                         attention_mask, labels, **kw)
        images, image_kw = self._split_images(pixel_values, kw)
        if not self.config.active:
            self._record_identity(attention_mask)
            if images is None:  # HF would skip the tower: run it, add its zero
                base = self.baseline(input_ids, attention_mask, None, **image_kw)
                if base.position_ids is not None:
                    kw["position_ids"] = base.position_ids
                return self.model(inputs_embeds=base.embeds, attention_mask=attention_mask,
                                  labels=labels, **kw)
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                              **images, **image_kw, **kw)
        base, r = self._regroup(input_ids, images, attention_mask, candidate_mask, labels,
                                image_kw, sample_index=sample_index, epoch=epoch,
                                segment_ids=segment_ids)
        return self.model(inputs_embeds=r.inputs_embeds, attention_mask=r.attention_mask,
                          position_ids=self.family.positions(base, r), labels=r.labels, **kw)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        attention_mask: Tensor,
        candidate_mask: Tensor | None = None,
        *,
        sample_index: Tensor | None = None,
        epoch: int = 0,
        segment_ids: Tensor | None = None,
        **gen_kwargs: Any,
    ) -> Tensor:
        """Generate with the prompt regrouped once at prefill; returns only the new tokens.

        Returns a LongTensor (B, T_new): the generated ids without the prompt (the regrouped
        prompt has no single id sequence to prepend), in both the anchored and the plain path.
        Batches must be left-padded. Decoding then runs HF's ``generate`` with its KV cache
        through the family (``family.generate``: 1-D families let HF derive positions from
        the mask, which gives the same 0..n'-1 the regroup assigns). The family's other image
        keys (``image_sizes``, ...) come in ``gen_kwargs``. ``sample_index``, ``epoch`` and
        ``segment_ids`` as in ``forward`` (a prompt has no labels: without ``segment_ids`` it
        is one segment). A prompt without images runs the vision tower on a dummy image too,
        so sharded ranks gather the same parameters.
        """
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("AnchoredVLM.generate: pad prompts on the left "
                             "(collate(..., padding_side='left'))")
        if self.config.strategy in POSITION_ONLY_STRATEGIES:
            self._check_position_only()
            self._record_identity(attention_mask)
            return position_only_generate(self, self.config.strategy, input_ids, pixel_values,
                                          attention_mask, **gen_kwargs)
        images, image_kw = self._split_images(pixel_values, gen_kwargs)
        if not self.config.active:
            self._record_identity(attention_mask)
            if images is None:  # the same modules on every rank; the value is unused
                self.baseline(input_ids, attention_mask, None, **image_kw)
                images = {}  # HF's generate chokes on an explicit pixel_values=None
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      **images, **image_kw, **gen_kwargs)
            return out[:, input_ids.shape[1]:]
        base, r = self._regroup(input_ids, images, attention_mask, candidate_mask, None,
                                image_kw, side="left", sample_index=sample_index, epoch=epoch,
                                segment_ids=segment_ids)
        return self.family.generate(self.model, r, self.family.positions(base, r), **gen_kwargs)
