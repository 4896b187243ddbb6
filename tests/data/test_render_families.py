"""Rendering and collation per model family (LLaVA-NeXT, Qwen2.5-VL), against HF's processors.

Token counts by hand:
- tiny Qwen (patch 4, merge 2): an h x w image -> grid (1, h/4, w/4), (h/8) * (w/8) tokens:
  16x16 -> (1, 4, 4), 4 tokens, 16 patches; 32x16 (w x h) -> (1, 4, 8), 8 tokens, 32 patches;
  64x64 -> (1, 16, 16), 64 tokens.
- tiny NeXT (CLIP 32 px / patch 8, pinpoints 32x64, 64x32, 64x64): 80x40 (w x h) -> 16 base +
  4 rows of (8 + 1 newline) = 52 tokens, 3 tiles (base + 2); 64x64 -> 16 + 8 * (8 + 1) = 88
  tokens, 5 tiles (base + 4).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from attanchor.data.collate import collate
from attanchor.data.formats import Conversation, Turn
from attanchor.data.render import Renderer
from attanchor.data.tiny import build_tokenizer
from attanchor.data.tiny_next import build_next_processor, tiny_next_config
from attanchor.data.tiny_qwen import (
    build_qwen_processor,
    build_qwen_tokenizer,
    tiny_qwen_config,
)

WORDS = ["user", ":", "assistant", "what", "color", "is", "the", "shape", "?", "red", "blue",
         "circle"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    for name, size, color in [("s16.png", (16, 16), "red"), ("w32.png", (32, 16), "blue"),
                              ("n80.png", (80, 40), "red"), ("n64.png", (64, 64), "blue")]:
        Image.new("RGB", size, color).save(d / name)
    return d


@pytest.fixture(scope="module")
def qwen():
    return build_qwen_processor(build_qwen_tokenizer(WORDS))


@pytest.fixture(scope="module")
def nxt():
    return build_next_processor(build_tokenizer(WORDS))


def two_images(a: str, b: str) -> Conversation:
    return Conversation("r1", [Turn("user", "<image>\nWhat color is the shape?"),
                               Turn("assistant", "red"),
                               Turn("user", "<image>what shape?"),
                               Turn("assistant", "circle")], [a, b])


def hf_messages(conv: Conversation) -> list[dict]:
    out = []
    for t in conv.turns:
        parts = [{"type": "image"}] * t.text.count("<image>")
        out.append({"role": t.role, "content": parts + [
            {"type": "text", "text": t.text.replace("<image>", "").strip()}]})
    return out


def test_qwen_render_equals_hf_processor_and_masks_user_words(qwen, root):
    conv = two_images("s16.png", "w32.png")
    s = Renderer(qwen, image_root=root)(conv)
    text = qwen.apply_chat_template(hf_messages(conv), tokenize=False)
    hf = qwen(images=[Image.open(root / "s16.png"), Image.open(root / "w32.png")], text=[text],
              return_tensors="pt")
    assert torch.equal(s.input_ids, hf["input_ids"][0])
    assert torch.equal(s.pixel_values, hf["pixel_values"])  # (16 + 32, 3 * 2 * 4 * 4)
    assert s.pixel_values.shape == (48, 96)
    assert s.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 8]]
    assert torch.equal(s.mm_token_type_ids.long(), hf["mm_token_type_ids"][0].long())
    tok = qwen.tokenizer.convert_ids_to_tokens(s.input_ids.tolist())
    assert tok.count("<|image_pad|>") == 4 + 8
    cands = [t for t, c in zip(tok, s.candidate_mask.tolist()) if c]
    assert cands == ["what", "color", "is", "the", "shape", "?", "what", "shape", "?"]
    labelled = [t for t, lab in zip(tok, s.labels.tolist()) if lab != -100]
    assert labelled == ["red", "<|im_end|>", "circle", "<|im_end|>"]
    never = {"<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|im_start|>", "system",
             "user", "assistant"}
    assert not any(t in never for t in cands)


def test_qwen_token_counts_from_the_grid(qwen):
    r = Renderer(qwen)
    assert [r.token_count_for_size(s) for s in [(16, 16), (32, 16), (64, 64)]] == [4, 8, 64]


def test_qwen_truncation_keeps_whole_images_and_their_patches(qwen, root):
    full = Renderer(qwen, image_root=root)(two_images("s16.png", "w32.png"))
    second = int(torch.nonzero(full.input_ids == qwen.image_token_id)[4])  # first pad, image 2
    s = Renderer(qwen, image_root=root, max_length=second + 3)(two_images("s16.png", "w32.png"))
    assert len(s.input_ids) == second  # the cut moved back to image 2's start
    assert s.image_grid_thw.tolist() == [[1, 4, 4]] and s.pixel_values.shape == (16, 96)
    assert int(s.mm_token_type_ids.sum()) == 4 and len(s.mm_token_type_ids) == second


@pytest.mark.parametrize("side", ["right", "left"])
def test_qwen_collated_batch_feeds_hf_like_the_processor(qwen, root, side):
    from transformers import Qwen2_5_VLForConditionalGeneration
    r = Renderer(qwen, image_root=root)
    convs = [two_images("s16.png", "w32.png"),
             Conversation("r2", [Turn("user", "<image>what color?"), Turn("assistant", "blue")],
                          ["w32.png"])]
    batch = collate([r(c) for c in convs], qwen.tokenizer.pad_token_id, side)
    assert batch["pixel_values"].shape == (48 + 32, 96)  # patches concatenated
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8], [1, 4, 8]]
    qwen.tokenizer.padding_side = side
    texts = [qwen.apply_chat_template(hf_messages(c), tokenize=False) for c in convs]
    hf = qwen(images=[Image.open(root / n) for n in ("s16.png", "w32.png", "w32.png")],
              text=texts, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(batch[key], hf[key]), key
    assert torch.equal(batch["mm_token_type_ids"].long(), hf["mm_token_type_ids"].long())
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen_config(len(qwen.tokenizer))).eval()
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        assert torch.equal(model(**{k: batch[k] for k in keys}).logits, model(**hf).logits)


def test_next_render_and_collate_match_hf(nxt, root):
    from transformers import LlavaNextForConditionalGeneration
    r = Renderer(nxt, image_root=root, template="llava-1.5")
    assert [r.token_count_for_size(s) for s in [(80, 40), (64, 64)]] == [52, 88]
    a = r(Conversation("a", [Turn("user", "<image>\nwhat color?"), Turn("assistant", "red")],
                       ["n80.png"]))
    b = r(Conversation("b", [Turn("user", "<image>\nwhat shape?"), Turn("assistant", "circle")],
                       ["n64.png"]))
    assert a.image_sizes.tolist() == [[40, 80]] and a.pixel_values.shape == (1, 3, 3, 32, 32)
    assert int((a.input_ids == nxt.image_token_id).sum()) == 52
    assert a.mm_token_type_ids is None  # LLaVA-family processors do not return it
    batch = collate([a, b], nxt.tokenizer.pad_token_id, "left")
    assert batch["image_sizes"].tolist() == [[40, 80], [64, 64]]
    assert batch["pixel_values"].shape == (2, 5, 3, 32, 32)  # padded to the most tiles
    assert not batch["pixel_values"][0, 3:].any()  # with zero tiles, as the processor pads
    hf = nxt.image_processor(images=[Image.open(root / "n80.png"), Image.open(root / "n64.png")],
                             return_tensors="pt")
    assert torch.equal(batch["pixel_values"], hf["pixel_values"])
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(tiny_next_config(len(nxt.tokenizer))).eval()
    with torch.no_grad():  # the model accepts the batch: one placeholder per packed feature
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_mixing_families_in_one_batch_raises(qwen, nxt, root):
    a = Renderer(qwen, image_root=root)(Conversation(
        "q", [Turn("user", "<image>what?"), Turn("assistant", "red")], ["s16.png"]))
    b = Renderer(nxt, image_root=root, template="llava-1.5")(Conversation(
        "n", [Turn("user", "<image>what?"), Turn("assistant", "red")], ["n80.png"]))
    with pytest.raises(ValueError, match="same processor"):
        collate([a, b], 0)
