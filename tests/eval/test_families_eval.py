"""`attanchor eval` and `attanchor calibrate` on a LLaVA-NeXT checkpoint: image_sizes through
batched anchored generation; similarities over the family's matchable image positions (never
an image-newline slot), one per training candidate."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration

from attanchor.data.tiny_next import build_tiny_next
from attanchor.eval.calibrate_run import gather_similarities

VOCAB = ["user", ":", "assistant", "what", "color", "is", "the", "shape", "?", "red", "blue"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("next-calib")
    model = build_tiny_next(root / "model", vocab=VOCAB)
    images = root / "images"
    images.mkdir()
    records = []
    for i, (size, color) in enumerate([((80, 40), "red"), ((32, 32), "blue"),
                                       ((30, 90), "red"), ((64, 64), "blue")]):
        Image.new("RGB", size, color).save(images / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"},
            {"from": "gpt", "value": color}]})
    (root / "train.json").write_text(json.dumps(records))
    return {"model": model, "train": root / "train.json", "images": images}


def recipe(world):
    return {"model": {"model_path": str(world["model"]),
                      "anchor": {"strategy": "text_into_image", "threshold": 0.12}},
            "data": {"train_file": str(world["train"]), "image_root": str(world["images"]),
                     "format": "llava", "batch_size": 2, "image_cache_mb": 0}}


def test_one_similarity_per_candidate(world):
    sims = gather_similarities(recipe(world), batches=2, device="cpu")
    # 4 records x 6 candidates: "what color is the shape ?".
    assert sims.shape == (4 * 6,)
    assert ((sims >= -1) & (sims <= 1)).all()


def test_newline_slots_are_never_matched(world, tmp_path):
    """A word whose embedding IS the image-newline vector would match a newline slot with
    cosine 1; the family's image mask leaves the newlines out, so no similarity reaches 1."""
    model = LlavaNextForConditionalGeneration.from_pretrained(world["model"])
    color = 4 + 1 + VOCAB.index("color")  # ids: 5 specials, then VOCAB in order
    with torch.no_grad():
        model.get_input_embeddings().weight[color] = model.model.image_newline
    path = tmp_path / "edited"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json",
                 "chat_template.jinja"):
        if (world["model"] / name).exists():
            (path / name).write_bytes((world["model"] / name).read_bytes())
    r = recipe(world)
    r["model"]["model_path"] = str(path)
    sims = gather_similarities(r, batches=2, device="cpu")
    assert sims.numel() == 24 and sims.max() < 0.999


def test_eval_generates_with_image_sizes_and_anchors_every_candidate(world):
    from attanchor.anchoring import AnchorConfig, AnchoredVLM
    from attanchor.data.render import Renderer
    from attanchor.eval.evaluate import generate_answers, read_vqa
    from attanchor.train.export import load_processor

    model = LlavaNextForConditionalGeneration.from_pretrained(world["model"]).eval()
    processor = load_processor(world["model"])
    items = read_vqa(world["train"])
    renderer = Renderer(processor, image_root=world["images"])
    anchored = AnchoredVLM(model, AnchorConfig(threshold=-1.0))
    out = generate_answers(anchored, renderer, items, batch_size=3, max_new_tokens=2,
                           progress=False)
    assert [o["id"] for o in out] == ["r0", "r1", "r2", "r3"]
    assert [o["anchors"] for o in out] == [6, 6, 6, 6]  # tau -1: every prompt token anchors
    none = generate_answers(AnchoredVLM(model, AnchorConfig(strategy="none")), renderer, items,
                            batch_size=3, max_new_tokens=2, progress=False)
    assert [o["anchors"] for o in none] == [0, 0, 0, 0]
