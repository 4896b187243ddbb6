"""Processed images per model family: pixel layouts, size tensors, token counts, batching.

Three layouts, told apart by the keys the family's image processor returns (never by a
registry): the renderer and collate stay family-agnostic.

==============  =========================================  =====================  ===========
family          pixel_values of one image                  size tensor (per img)  tokens
==============  =========================================  =====================  ===========
LLaVA           (3, H, W), fixed size                      none                   fixed
LLaVA-NeXT      (n_tiles, 3, S, S), n_tiles by aspect      image_sizes (2,) h, w  by size
Qwen2.5-VL      (n_patches, C * T * P * P) flat patches    image_grid_thw (3,)    t*h*w / m^2
==============  =========================================  =====================  ===========

Token counts are always the processor's own answer (``replace_image_token`` on the image
processor's output), so a placeholder stands for exactly one image feature whatever the family.

Batching (``batch_images``): LLaVA stacks (N, 3, H, W) (one size required); NeXT pads every
image to the most tiles with zero tiles, as the processor does (the model drops them again by
``image_sizes``), -> (N, max_tiles, 3, S, S); Qwen concatenates patches -> (sum of patches,
C * T * P * P). Size tensors are stacked: ``image_sizes`` (N, 2), ``image_grid_thw`` (N, 3).

Example (the tiny Qwen: patch 4, merge 2): a 32x24 (w x h) image -> grid (1, 6, 8), 48 patches
of 96 values, 6 * 8 / 4 = 12 tokens; with a 64x64 image (grid (1, 16, 16), 256 patches, 64
tokens) in the same batch: pixel_values (304, 96), image_grid_thw [[1, 6, 8], [1, 16, 16]].
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

SIZE_KEYS = ("image_sizes", "image_grid_thw")  # per-image size tensors a family may carry


@dataclass
class ProcessedImage:
    """One image through the family's image processor.

    ``pixel_values``: this image's slice of the processor output (layouts: module doc).
    ``sizes``: its size tensors by key (``{"image_grid_thw": (3,)}``, ``{"image_sizes": (2,)}``
    or empty for LLaVA). ``num_tokens``: placeholders the model reserves for it."""

    pixel_values: torch.Tensor
    num_tokens: int
    sizes: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.pixel_values, *self.sizes.values()])


def token_counts(processor: Any, image_inputs: dict[str, Any] | torch.Tensor,
                 image_token: str) -> list[int]:
    """Tokens the model reserves for each processed image, asked from the processor
    (``replace_image_token``: LLaVA patches + additional tokens - CLS per its strategy; NeXT
    from ``image_sizes`` and the tiles; Qwen ``grid.prod() // merge**2``).

    ``image_inputs``: the image processor's output (a tensor is LLaVA's ``pixel_values``)."""
    if isinstance(image_inputs, torch.Tensor):
        image_inputs = {"pixel_values": image_inputs}
    n = _num_images(image_inputs)
    try:
        return [processor.replace_image_token(image_inputs, i).count(image_token)
                for i in range(n)]
    except (AttributeError, NotImplementedError) as e:
        raise TypeError(f"{type(processor).__name__} does not say how many tokens an image "
                        "takes (replace_image_token); use the model's own processor "
                        "(LlavaProcessor, LlavaNextProcessor, Qwen2_5_VLProcessor or "
                        "attanchor.data.tiny_qwen.QwenImageProcessor)") from e


def _num_images(image_inputs: dict[str, Any]) -> int:
    for key in SIZE_KEYS:
        if image_inputs.get(key) is not None:
            return len(image_inputs[key])
    return len(image_inputs["pixel_values"])


def process(processor: Any, image: Image.Image, image_token: str) -> ProcessedImage:
    """Run the processor's image processor on one image (module doc for the layouts)."""
    out = processor.image_processor(images=[image], return_tensors="pt")
    inputs = {k: out[k] for k in ("pixel_values", *SIZE_KEYS) if out.get(k) is not None}
    count = token_counts(processor, inputs, image_token)[0]
    sizes = {k: torch.as_tensor(inputs[k])[0] for k in SIZE_KEYS if k in inputs}
    pv = inputs["pixel_values"]
    # Qwen returns this image's patches flat (n_patches, D); the others a batch of one.
    pixel_values = pv if "image_grid_thw" in sizes else pv[0]
    return ProcessedImage(pixel_values, count, sizes)


def batch_images(images: Sequence[ProcessedImage], where: str = "batch"
                 ) -> dict[str, torch.Tensor]:
    """Images in order -> ``{"pixel_values": ..., <size keys>: (N, k)}`` (module doc).

    Raises ValueError when images of one batch come from different families or, for LLaVA,
    have different shapes (the image processor must resize to one size)."""
    if not images:
        raise ValueError(f"{where}: no images to batch")
    keys = {tuple(sorted(im.sizes)) for im in images}
    if len(keys) > 1:
        raise ValueError(f"{where}: images with different size tensors {sorted(keys)} in one "
                         "batch; render every sample with the same processor")
    sizes = {k: torch.stack([im.sizes[k] for im in images]) for k in images[0].sizes}
    pvs = [im.pixel_values for im in images]
    if "image_grid_thw" in sizes:  # Qwen: flat patches, concatenated
        return {"pixel_values": torch.cat(pvs), **sizes}  # (sum patches, D)
    if "image_sizes" in sizes:  # NeXT: pad the tile dimension with zero tiles
        most = max(p.shape[0] for p in pvs)
        pvs = [torch.cat([p, p.new_zeros((most - p.shape[0], *p.shape[1:]))]) for p in pvs]
        return {"pixel_values": torch.stack(pvs), **sizes}  # (N, max_tiles, 3, S, S)
    shapes = {tuple(p.shape) for p in pvs}
    if len(shapes) > 1:
        raise ValueError(f"{where}: images of different shapes {sorted(shapes)} in one batch; "
                         "the image processor must resize to one size")
    return {"pixel_values": torch.stack(pvs)}  # (N, 3, H, W)


def merge_batches(parts: Sequence[dict[str, torch.Tensor]], where: str = "collate"
                  ) -> dict[str, torch.Tensor]:
    """Per-sample image dicts (``batch_images`` outputs) in sample order -> one batch dict,
    with the same layout rules (NeXT tiles padded to the most in the batch)."""
    keys = {tuple(sorted(p)) for p in parts}
    if len(keys) > 1:
        raise ValueError(f"{where}: samples with different image tensors {sorted(keys)} in one "
                         "batch; render every sample with the same processor")
    sizes = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k in SIZE_KEYS}
    pvs = [p["pixel_values"] for p in parts]
    if "image_sizes" in sizes:
        most = max(p.shape[1] for p in pvs)
        pvs = [torch.cat([p, p.new_zeros((p.shape[0], most - p.shape[1], *p.shape[2:]))], 1)
               for p in pvs]
    elif "image_grid_thw" not in sizes:
        shapes = {tuple(p.shape[1:]) for p in pvs}
        if len(shapes) > 1:
            raise ValueError(f"{where}: images of different shapes {sorted(shapes)} in one "
                             "batch; the image processor must resize to one size")
    return {"pixel_values": torch.cat(pvs), **sizes}


def take_images(images: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor] | None:
    """The first ``n`` images of a per-sample dict (truncation kept ``n``); None for 0."""
    if n == 0:
        return None
    out = {k: v[:n] for k, v in images.items() if k in SIZE_KEYS}
    pv = images["pixel_values"]
    if "image_grid_thw" in out:  # flat patches: keep the first n images' patches
        pv = pv[:int(images["image_grid_thw"][:n].prod(dim=1).sum())]
    else:
        pv = pv[:n]
    return {"pixel_values": pv, **out}


def load_processor(path: str | os.PathLike, **kwargs: Any) -> Any:
    """The processor of a model directory or hub id: ``AutoProcessor``, except for a saved
    Qwen2-VL-style image processor, which loads through
    ``attanchor.data.tiny_qwen.load_qwen_processor`` (HF's own Qwen processor when torchvision
    imports, else the images-only ``QwenImageProcessor``: HF's needs torchvision for videos)."""
    path = str(path)
    file = Path(path) / "processor_config.json"
    if file.is_file():
        kind = json.loads(file.read_text()).get("image_processor", {}).get(
            "image_processor_type", "")
        if str(kind).startswith("Qwen2VLImageProcessor"):
            from attanchor.data.tiny_qwen import load_qwen_processor

            return load_qwen_processor(path, **kwargs)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, **kwargs)
