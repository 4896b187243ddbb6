"""draw_anchors: documented output size, anchored patches drawn on, the rest left as it was."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from attanchor.eval.visualize import draw_anchors


def _image() -> Image.Image:
    # 64x64, 8x8 grid of 8 px patches; each patch a distinct flat colour.
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    for r in range(8):
        for c in range(8):
            arr[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = (r * 30, c * 30, 200)
    return Image.fromarray(arr)


def test_size_and_pixels(tmp_path) -> None:
    src = _image()
    out_png = tmp_path / "a" / "vis.png"
    # patch 9 = row 1, col 1; patch 63 = row 7, col 7.
    out = draw_anchors(src, 8, [("red", 9), ("circle", 9), ("is", 63)], "yes",
                       "Is there a red circle?", out_png, scale=4, panel_width=200)
    assert out.size == (64 * 4 + 200, 64 * 4)
    with Image.open(out_png) as saved:
        assert saved.size == out.size and saved.format == "PNG"
    got = np.asarray(out.convert("RGB")).astype(int)
    ref = np.asarray(src.resize((256, 256), Image.Resampling.NEAREST)).astype(int)
    # Anchored patch (1, 1) covers pixels 32..63 in x and y: every pixel changed.
    assert (np.abs(got[32:64, 32:64] - ref[32:64, 32:64]).sum(-1) > 0).all()
    assert (np.abs(got[224:256, 224:256] - ref[224:256, 224:256]).sum(-1) > 0).all()
    # Patch (0, 5) has no anchor: its interior (off the grid lines) is the upscaled source.
    assert (got[1:31, 161:191] == ref[1:31, 161:191]).all()
    # The panel is white where no text is (bottom right corner).
    assert (got[-5:, -5:] == 255).all()


def test_default_scale_and_no_panel() -> None:
    out = draw_anchors(Image.new("RGB", (32, 16), "gray"), 4, [], "no", "q", scale=None,
                       panel_width=0)
    assert out.size == (640, 320)  # longer side to 640 px


def test_stacked_words_take_more_room() -> None:
    src = _image()
    one = np.asarray(draw_anchors(src, 8, [("a", 0)], "", "", scale=8, panel_width=0))
    two = np.asarray(draw_anchors(src, 8, [("a", 0), ("b", 0)], "", "", scale=8, panel_width=0))
    # The second word is stacked below the first inside patch 0 (pixels 0..63).
    assert (one[:64, :64] != two[:64, :64]).any()
    assert (one[64:, :] == two[64:, :]).all()


def test_bad_anchor_index_names_the_word() -> None:
    with pytest.raises(ValueError, match="anchor 'dog': patch index 64 is outside"):
        draw_anchors(_image(), 8, [("dog", 64)], "", "")
    with pytest.raises(ValueError, match="patch_grid"):
        draw_anchors(_image(), 0, [], "", "")
