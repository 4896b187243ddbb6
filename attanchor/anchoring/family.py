"""Model families: the three questions anchoring asks a vision-language model, per class.

A family adapter answers the baseline sequence (text embeddings with the image features in
place), which image positions may host a copy and be matched, and the position ids of the
regrouped sequence; ``regroup`` itself never changes. ``family_for`` picks the adapter from the
(peft-unwrapped) model's class with a plain ``if``/``elif``.

Example (LLaVA-NeXT, CLIP 32 px / patch 8 -> a 4x4-feature tile, pinpoints [[32, 64],
[64, 32], [64, 64]]; one 40x80 (H x W) image -> pinpoint 32x64, two tiles side by side)::

    image block = 16 base-tile features, then 4 rows of (8 tile features + 1 newline) = 52
    newline slots (offsets in the block): 16 + r * 9 + 8 for r = 0..3 -> 24, 33, 42, 51
    Baseline.image_mask is True on the 48 other slots: a newline never hosts a copy and is
    never matched by a prompt word; its embedding stays in the sequence untouched.

Invariants: ``baseline`` equals what Hugging Face's own forward feeds its language model
(``torch.equal``); ``positions`` of a ``none`` regroup equal the model's own positions, so the
``none`` strategy (which delegates to HF anyway) and an anchored run without copies agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attanchor.anchoring.regroup import Regrouped


@dataclass
class Baseline:
    """The baseline sequence of one batch, as the model's own forward would build it.

    ``embeds`` (B, L, d): text embeddings, image features placed at the image tokens.
    ``image_mask`` (B, L) bool: image positions that may host a copy and be matched (NeXT:
    image-newline slots excluded; Qwen: vision_start/end are text, not image).
    ``position_ids``: the model's own positions for the baseline; None for 1-D families (HF
    derives them from the mask), (3, B, L) for Qwen2.5-VL.
    """

    embeds: Tensor
    image_mask: Tensor
    position_ids: Tensor | None


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a peft wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _floating(pixel_values: Tensor, like: Tensor) -> Tensor:
    # The processor gives fp32 pixels; a bf16/fp16 model needs them in its own dtype.
    return pixel_values.to(like.dtype) if pixel_values.is_floating_point() else pixel_values


def _place(embeds: Tensor, placeholders: Tensor, feats: Tensor, n_images: int) -> Tensor:
    """(B, L, d) with (N, d) features scattered in order at the placeholder positions.

    Raises ValueError when the placeholder count and the feature count disagree."""
    n_tokens = int(placeholders.sum())
    if n_tokens != feats.shape[0]:
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens but pixel_values give {feats.shape[0]} "
            f"image features ({n_images} images); render each <image> with the processor of "
            "this model so one placeholder stands for each feature"
        )
    return embeds.masked_scatter(placeholders[..., None], feats)


class LlavaFamily:
    """``LlavaForConditionalGeneration``: one placeholder per projected CLIP patch, 1-D
    positions. The behaviour AnchoredVLM had before families existed, bit for bit."""

    name = "llava"
    image_keys: tuple[str, ...] = ("pixel_values",)

    def dummy_images(self, model: nn.Module, like: Tensor) -> dict[str, Tensor]:
        """One all-zero image of the vision tower's input, (1, C, H, W) in ``like``'s dtype
        and on its device, C and H = W from the model's vision config."""
        vc = model.config.vision_config
        size = vc.image_size
        hw = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        channels = int(getattr(vc, "num_channels", 3))
        return {"pixel_values": torch.zeros((1, channels, *hw), dtype=like.dtype,
                                            device=like.device)}

    def features(self, model: nn.Module, images: dict[str, Tensor], like: Tensor,
                 **image_kw: Any) -> Tensor:
        """Images -> (N_feat, d) projected features in order, in ``like``'s dtype/device."""
        extra = {k: v for k, v in images.items() if k != "pixel_values"}
        tower = model.get_image_features(pixel_values=_floating(images["pixel_values"], like),
                                         return_dict=True, **extra, **image_kw)
        return torch.cat(list(tower.pooler_output), dim=0).to(like.device, like.dtype)

    def host_mask(self, model: nn.Module, input_ids: Tensor, images: dict[str, Tensor] | None
                  ) -> Tensor:
        """(B, L) bool: image placeholders that may host and be matched (all of them)."""
        return input_ids == int(model.config.image_token_id)

    def baseline(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                 images: dict[str, Tensor] | None, **image_kw: Any) -> Baseline:
        """(B, L) ids -> the baseline HF builds; without images the tower still runs on a
        dummy image whose features enter as ``+ 0 * features`` (AnchoredVLM's module doc),
        the product taken per element so large features cannot overflow to inf -> NaN."""
        embeds = model.get_input_embeddings()(input_ids)  # (B, L, d)
        placeholders = input_ids == int(model.config.image_token_id)  # (B, L)
        if images is None or images.get("pixel_values") is None:
            n_tokens = int(placeholders.sum())
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image tokens but pixel_values is None")
            feats = self.features(model, self.dummy_images(model, embeds), embeds, **image_kw)
            return Baseline(embeds + (feats * 0).sum(), placeholders, None)
        feats = self.features(model, images, embeds, **image_kw)
        embeds = _place(embeds, placeholders, feats, images["pixel_values"].shape[0])
        return Baseline(embeds, self.host_mask(model, input_ids, images), None)

    def positions(self, base: Baseline, out: Regrouped) -> Tensor:
        """1-D: the regroup's own 0..n'-1 over real tokens (HF's numbering)."""
        return out.position_ids

    def generate(self, model: nn.Module, out: Regrouped, positions: Tensor, **gen_kwargs: Any
                 ) -> Tensor:
        """New tokens (B, T_new) from the regrouped prompt. HF derives 1-D positions from the
        left-padded mask, which equal ``positions`` (0..n'-1), so they are not passed."""
        return model.generate(inputs_embeds=out.inputs_embeds, attention_mask=out.attention_mask,
                              **gen_kwargs)


class LlavaNextFamily(LlavaFamily):
    """``LlavaNextForConditionalGeneration`` (LLaVA-1.6): any-resolution tiles, each image a
    base tile then the unpadded tile grid row by row with an ``image_newline`` after every
    row. Every tile feature hosts and is matched; newline slots never (module doc)."""

    name = "llava_next"
    image_keys: tuple[str, ...] = ("pixel_values", "image_sizes")

    def dummy_images(self, model: nn.Module, like: Tensor) -> dict[str, Tensor]:
        """One all-zero square image of the tower's size, as the processor would tile it:
        pixel_values (1, n_tiles, C, S, S) and image_sizes [[S, S]]."""
        from transformers.models.llava_next.modeling_llava_next import (
            image_size_to_num_patches,
        )
        cfg = unwrap(model).config
        size = int(cfg.vision_config.image_size)
        n = image_size_to_num_patches((size, size), cfg.image_grid_pinpoints, size)
        channels = int(getattr(cfg.vision_config, "num_channels", 3))
        pixels = torch.zeros((1, n, channels, size, size), dtype=like.dtype, device=like.device)
        return {"pixel_values": pixels,
                "image_sizes": torch.tensor([[size, size]], device=like.device)}

    def newline_slots(self, model: nn.Module, image_sizes: Tensor,
                      vision_feature_select_strategy: str | None = None) -> Tensor:
        """(N_feat,) bool over the packed features of all images: True at image-newline slots.

        Marked through the public API: ``pack_image_features`` over an arange "feature" with
        ``image_newline = -1`` puts -1 exactly where the model puts its newline embedding."""
        layout = self.layout(model, image_sizes, vision_feature_select_strategy)
        return torch.cat(layout) < 0

    def layout(self, model: nn.Module, image_sizes: Tensor,
               vision_feature_select_strategy: str | None = None) -> list[Tensor]:
        """Per image, (n_slots,) long: the packed slot's source ``tile * P * P + r * P + c``
        (tile 0 the base tile; r, c the patch inside the tile, P = image_size // patch) or -1
        for a newline slot. Lets ``visualize`` draw a match on the right patch of the right
        tile; ``newline_slots`` is ``layout < 0``."""
        from transformers.models.llava_next.modeling_llava_next import (
            image_size_to_num_patches,
        )
        hf = unwrap(model)
        cfg = hf.config
        strategy = vision_feature_select_strategy or cfg.vision_feature_select_strategy
        side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        feats = []
        for size in image_sizes.tolist():
            n = image_size_to_num_patches(size, cfg.image_grid_pinpoints,
                                          int(cfg.vision_config.image_size))
            # (n_tiles, P*P, 1): the source index of every patch feature, as a float "feature".
            feats.append(torch.arange(n * side * side, dtype=torch.float64).view(n, -1, 1))
        packed, _ = hf.pack_image_features(feats, image_sizes.cpu(), strategy,
                                           image_newline=torch.tensor([-1.0], dtype=torch.float64))
        return [p[:, 0].long() for p in packed]

    def host_mask(self, model: nn.Module, input_ids: Tensor, images: dict[str, Tensor] | None
                  ) -> Tensor:
        """(B, L) bool: image placeholders except the image-newline slots."""
        placeholders = input_ids == int(model.config.image_token_id)
        if images is None or images.get("image_sizes") is None:
            return placeholders
        newline = self.newline_slots(model, images["image_sizes"]).to(input_ids.device)
        if int(placeholders.sum()) != newline.numel():
            raise ValueError(f"input_ids hold {int(placeholders.sum())} image tokens but "
                             f"image_sizes give {newline.numel()} packed slots")
        return placeholders.masked_scatter(placeholders, ~newline)

    def baseline(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                 images: dict[str, Tensor] | None, **image_kw: Any) -> Baseline:
        if images is not None and images.get("pixel_values") is not None \
                and images.get("image_sizes") is None:
            raise ValueError("LLaVA-NeXT: the batch has pixel_values but no image_sizes; "
                             "collate them from the processor's output (batch['image_sizes'])")
        return super().baseline(model, input_ids, attention_mask, images, **image_kw)


SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
             "Qwen2_5_VLForConditionalGeneration")


def family_for(model: nn.Module) -> Any:
    """The family adapter of a (peft-wrapped or plain) Hugging Face model, by its class.

    Raises ValueError naming the supported classes for any other class."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    hf = unwrap(model)
    if isinstance(hf, LlavaNextForConditionalGeneration):
        return LlavaNextFamily()
    if isinstance(hf, LlavaForConditionalGeneration):
        return LlavaFamily()
    from transformers import Qwen2_5_VLForConditionalGeneration
    if isinstance(hf, Qwen2_5_VLForConditionalGeneration):
        from attanchor.anchoring.qwen import QwenVLFamily  # here: qwen imports this module
        return QwenVLFamily()
    raise ValueError(f"attention anchoring does not support {type(hf).__name__}; supported "
                     f"model classes: {', '.join(SUPPORTED)}")
