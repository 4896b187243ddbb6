"""`attanchor visualize`: one image and prompt through the anchored model; each anchored word
drawn on the patch it was attached to, beside the model's answer (the paper's figure).

Where a host lands, per family (``figures``): LLaVA, the k-th image token is patch k of the
tower's square grid. LLaVA-NeXT, the k-th image token is packed slot k, whose source
(``LlavaNextFamily.layout``) is (tile, row, col): tile 0 (the whole image at the tower's size)
is drawn as its own figure ``<out>-base.png``, tiles 1.. are stitched in their grid (rows of
tiles, as the processor cut them) and the anchor drawn at (tile_row * P + row,
tile_col * P + col). Example (P = 4, a 40x80 image -> 1 x 2 tiles): slot 20 is tile 2 patch
(0, 0), drawn at canvas (0, 4). Qwen2.5-VL, the k-th image token is merged cell k of the
(h / merge, w / merge) grid in raster order (the same row / column the rope positions give
it: h - start, w - start), drawn over the image resized as the processor resized it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.data.collate import collate
from attanchor.data.formats import IMAGE_PLACEHOLDER, Conversation, Turn
from attanchor.data.render import Renderer
from attanchor.eval.device import resolve_device
from attanchor.eval.visualize import draw_anchors


def anchors_of_row(anchored: AnchoredVLM, input_ids: torch.Tensor, tokenizer,
                   row: int = 0) -> list[tuple[str, int]]:
    """(word, patch index) for each anchor of ``row`` in the last call: a text copy attached
    after an image token, or an image copy attached after a text token (image_into_text)."""
    r = anchored.last_regrouped
    if r is None:
        return []
    image_pos = (input_ids[row] == anchored.image_token_id).nonzero().flatten().tolist()
    patch_of = {p: i for i, p in enumerate(image_pos)}
    pairs = []
    for origin, host, inserted in zip(r.origin[row].tolist(), r.host[row].tolist(),
                                      r.inserted[row].tolist()):
        if not inserted or origin < 0:
            continue
        if host in patch_of:  # a word copied into the image span
            word_pos, patch = origin, patch_of[host]
        else:  # an image token copied next to a word
            word_pos, patch = host, patch_of[origin]
        pairs.append((tokenizer.convert_ids_to_tokens(int(input_ids[row, word_pos])), patch))
    return pairs


@dataclass
class Figure:
    """One picture to draw: the image as the tower saw it, its (rows, cols) patch grid, the
    (word, patch index) anchors on it and the file-name suffix ("" or "-base")."""

    picture: Image.Image
    grid: tuple[int, int]
    anchors: list[tuple[str, int]]
    suffix: str = ""


def next_canvas_index(src: int, side: int, tiles_wide: int) -> tuple[int, int]:
    """LLaVA-NeXT: a packed slot's source ``tile * side**2 + r * side + c`` -> (tile, index):
    tile 0 keeps ``r * side + c`` (base-tile grid side x side); tile t >= 1 maps to the
    stitched canvas (rows of ``tiles_wide`` tiles) as row-major index over its
    ``tiles_wide * side`` columns. Example: side 4, 2 tiles wide, src 32 (tile 2, (0, 0)) ->
    (2, 4); src 20 (tile 1, (1, 0)) -> (1, 8)."""
    tile, rc = divmod(src, side * side)
    r, c = divmod(rc, side)
    if tile == 0:
        return 0, rc
    tr, tc = divmod(tile - 1, tiles_wide)
    return tile, (tr * side + r) * (tiles_wide * side) + tc * side + c


def figures(anchored: AnchoredVLM, processor: Any, batch: dict[str, Any],
            anchors: list[tuple[str, int]], image_path: Path) -> list[Figure]:
    """The figures of row 0 (one image) with anchors moved from image-token rank to the
    family's patch (module doc)."""
    name = anchored.family.name
    pixels = batch["pixel_values"]
    if name == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
        )

        from attanchor.anchoring.family import unwrap

        cfg = unwrap(anchored.model).config
        size = int(cfg.vision_config.image_size)
        side = size // int(cfg.vision_config.patch_size)
        image_size = batch["image_sizes"][0].tolist()
        rows, cols = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, size)
        layout = anchored.family.layout(anchored.model, batch["image_sizes"][:1])[0]
        canvas = Image.new("RGB", (cols * size, rows * size))
        for k in range(rows * cols):
            canvas.paste(tower_image(pixels[0][1 + k], processor.image_processor),
                         ((k % cols) * size, (k // cols) * size))
        base, tiled = [], []
        for word, slot in anchors:
            src = int(layout[slot])
            if src < 0:  # regroup never hosts at a newline slot (family.host_mask)
                raise RuntimeError(f"anchor {word!r} on image-newline slot {slot}")
            tile, index = next_canvas_index(src, side, cols)
            (base if tile == 0 else tiled).append((word, index))
        return [Figure(canvas, (rows * side, cols * side), tiled),
                Figure(tower_image(pixels[0][0], processor.image_processor), (side, side),
                       base, "-base")]
    if name == "qwen2_5_vl":
        ip = processor.image_processor
        _, h, w = (int(x) for x in batch["image_grid_thw"][0])
        merge, patch = int(ip.merge_size), int(ip.patch_size)
        with Image.open(image_path) as im:
            picture = im.convert("RGB").resize((w * patch, h * patch),
                                               Image.Resampling.BICUBIC)
        return [Figure(picture, (h // merge, w // merge), anchors)]
    grid = math.isqrt(int((batch["input_ids"][0] == anchored.image_token_id).sum()))
    return [Figure(tower_image(pixels[0], processor.image_processor), (grid, grid), anchors)]


def tower_image(pixel_values: torch.Tensor, image_processor) -> Image.Image:
    """Undo the processor's normalisation: the image exactly as the vision tower saw it."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    x = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


@torch.no_grad()
def run_visualize(checkpoint: str, image: str, prompt: str, out: str, *,
                  max_new_tokens: int = 16, device: str | torch.device | None = "auto",
                  anchor_override: Callable[[AnchorConfig], AnchorConfig | None] = lambda c: None,
                  **render: Any) -> int:
    """Answer ``prompt`` about ``image`` and draw the anchors to ``out``. The prompt is
    rendered with the template and scope the run trained with unless ``render`` overrides
    them (``template=``, ``scope=``, as for ``load_anchored``); the model runs on ``device``
    (``attanchor.eval.device.resolve_device``) in its own dtype."""
    from attanchor.train.checkpoint import load_anchored

    loaded = load_anchored(checkpoint, device=resolve_device(device), **render)
    anchored, processor = loaded.anchored, loaded.processor
    override = anchor_override(anchored.config)
    if override is not None:
        anchored = AnchoredVLM(anchored.model, override).eval()
    image_path = Path(image).resolve()
    conv = Conversation(id="visualize", turns=[Turn("user", f"{IMAGE_PLACEHOLDER}\n{prompt}")],
                        images=[image_path.name])
    renderer = Renderer(processor, template=loaded.render.template, scope=loaded.render.scope,
                        image_root=image_path.parent)
    tok = processor.tokenizer
    batch = collate([renderer(conv, for_generation=True)], tok.pad_token_id, "left")
    table = anchored.model.get_input_embeddings().weight  # where and in what dtype it runs
    extra = {k: batch[k].to(table.device) for k in anchored.family.image_keys
             if k != "pixel_values" and batch.get(k) is not None}  # image_sizes, grid_thw
    new = anchored.generate(batch["input_ids"].to(table.device),
                            batch["pixel_values"].to(table.device, table.dtype),
                            batch["attention_mask"].to(table.device),
                            candidate_mask=batch["candidate_mask"].to(table.device),
                            do_sample=False, max_new_tokens=max_new_tokens,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            **extra)
    answer = tok.decode(new[0], skip_special_tokens=True).strip()
    anchors = anchors_of_row(anchored, batch["input_ids"], tok)
    for fig in figures(anchored, processor, batch, anchors, image_path):
        path = Path(out)
        path = path.with_name(f"{path.stem}{fig.suffix}{path.suffix}") if fig.suffix else path
        draw_anchors(fig.picture, fig.grid, fig.anchors, answer, prompt, path)
        print(f"wrote {path}")
    print(f"answer: {answer!r}; anchors (word, image token): {anchors}")
    return 0
