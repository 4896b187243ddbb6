"""The paper's picture: each anchored word drawn on the image patch its copy was attached to.

``draw_anchors`` is pure drawing. Which word went to which patch comes from the model
(``AnchoredVLM.last_regrouped``: an inserted copy's ``origin`` is the word, its ``host`` the image
token it follows; the host's rank among the row's image tokens is the patch index, mapped per
family to the right patch of the right tile / merged grid); gathering that is the job of
``attanchor visualize`` (``visualize_run``). Grids may be non-square: ``patch_grid=(rows, cols)``
(LLaVA-NeXT's stitched tiles, Qwen2.5-VL's merged grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_FILL = (255, 190, 0, 90)  # anchored patch tint (RGBA)
_OUTLINE = (255, 60, 0, 255)
_GRID = (255, 255, 255, 110)
_PANEL_BG = (255, 255, 255)
_INK = (20, 20, 20)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than a line is split by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:
                if draw.textlength(line + ch, font=font) > width and line:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def _cell(index: int, grid: tuple[int, int], width: int, height: int
          ) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of patch `index` (row-major over ``grid = (rows, cols)``) on
    a width x height canvas; x1, y1 exclusive. Boundaries are round(i * size / n), so cells
    tile the canvas exactly."""
    rows, cols = grid
    r, c = divmod(index, cols)
    return (round(c * width / cols), round(r * height / rows),
            round((c + 1) * width / cols), round((r + 1) * height / rows))


def _grid(patch_grid: int | tuple[int, int]) -> tuple[int, int]:
    """``patch_grid`` as (rows, cols); ValueError unless both are ints >= 1."""
    pair = (patch_grid, patch_grid) if not isinstance(patch_grid, tuple | list) else patch_grid
    if len(pair) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                             for n in pair):
        raise ValueError(f"patch_grid={patch_grid!r} must be an int >= 1 or (rows, cols)")
    return int(pair[0]), int(pair[1])


def draw_anchors(
    image: Image.Image,
    patch_grid: int | tuple[int, int],
    anchors: Sequence[tuple[str, int]],
    answer: str,
    prompt: str,
    out_png: str | Path | None = None,
    scale: float | None = None,
    panel_width: int = 360,
) -> Image.Image:
    """Draw anchored words on their patches beside the prompt and the model's answer.

    Args:
        image: the image as the vision tower saw it (after the processor's resize/crop), so that
            the grid over it is the tower's patch grid.
        patch_grid: patches per side (image tokens per image = patch_grid ** 2, e.g. 24 for
            CLIP ViT-L/14-336, 8 for the tiny model), or (rows, cols) for a non-square grid.
        anchors: (word, patch index) pairs; index is row-major in [0, rows * cols). Several
            words on one patch are stacked top to bottom in the given order.
        answer, prompt: shown in the side panel, wrapped (cut with "..." at the bottom).
        out_png: where to save the PNG (parent folders are created); None: do not save.
        scale: upscaling factor of the image; None: the longer side becomes 640 px.
        panel_width: width in pixels of the text panel on the right.

    Returns the RGB picture of size (round(W * scale) + panel_width, round(H * scale)), where
    (W, H) = image.size: the image upscaled with nearest-neighbour sampling, light grid lines on
    the patch boundaries, each anchored patch tinted and outlined, its words written on it, and
    a white panel listing the prompt, the answer and every (word -> patch row, column).
    Pixels of patches without anchors are the upscaled image except on the grid lines.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    grid = _grid(patch_grid)
    rows, cols = grid
    if panel_width < 0:
        raise ValueError(f"panel_width={panel_width} must be >= 0")
    for word, index in anchors:
        if isinstance(index, bool) or not isinstance(index, int) \
                or not 0 <= index < rows * cols:
            raise ValueError(f"anchor {word!r}: patch index {index!r} is outside "
                             f"[0, {rows * cols}) for a {rows}x{cols} grid")
    w, h = image.size
    if scale is None:
        scale = 640 / max(w, h)
    if scale <= 0:
        raise ValueError(f"scale={scale} must be > 0")
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))

    base = image.convert("RGB").resize((sw, sh), Image.Resampling.NEAREST)
    overlay = Image.new("RGBA", (sw, sh), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for i in range(1, cols):
        x = round(i * sw / cols)
        draw.line([(x, 0), (x, sh - 1)], fill=_GRID, width=1)
    for i in range(1, rows):
        y = round(i * sh / rows)
        draw.line([(0, y), (sw - 1, y)], fill=_GRID, width=1)
    by_patch: dict[int, list[str]] = {}
    for word, index in anchors:
        by_patch.setdefault(index, []).append(word)
    cell_h = sh / rows
    font = _font(max(9, min(22, int(cell_h / 3))))
    for index in by_patch:
        x0, y0, x1, y1 = _cell(index, grid, sw, sh)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=_FILL, outline=_OUTLINE, width=2)
    picture = Image.alpha_composite(base.convert("RGBA"), overlay)
    draw = ImageDraw.Draw(picture)
    for index, words in by_patch.items():  # words after tints so no tint covers a word
        x0, y, _, _ = _cell(index, grid, sw, sh)
        for word in words:
            left, top, right, bottom = draw.textbbox((x0 + 3, y + 3), word, font=font)
            draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=(0, 0, 0, 200))
            draw.text((x0 + 3, y + 3), word, font=font, fill=(255, 255, 255, 255))
            y = bottom + 2

    out = Image.new("RGB", (sw + panel_width, sh), _PANEL_BG)
    out.paste(picture.convert("RGB"), (0, 0))
    if panel_width > 0:
        _panel(out, sw, panel_width, sh, prompt, answer, anchors, cols)
    if out_png is not None:
        path = Path(out_png)
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save(path, format="PNG")
    return out


def _panel(out: Image.Image, x_left: int, width: int, height: int, prompt: str, answer: str,
           anchors: Sequence[tuple[str, int]], cols: int) -> None:
    draw = ImageDraw.Draw(out)
    bold, body = _font(16), _font(14)
    margin = 12
    inner = max(1, width - 2 * margin)
    listing = ", ".join(f"{w} -> ({i // cols}, {i % cols})" for w, i in anchors) or "none"
    blocks = [("Prompt", prompt), ("Answer", answer),
              (f"Anchors: {len(anchors)} (word -> patch row, col)", listing)]
    y = margin
    step = 18
    for title, text in blocks:
        lines = [(title, bold)] + [(line, body) for line in _wrap(draw, text, body, inner)]
        for line, font in lines:
            if y + step > height - margin:
                draw.text((x_left + margin, y - step), "...", font=body, fill=_INK)
                return
            draw.text((x_left + margin, y), line, font=font, fill=_INK)
            y += step
        y += step // 2
