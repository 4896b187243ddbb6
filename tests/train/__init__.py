"""Helpers shared by the train tests: a tiny LLaVA (model + processor) written to a directory.

Every Linear layer is at least 64 wide (bitsandbytes' 4-bit packing needs in_features >= 64).
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN_ID = 5
VOCAB_SIZE = 300
N_IMAGE_TOKENS = 64  # (64 / 8) ** 2 patches; the CLS token is dropped ("default" strategy)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, projection_dim=64,
    )
    text = LlamaConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=256, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def tiny_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "<image>"]  # <image> has id 5
    words = [f"w{i}" for i in range(VOCAB_SIZE - len(specials) - 3)] + ["user:", "assistant:", "?"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    assert len(vocab) == VOCAB_SIZE and vocab["<image>"] == IMAGE_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava_dir(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random LlavaForConditionalGeneration + LlavaProcessor to ``out_dir``."""
    from transformers import LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config())
    model.save_pretrained(out_dir)
    tiny_processor().save_pretrained(out_dir)
    return out_dir


def random_batch(batch_size: int = 2, text_len: int = 12, seed: int = 0) -> dict:
    """``<s> <image>*64 w...`` rows with labels on the text only and random pixels.

    Shapes: input_ids/attention_mask/labels (B, 1 + 64 + text_len), pixel_values (B, 3, 64, 64).
    """
    g = torch.Generator().manual_seed(seed)
    b = batch_size
    ids = torch.cat(
        [
            torch.full((b, 1), 1),
            torch.full((b, N_IMAGE_TOKENS), IMAGE_TOKEN_ID),
            torch.randint(10, VOCAB_SIZE, (b, text_len), generator=g),
        ],
        dim=1,
    )
    labels = ids.clone()
    labels[:, : 1 + N_IMAGE_TOKENS] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(b, 3, 64, 64, generator=g),
        "labels": labels,
    }
