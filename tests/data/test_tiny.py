"""The tiny LLaVA: tokenizer, chat template, processor, model, save/load."""

from __future__ import annotations

import easy_vqa
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from attanchor.data.tiny import (
    CHAT_TEMPLATE,
    build_processor,
    build_tiny_llava,
    build_tokenizer,
    easy_vqa_vocab,
    split_words,
    tiny_llava_config,
)

# ids: <pad>0 <s>1 </s>2 <unk>3 <image>4, then these words from 5 on, in this order.
SMALL_VOCAB = ["user", ":", "assistant", "what", "color", "?", "red"]


@pytest.fixture(scope="module")
def small_tokenizer():
    return build_tokenizer(SMALL_VOCAB)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def images():
    paths = easy_vqa.get_train_image_paths()
    return [Image.open(paths[i]).convert("RGB") for i in (0, 1, 2)]


def test_tokenizer_ids_and_offsets_hand_checked(small_tokenizer):
    text = "What color?"
    enc = small_tokenizer(text, return_offsets_mapping=True)
    assert enc["input_ids"] == [1, 8, 9, 10]  # <s> what color ?
    assert enc["offset_mapping"] == [(0, 0), (0, 4), (5, 10), (10, 11)]
    assert small_tokenizer.decode(enc["input_ids"], skip_special_tokens=True) == "what color?"


def test_tokenizer_specials_template_text_and_unknown_words(small_tokenizer):
    text = "USER: <image>\nWhat  COLOR is it? ASSISTANT: red</s>"
    enc = small_tokenizer(text, return_offsets_mapping=True)
    # <s> user : <image> what color <unk>(is) <unk>(it) ? assistant : red </s>
    assert enc["input_ids"] == [1, 5, 6, 4, 8, 9, 3, 3, 10, 7, 6, 11, 2]
    pieces = [text[a:b] for a, b in enc["offset_mapping"]]
    assert pieces == ["", "USER", ":", "<image>", "What", "COLOR", "is", "it", "?",
                      "ASSISTANT", ":", "red", "</s>"]
    assert small_tokenizer.pad_token_id == 0 and small_tokenizer.eos_token_id == 2
    assert small_tokenizer.image_token == "<image>"
    assert small_tokenizer.convert_tokens_to_ids("<image>") == 4
    assert len(small_tokenizer) == 5 + len(SMALL_VOCAB)


def test_tokenizer_rejects_bad_vocab():
    with pytest.raises(ValueError, match="template"):
        build_tokenizer(["what"])
    with pytest.raises(ValueError, match="lowercase"):
        build_tokenizer(["user", ":", "assistant", "Red"])
    with pytest.raises(ValueError, match="without spaces"):
        build_tokenizer(["user", ":", "assistant", "a b"])


def test_chat_template_two_turns(small_tokenizer):
    messages = [
        {"role": "user", "content": "<image>\nwhat color is the shape?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "is there a circle?"},
        {"role": "assistant", "content": "no"},
    ]
    assert small_tokenizer.apply_chat_template(messages, tokenize=False) == (
        "USER: <image>\nwhat color is the shape? ASSISTANT: red</s>"
        "USER: is there a circle? ASSISTANT: no</s>"
    )
    assert small_tokenizer.apply_chat_template(
        messages[:3], tokenize=False, add_generation_prompt=True
    ) == (
        "USER: <image>\nwhat color is the shape? ASSISTANT: red</s>"
        "USER: is there a circle? ASSISTANT:"
    )


def test_chat_template_system_and_list_content(small_tokenizer):
    messages = [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": [{"type": "text", "text": "what color?"}, {"type": "image"}]},
    ]
    assert small_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == "be brief. USER: <image>\nwhat color? ASSISTANT:"
    with pytest.raises(Exception, match="unsupported role: tool"):
        small_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_template_assistant_mask(small_tokenizer):
    messages = [{"role": "user", "content": "what color?"}, {"role": "assistant", "content": "red"}]
    out = small_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    # user : what color ? assistant : red </s>: the answer and its </s> are the assistant's.
    # No <s>: like llava-1.5-hf, the template has none and HF tokenizes chat templates with
    # add_special_tokens=False; tokenizing the rendered string adds it.
    assert out["input_ids"] == [5, 6, 8, 9, 10, 7, 6, 11, 2]
    assert out["assistant_masks"] == [0, 0, 0, 0, 0, 0, 0, 1, 1]


def test_easy_vqa_vocab_covers_every_question():
    vocab = easy_vqa_vocab()
    assert vocab == sorted(set(vocab)) == easy_vqa_vocab()
    assert set(easy_vqa.get_answers()) | {"user", ":", "assistant", "?"} <= set(vocab)
    tokenizer = build_tokenizer(vocab)
    questions = sorted(set(easy_vqa.get_train_questions()[0] + easy_vqa.get_test_questions()[0]))
    assert len(questions) > 100  # the distinct questions (~48k in all, many repeated)
    ids = tokenizer(questions, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert split_words("Is there a red shape?") == ["is", "there", "a", "red", "shape", "?"]
    assert [len(r) for r in ids[:3]] == [len(split_words(q)) for q in questions[:3]]


def test_config_linear_sizes_and_token_count():
    config = tiny_llava_config(40)
    assert config.image_token_id == 4 and config.image_token_index == 4
    assert config.image_seq_length == 64
    assert config.vision_feature_select_strategy == "default"
    assert config.vision_feature_layer == -2
    assert config.text_config.pad_token_id == 0
    model = LlavaForConditionalGeneration(config)
    small = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.in_features < 64]
    assert small == []
    with pytest.raises(ValueError, match="in_features >= 64"):
        tiny_llava_config(40, vision_hidden=32)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_llava_config(40, patch_size=7)


def test_processor_expands_image_to_model_features(small_tokenizer, images):
    processor = build_processor(small_tokenizer)
    model = LlavaForConditionalGeneration(tiny_llava_config(len(small_tokenizer))).eval()
    prompt = "USER: <image>\nwhat color? ASSISTANT:"
    batch = processor(images=images[:2], text=[prompt, prompt], return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    # <s> user : (64 x <image>) what color ? assistant :
    expected = [1, 5, 6] + [4] * 64 + [8, 9, 10, 7, 6]
    assert batch["input_ids"].tolist() == [expected, expected]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        logits = model(**batch).logits
    assert [f.shape for f in features] == [(64, 128), (64, 128)]
    assert logits.shape == (2, len(expected), len(small_tokenizer))


def test_processor_patch16_gives_16_tokens(small_tokenizer, images):
    processor = build_processor(small_tokenizer, image_size=64, patch_size=16)
    model = LlavaForConditionalGeneration(
        tiny_llava_config(len(small_tokenizer), patch_size=16)).eval()
    batch = processor(images=images[:1], text=["<image>\nred?"], return_tensors="pt")
    assert (batch["input_ids"] == 4).sum().item() == 16
    with torch.no_grad():
        # <s> (16 x <image>) red ?
        assert model(**batch).logits.shape == (1, 1 + 16 + 2, len(small_tokenizer))


def test_save_load_round_trip_is_exact(tiny_dir, images):
    files = {p.name for p in tiny_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja",
            "processor_config.json"} <= files
    loaded = LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert AutoTokenizer.from_pretrained(tiny_dir).chat_template == CHAT_TEMPLATE

    # The same seed and config rebuild the same weights in memory.
    tokenizer = build_tokenizer(easy_vqa_vocab())
    torch.manual_seed(0)
    fresh = LlavaForConditionalGeneration(tiny_llava_config(len(tokenizer))).eval()
    torch.manual_seed(1)
    other = LlavaForConditionalGeneration(tiny_llava_config(len(tokenizer))).eval()

    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "what shape is present?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nwhat shape is present? ASSISTANT:"
    batch = processor(images=images[:2], text=[prompt] * 2, return_tensors="pt")
    reference = build_processor(tokenizer)(images=images[:2], text=[prompt] * 2,
                                           return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    with torch.no_grad():
        logits = loaded(**batch).logits
        assert torch.equal(logits, fresh(**batch).logits)
        assert not torch.equal(logits, other(**batch).logits)
        generated = loaded.generate(**batch, max_new_tokens=2)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 2)
