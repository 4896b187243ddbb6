"""AnchoredVLM: a Hugging Face LLaVA model whose language model sees regrouped sequences.

The wrapper builds the baseline sequence through the model's public API (input embeddings,
``get_image_features``, the image token id), regroups it on the device, then runs the language
model and LM head through the model's own ``forward(inputs_embeds=...)``. With anchoring
inactive (strategy ``none``, or a threshold above 1 with no pause tokens) it delegates to the
wrapped model untouched, so logits, loss and greedy generation equal Hugging Face's exactly.
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
        # Advances across calls: the random control gets fresh, reproducible placements.
        self.generator = torch.Generator().manual_seed(config.seed)
        self.last_regrouped: Regrouped | None = None
        # Copies inserted per row in the last call, (B,); None before the first call.
        self.last_anchor_counts: Tensor | None = None
        self.last_stats: dict[str, float] = {}

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def baseline_embeds(self, input_ids: Tensor, pixel_values: Tensor | None, **image_kw: Any
                        ) -> tuple[Tensor, Tensor]:
        """The baseline sequence HF's LLaVA builds: (B, L) ids -> (B, L, d) embeds, image mask.

        Text positions hold the embedding-table lookup; image placeholder positions hold the
        projected image features, in order. Raises ValueError when the placeholder count and
        the feature count disagree.
        """
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, L, d)
        image_mask = input_ids == self.image_token_id  # (B, L)
        n_tokens = int(image_mask.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image tokens but pixel_values is None")
            return embeds, image_mask
        # The processor gives fp32 pixels; a bf16/fp16 model needs them in its own dtype.
        pixel_values = pixel_values.to(embeds.dtype) if pixel_values.is_floating_point() \
            else pixel_values
        tower = self.model.get_image_features(pixel_values=pixel_values, return_dict=True,
                                              **image_kw)
        feats = torch.cat(list(tower.pooler_output), dim=0).to(embeds.device, embeds.dtype)
        if n_tokens != feats.shape[0]:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens but pixel_values give {feats.shape[0]} "
                f"image features ({pixel_values.shape[0]} images); render each <image> with the "
                "processor of this model so one placeholder stands for each feature"
            )
        embeds = embeds.masked_scatter(image_mask[..., None], feats)
        return embeds, image_mask

    def _regroup(self, input_ids: Tensor, pixel_values: Tensor | None, attention_mask: Tensor,
                 candidate_mask: Tensor | None, labels: Tensor | None, image_kw: dict[str, Any],
                 side: str | None = None) -> Regrouped:
        if candidate_mask is None:
            raise ValueError(
                f"AnchoredVLM: strategy {self.config.strategy!r} needs candidate_mask (B, L); "
                "build it with attanchor.data (render + collate) or set strategy='none'"
            )
        embeds, image_mask = self.baseline_embeds(input_ids, pixel_values, **image_kw)
        pause = None
        if self.config.pause_tokens:
            pad_id = self.model.config.text_config.pad_token_id
            if pad_id is None:
                pad_id = self.model.config.pad_token_id
            if pad_id is None:
                raise ValueError("pause_tokens need a pad token id in the model's config")
            pause = self.model.get_input_embeddings().weight[int(pad_id)]
        out = regroup(embeds, attention_mask, image_mask, candidate_mask.bool(), labels,
                      self.config, pause_embedding=pause, generator=self.generator, side=side)
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
        **kw: Any,
    ) -> Any:
        """HF's causal-LM output; with anchoring, logits are over the regrouped sequence
        (B, L', V) and the loss uses the regrouped labels (copies are never trained on)."""
        if not self.config.active:
            self._record_identity(attention_mask)
            return self.model(input_ids=input_ids, pixel_values=pixel_values,
                              attention_mask=attention_mask, labels=labels, **kw)
        image_kw = {k: kw.pop(k) for k in ("vision_feature_layer",
                                           "vision_feature_select_strategy") if k in kw}
        r = self._regroup(input_ids, pixel_values, attention_mask, candidate_mask, labels, image_kw)
        return self.model(inputs_embeds=r.inputs_embeds, attention_mask=r.attention_mask,
                          position_ids=r.position_ids, labels=r.labels, **kw)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        attention_mask: Tensor,
        candidate_mask: Tensor | None = None,
        **gen_kwargs: Any,
    ) -> Tensor:
        """Generate with the prompt regrouped once at prefill; returns only the new tokens.

        Returns a LongTensor (B, T_new): the generated ids without the prompt (the regrouped
        prompt has no single id sequence to prepend), in both the anchored and the plain path.
        Batches must be left-padded. Decoding then runs HF's ``generate`` with its KV cache;
        position ids continue from the lengthened prompt (HF derives them from the mask, which
        gives the same 0..n'-1 the regroup assigns).
        """
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("AnchoredVLM.generate: pad prompts on the left "
                             "(collate(..., padding_side='left'))")
        if not self.config.active:
            self._record_identity(attention_mask)
            out = self.model.generate(input_ids=input_ids, pixel_values=pixel_values,
                                      attention_mask=attention_mask, **gen_kwargs)
            return out[:, input_ids.shape[1]:]
        r = self._regroup(input_ids, pixel_values, attention_mask, candidate_mask, None, {},
                          side="left")
        return self.model.generate(inputs_embeds=r.inputs_embeds,
                                   attention_mask=r.attention_mask, **gen_kwargs)
