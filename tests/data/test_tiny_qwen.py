"""The tiny Qwen2.5-VL and its torchvision-free processor: fixed ids, offline save/reload."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from attanchor.data.images import load_processor
from attanchor.data.tiny_qwen import (
    QwenImageProcessor,
    build_qwen_processor,
    build_qwen_tokenizer,
    build_tiny_qwen,
    tiny_qwen_config,
)


def test_tokenizer_ids_and_template():
    tok = build_qwen_tokenizer(["what", "color", "?"])
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>"]) == [0, 2, 5]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2 and tok.bos_token is None
    # 8 specials, then the template's 8 words, then the vocabulary.
    assert tok("<|vision_end|>What color?")["input_ids"] == [4, 16, 17, 18]
    text = tok.apply_chat_template([{"role": "user", "content": "what color ?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nwhat color ?<|im_end|>\n<|im_start|>assistant\n")


def test_processor_saves_and_reloads_offline(tmp_path):
    path = build_tiny_qwen(tmp_path / "tq", vocab=["what", "color", "?"])
    proc = load_processor(str(path))
    assert isinstance(proc, QwenImageProcessor)  # no torchvision here: the images-only one
    ref = build_qwen_processor(build_qwen_tokenizer(["what", "color", "?"]))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    im = Image.new("RGB", (32, 16), "red")
    a, b = proc(images=[im], text=[text], return_tensors="pt"), ref(images=[im], text=[text],
                                                                     return_tensors="pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["image_grid_thw"].tolist() == [[1, 4, 8]] and int(a["mm_token_type_ids"].sum()) == 8
    with pytest.raises(ValueError, match="torchvision"):
        proc(videos=[im], text=[text])


def test_config_checks_the_rotary_sections():
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_qwen_config(32, mrope_section=(2, 2, 2))
