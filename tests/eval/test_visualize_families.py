"""`attanchor visualize` on LLaVA-NeXT (the right patch of the right tile) and Qwen2.5-VL (the
merged grid): golden index maps, and the figures written from a local export."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from attanchor.anchoring import AnchorConfig
from attanchor.eval.visualize_run import next_canvas_index, run_visualize
from attanchor.train.build import load_model
from attanchor.train.export import export_model, load_processor

VOCAB = ["user", ":", "assistant", "is", "there", "a", "red", "blue", "shape", "?", "yes", "no"]


@pytest.mark.parametrize("src, want", [
    (5, (0, 5)),     # base tile patch (1, 1): the base grid's own index
    (16, (1, 0)),    # tile 1 patch (0, 0): canvas (0, 0)
    (20, (1, 8)),    # tile 1 patch (1, 0): canvas row 1 of 8 columns
    (32, (2, 4)),    # tile 2 patch (0, 0): canvas (0, 4)
    (47, (2, 31)),   # tile 2 patch (3, 3): canvas (3, 7) = 3 * 8 + 7
])
def test_next_canvas_index_two_tiles_wide(src, want):
    assert next_canvas_index(src, side=4, tiles_wide=2) == want


def test_next_canvas_index_two_tiles_high():
    # 2 x 1 tiles (a tall image): tile 2 is the lower one; its (0, 0) is canvas row 4, col 0.
    assert next_canvas_index(32, side=4, tiles_wide=1) == (2, 16)


def _export(family, root):
    if family == "llava_next":
        from attanchor.data.tiny_next import build_tiny_next
        base = build_tiny_next(root / "base", vocab=VOCAB)
    else:
        from attanchor.data.tiny_qwen import build_tiny_qwen
        base = build_tiny_qwen(root / "base", vocab=VOCAB)
    return export_model(load_model(str(base)).eval(), root / "export", merge=False,
                        anchor_config=AnchorConfig(threshold=-1.0),  # every word anchors
                        processor=load_processor(base))


def test_next_figures_put_each_anchor_on_its_tile(tmp_path, capsys):
    export = _export("llava_next", tmp_path)
    image = tmp_path / "wide.png"
    Image.new("RGB", (80, 40), "red").save(image)  # 40x80 (H x W): 1 x 2 tiles of 32 px
    out = tmp_path / "vis.png"
    assert run_visualize(str(export), str(image), "is there a red shape ?", str(out),
                         max_new_tokens=2, device="cpu") == 0
    # Canvas 32 x 64 px scaled to 640 wide, + the 360 px panel; the base tile 32 x 32 -> 640.
    assert Image.open(out).size == (640 + 360, 320)
    assert Image.open(tmp_path / "vis-base.png").size == (640 + 360, 640)
    printed = capsys.readouterr().out
    assert "vis-base.png" in printed and "anchors (word, image token)" in printed


def test_qwen_figure_is_the_merged_grid(tmp_path, capsys):
    export = _export("qwen2_5_vl", tmp_path)
    image = tmp_path / "wide.png"
    Image.new("RGB", (80, 40), "blue").save(image)
    out = tmp_path / "vis.png"
    assert run_visualize(str(export), str(image), "is there a blue shape ?", str(out),
                         max_new_tokens=2, device="cpu") == 0
    processor = load_processor(export)
    thw = processor.image_processor(images=[Image.open(image)], return_tensors="pt")[
        "image_grid_thw"][0].tolist()
    h, w = thw[1] * 4, thw[2] * 4  # patch 4 px: the image as the processor resized it
    with Image.open(out) as fig:
        assert fig.size == (640 + 360, round(h * 640 / max(h, w)))
    assert torch.tensor(thw).prod() > 0 and "wrote" in capsys.readouterr().out


def test_next_figures_map_slots_to_tiles(tmp_path):
    """40x80 image: slot 3 is base patch 3; slot 20 is tile 2 (0, 0) -> canvas 4; slot 26 is
    tile 1 (1, 1) -> canvas 1 * 8 + 1 = 9 (slots 16..24 are grid row 0 and its newline)."""
    from attanchor.anchoring import AnchoredVLM
    from attanchor.eval.visualize_run import figures

    export = _export("llava_next", tmp_path)
    vlm = AnchoredVLM(load_model(str(export)).eval(), AnchorConfig())
    batch = {"input_ids": torch.tensor([[1] + [4] * 52]),
             "pixel_values": torch.zeros(1, 3, 3, 32, 32), "image_sizes": torch.tensor([[40, 80]])}
    canvas, base = figures(vlm, load_processor(export), batch,
                           [("a", 3), ("b", 20), ("c", 26)], tmp_path / "unused.png")
    assert (canvas.grid, canvas.anchors, canvas.picture.size) == ((4, 8), [("b", 4), ("c", 9)],
                                                                  (64, 32))
    assert (base.grid, base.anchors, base.suffix) == ((4, 4), [("a", 3)], "-base")
    with pytest.raises(RuntimeError, match="image-newline slot 24"):
        figures(vlm, load_processor(export), batch, [("d", 24)], tmp_path / "unused.png")
