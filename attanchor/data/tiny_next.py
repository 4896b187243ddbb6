"""A tiny LLaVA-NeXT (LLaVA-1.6) built offline: any-resolution tiles at toy sizes.

Nothing here downloads anything. The pieces are the real transformers classes
(``LlavaNextForConditionalGeneration`` = CLIP tower + projector + ``image_newline`` + Llama,
``LlavaNextProcessor`` with ``LlavaNextImageProcessorPil``) and the word-level tokenizer and
LLaVA-1.5 chat template of ``attanchor.data.tiny`` (LLaVA-1.6-vicuna keeps that format).

Defaults: CLIP 32 px / patch 8 (a 4x4 = 16-feature tile), pinpoints [[32, 64], [64, 32],
[64, 64]]. An image becomes the base tile (16 features), then the unpadded tile grid row by
row, each row followed by one ``image_newline`` slot. Worked example, a 40x80 (H x W) image:
best pinpoint 32x64 (two tiles side by side) -> grid 4 x 8 features, unpadded to the image's
aspect 1:2 -> still 4 x 8, so 16 + 4 * (8 + 1) = 52 image tokens, newline slots at block
offsets 24, 33, 42, 51.

Example:
    >>> path = build_tiny_next("/tmp/tiny-next")                        # doctest: +SKIP
    >>> model = LlavaNextForConditionalGeneration.from_pretrained(path)  # doctest: +SKIP
    >>> processor = AutoProcessor.from_pretrained(path)                  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

from attanchor.data.tiny import (
    BOS,
    CHAT_TEMPLATE,
    EOS,
    IMAGE,
    PAD,
    SPECIAL_TOKENS,
    build_tokenizer,
    easy_vqa_vocab,
    save_tiny_model,
)

PINPOINTS: tuple[tuple[int, int], ...] = ((32, 64), (64, 32), (64, 64))


def tiny_next_config(
    vocab_size: int,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    pinpoints: tuple[tuple[int, int], ...] = PINPOINTS,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    max_position_embeddings: int = 1024,
) -> LlavaNextConfig:
    """A LlavaNextConfig for a toy CLIP tower + Llama with LLaVA-1.6's feature choices
    (layer -2, "default" strategy: CLS dropped, ``spatial_unpad`` packing with newlines).

    Every Linear keeps in_features >= 64 (bitsandbytes' 4-bit packing crashes below 64 on CPU).
    Each pinpoint must be a multiple of ``image_size`` on both sides (whole tiles)."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    bad = [p for p in pinpoints if p[0] % image_size or p[1] % image_size]
    if bad:
        raise ValueError(f"pinpoints {bad} are not whole tiles of image_size {image_size}")
    if min(vision_hidden, text_hidden) < 64:
        raise ValueError("vision_hidden and text_hidden must be >= 64 (QLoRA on CPU)")
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size,
                              hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=heads,
                              projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=text_hidden,
                       intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_position_embeddings,
                       pad_token_id=SPECIAL_TOKENS.index(PAD),
                       bos_token_id=SPECIAL_TOKENS.index(BOS),
                       eos_token_id=SPECIAL_TOKENS.index(EOS), tie_word_embeddings=False)
    return LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=SPECIAL_TOKENS.index(IMAGE),
        image_grid_pinpoints=[list(p) for p in pinpoints], vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_next_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 32,
                         patch_size: int = 8,
                         pinpoints: tuple[tuple[int, int], ...] = PINPOINTS
                         ) -> LlavaNextProcessor:
    """An offline LlavaNextProcessor whose token counts match ``tiny_next_config``: the PIL
    image processor tiles with the same pinpoints; ``num_additional_image_tokens=1`` counts
    CLIP's CLS (the "default" strategy drops it)."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              patch_size=patch_size, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_tiny_next(out_dir: str | Path, *, vocab: list[str] | None = None, seed: int = 0,
                    **config_overrides: Any) -> Path:
    """Build a randomly initialised tiny LLaVA-NeXT and save it, with its processor, offline.

    ``vocab``: the tokenizer's words (default ``easy_vqa_vocab()``; must hold "user", ":",
    "assistant"). ``seed`` fixes the weights without touching the caller's RNG.
    ``config_overrides`` go to ``tiny_next_config``. ``from_pretrained(out_dir)`` of
    ``LlavaNextForConditionalGeneration`` / ``AutoProcessor`` then work offline;
    ``tiny_next.json`` records the build arguments. Returns ``Path(out_dir)``.
    """
    out = Path(out_dir)
    tokenizer = build_tokenizer(easy_vqa_vocab() if vocab is None else list(vocab))
    config = tiny_next_config(len(tokenizer), **config_overrides)
    vision = config.vision_config
    processor = build_next_processor(
        tokenizer, vision.image_size, vision.patch_size,
        tuple(tuple(p) for p in config.image_grid_pinpoints))
    return save_tiny_model(LlavaNextForConditionalGeneration, config, tokenizer, processor, out, seed=seed,
                           builder="attanchor.data.tiny_next.build_tiny_next", info_name="tiny_next.json",
                           config_overrides=config_overrides)
