"""AnchoredVLM: a Hugging Face LLaVA model whose language model sees regrouped sequences.

The wrapper builds the baseline sequence through the model's public API (input embeddings,
``get_image_features``, the image token id), regroups it on the device, then runs the language
model and LM head through the model's own ``forward(inputs_embeds=...)``. With anchoring
inactive (strategy ``none``, or a threshold above 1 with no pause tokens) it delegates to the
wrapped model untouched, so logits, loss and greedy generation equal Hugging Face's exactly.

The vision tower and projector run for every batch: a batch without images runs them on one
all-zero dummy image whose features enter the embeddings multiplied by zero (as LLaVA and
LLaMA-Factory do). Every rank then runs the same modules (ZeRO-3 / FSDP gather the same
parameters; DDP sees a gradient, zero, for every trainable projector weight), and the values
are unchanged: x + 0 == x, so a text-only batch still equals Hugging Face's text-only forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attanchor.anchoring.config import AnchorConfig
from attanchor.anchoring.regroup import Regrouped, regroup


class AnchoredVLM(nn.Module):
    """Wrap a ``LlavaForConditionalGeneration`` (optionally peft-wrapped) with anchoring.

    Args:
        model: the HF model (LLaVA-1.5, tiny-llava-v1-hf or any checkpoint of that class).
        config: the anchoring configuration.

    After every ``forward``/``generate``, ``last_regrouped`` holds the (detached) regrouped
    batch and ``last_stats`` its anchor statistics, for logging.
    """

    def __init__(self, model: nn.Module, config: AnchorConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.last_regrouped: Regrouped | None = None
        # Copies inserted per row in the last call, (B,); None before the first call.
        self.last_anchor_counts: Tensor | None = None
        self.last_stats: dict[str, float] = {}

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def _dummy_pixel_values(self, like: Tensor) -> Tensor:
        """One all-zero image of the vision tower's input: (1, C, H, W) in ``like``'s dtype and
        on its device, C and H = W from the model's vision config."""
        vc = self.model.config.vision_config
        size = vc.image_size
        hw = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        channels = int(getattr(vc, "num_channels", 3))
        return torch.zeros((1, channels, *hw), dtype=like.dtype, device=like.device)

    def _image_features(self, pixel_values: Tensor, like: Tensor, image_kw: dict[str, Any]
                        ) -> Tensor:
        """(N, 3, H, W) pixels -> (N * M, d) projected features, in ``like``'s dtype/device."""
        # The processor gives fp32 pixels; a bf16/fp16 model needs them in its own dtype.
        if pixel_values.is_floating_point():
            pixel_values = pixel_values.to(like.dtype)
        tower = self.model.get_image_features(pixel_values=pixel_values, return_dict=True,
                                              **image_kw)
        return torch.cat(list(tower.pooler_output), dim=0).to(like.device, like.dtype)

    def _without_images(self, embeds: Tensor, image_kw: dict[str, Any]) -> Tensor:
        """(B, L, d) -> (B, L, d), equal values: the tower and projector run on a dummy image
        and their output enters as ``+ 0 * features`` (module doc: why every batch runs them).
        The product is taken per element before the sum, so large features cannot overflow
        to inf and turn the zero into NaN."""
        feats = self._image_features(self._dummy_pixel_values(embeds), embeds, image_kw)
        return embeds + (feats * 0).sum()

    def baseline_embeds(self, input_ids: Tensor, pixel_values: Tensor | None, **image_kw: Any
                        ) -> tuple[Tensor, Tensor]:
        """The baseline sequence HF's LLaVA builds: (B, L) ids -> (B, L, d) embeds, image mask.

        Text positions hold the embedding-table lookup; image placeholder positions hold the
        projected image features, in order. Without ``pixel_values`` the vision tower still
        runs on a dummy image (``_without_images``). Raises ValueError when the placeholder
        count and the feature count disagree.
        """
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, L, d)
        image_mask = input_ids == self.image_token_id  # (B, L)
        n_tokens = int(image_mask.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image tokens but pixel_values is None")
            return self._without_images(embeds, image_kw), image_mask
        feats = self._image_features(pixel_values, embeds, image_kw)
        if n_tokens != feats.shape[0]:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens but pixel_values give {feats.shape[0]} "
                f"image features ({pixel_values.shape[0]} images); render each <image> with the "
                "processor of this model so one placeholder stands for each feature"
            )
        embeds = embeds.masked_scatter(image_mask[..., None], feats)
        return embeds, image_mask

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

    def _regroup(self, input_ids: Tensor, pixel_values: Tensor | None, attention_mask: Tensor,
                 candidate_mask: Tensor | None, labels: Tensor | None, image_kw: dict[str, Any],
                 side: str | None = None, *, sample_index: Tensor | None = None,
                 epoch: int = 0, segment_ids: Tensor | None = None) -> Regrouped:
        if candidate_mask is None:
            raise ValueError(
                f"AnchoredVLM: strategy {self.config.strategy!r} needs candidate_mask (B, L); "
                "build it with attanchor.data (render + collate) or set strategy='none'"
            )
        embeds, image_mask = self.baseline_embeds(input_ids, pixel_values, **image_kw)
        pause = self._pause_embedding(input_ids.device)
        out = regroup(embeds, attention_mask, image_mask, candidate_mask.bool(), labels,
                      self.config, pause_embedding=pause, sample_index=sample_index,
                      epoch=epoch, segment_ids=segment_ids, side=side)
        self._record(out, attention_mask)
        return out

    def _record(self, out: Regrouped, attention_mask: Tensor) -> None:
        n_in = float(attention_mask.sum())
        n_out = float(out.attention_mask.sum())
        counts = out.num_anchors.float()
        sims = out.similarity[out.inserted & (out.origin >= 0)]
        self.last_anchor_counts = out.num_anchors.detach().cpu()
        self.last_regrouped = Regrouped(**{
            k: (v.detach() if isinstance(v, Tensor) else v) for k, v in vars(out).items()})
        self.last_stats = {
            "anchors_mean": float(counts.mean()) if counts.numel() else 0.0,
            "anchors_max": float(counts.max()) if counts.numel() else 0.0,
            "growth_pct": 100.0 * (n_out - n_in) / max(n_in, 1.0),
            "anchor_similarity_mean": float(sims.mean()) if sims.numel() else math.nan,
        }

    def _record_identity(self, attention_mask: Tensor) -> None:
        self.last_regrouped = None
        self.last_anchor_counts = torch.zeros(attention_mask.shape[0], dtype=torch.long)
        self.last_stats = {"anchors_mean": 0.0, "anchors_max": 0.0, "growth_pct": 0.0,
                           "anchor_similarity_mean": math.nan}

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
        segments (``regroup``). Without ``pixel_values`` the vision tower and projector still
        run, on a dummy image that contributes zero (module doc).
        """
        image_kw = {k: kw.pop(k) for k in ("vision_feature_layer",
                                           "vision_feature_select_strategy") if k in kw}
        if not self.config.active:
            self._record_identity(attention_mask)
            if pixel_values is None:  # HF would skip the tower: run it, add its zero
                embeds = self.model.get_input_embeddings()(input_ids)  # (B, L, d)
                return self.model(inputs_embeds=self._without_images(embeds, image_kw),
                                  attention_mask=attention_mask, labels=labels, **kw)
            return self.model(input_ids=input_ids, pixel_values=pixel_values,
                              attention_mask=attention_mask, labels=labels, **image_kw, **kw)
        r = self._regroup(input_ids, pixel_values, attention_mask, candidate_mask, labels, image_kw,
                          sample_index=sample_index, epoch=epoch, segment_ids=segment_ids)
        return self.model(inputs_embeds=r.inputs_embeds, attention_mask=r.attention_mask,
                          position_ids=r.position_ids, labels=r.labels, **kw)

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
        Batches must be left-padded. Decoding then runs HF's ``generate`` with its KV cache;
        position ids continue from the lengthened prompt (HF derives them from the mask, which
        gives the same 0..n'-1 the regroup assigns). ``sample_index``, ``epoch`` and
        ``segment_ids`` as in ``forward`` (a prompt has no labels: without ``segment_ids`` it
        is one segment). A prompt without images runs the vision tower on a dummy image too,
        so sharded ranks gather the same parameters.
        """
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("AnchoredVLM.generate: pad prompts on the left "
                             "(collate(..., padding_side='left'))")
        if not self.config.active:
            self._record_identity(attention_mask)
            if pixel_values is None:  # the same modules on every rank; the value is unused
                like = torch.empty(0, dtype=self.model.get_input_embeddings().weight.dtype,
                                   device=input_ids.device)
                self._image_features(self._dummy_pixel_values(like), like, {})
            if pixel_values is not None:  # HF's generate chokes on an explicit None
                gen_kwargs["pixel_values"] = pixel_values
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      **gen_kwargs)
            return out[:, input_ids.shape[1]:]
        r = self._regroup(input_ids, pixel_values, attention_mask, candidate_mask, None, {},
                          side="left", sample_index=sample_index, epoch=epoch,
                          segment_ids=segment_ids)
        return self.model.generate(inputs_embeds=r.inputs_embeds,
                                   attention_mask=r.attention_mask, **gen_kwargs)
