"""`attanchor visualize`: one image and prompt through the anchored model; each anchored word
drawn on the patch it was attached to, beside the model's answer (the paper's figure)."""

from __future__ import annotations

import math
from collections.abc import Callable
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
    new = anchored.generate(batch["input_ids"].to(table.device),
                            batch["pixel_values"].to(table.device, table.dtype),
                            batch["attention_mask"].to(table.device),
                            candidate_mask=batch["candidate_mask"].to(table.device),
                            do_sample=False, max_new_tokens=max_new_tokens,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    answer = tok.decode(new[0], skip_special_tokens=True).strip()
    anchors = anchors_of_row(anchored, batch["input_ids"], tok)
    n_image_tokens = int((batch["input_ids"][0] == anchored.image_token_id).sum())
    grid = math.isqrt(n_image_tokens)
    picture = tower_image(batch["pixel_values"][0], processor.image_processor)
    draw_anchors(picture, grid, anchors, answer, prompt, out)
    print(f"answer: {answer!r}; anchors: {anchors}")
    print(f"wrote {out}")
    return 0
