"""A tiny Qwen2.5-VL built offline, and a Qwen processor that needs no torchvision.

Nothing here downloads anything. The model is the real ``Qwen2_5_VLForConditionalGeneration``
at toy sizes (vision: depth 2, hidden 32, patch 4, spatial merge 2, temporal patch 2; text: 2
layers, hidden 64, 4 heads, 2 KV heads, M-RoPE sections [2, 3, 3]); the tokenizer is word-level
over the easy-vqa vocabulary with Qwen's special tokens and Qwen2-VL's own chat template.

Why a processor of our own: ``Qwen2_5_VLProcessor`` holds an image processor, a tokenizer AND a
video processor, and the video processor imports torchvision, which cannot be installed next to
the CPU torch of this project (``operator torchvision::nms does not exist``, STACK.md).
``QwenImageProcessor`` below is ``Qwen2_5_VLProcessor`` without the video attribute: same
``__call__`` (placeholder expansion, ``mm_token_type_ids``), same ``replace_image_token``
(``grid.prod() // merge**2`` tokens per image), holding ``Qwen2VLImageProcessorPil`` (PIL only).
It saves and reloads offline (``QwenImageProcessor.from_pretrained``); ``load_qwen_processor``
picks the real processor whenever torchvision imports and this one otherwise.

GPU users (CUDA torch) install ``torchvision`` matching their torch and load the checkpoint's
own processor: ``AutoProcessor.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")``; the renderer
accepts either (both expose ``image_processor``, ``tokenizer``, ``image_token``,
``replace_image_token``).

Image tokens: an image resized to (h, w) (multiples of patch * merge = 8) gives a patch grid
(1, h / 4, w / 4) and (h / 8) * (w / 8) tokens: a 64x64 easy-vqa image -> grid (1, 16, 16),
64 tokens; 32x24 (w x h) -> grid (1, 6, 8), 12 tokens.

Example:
    >>> path = build_tiny_qwen("/tmp/tiny-qwen")                         # doctest: +SKIP
    >>> model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)  # doctest: +SKIP
    >>> processor = load_qwen_processor(path)                             # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from attanchor.data.tiny import (
    check_special_ids,
    easy_vqa_vocab,
    save_tiny_model,
    word_level_backend,
)

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE, VIDEO = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                          "<|video_pad|>")
UNK = "<unk>"  # the word-level model needs one; Qwen's byte-level BPE has none
# Fixed ids 0..7 in this order (pad 0: collate pads with it).
SPECIAL_TOKENS: tuple[str, ...] = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE,
                                   VIDEO, UNK)

# Qwen2-VL / Qwen2.5-VL-Instruct's own chat template (its tokenizer_config.json), verbatim:
# "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
# "<|vision_start|><|image_pad|><|vision_end|>what color?<|im_end|>\n<|im_start|>assistant\n"
# "red<|im_end|>\n". Answers end with <|im_end|> (= eos), the renderer's end-of-turn label.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Words the template writes (lowercased): roles and the default system prompt.
TEMPLATE_WORDS: tuple[str, ...] = ("system", "user", "assistant", "you", "are", "a", "helpful",
                                   ".")


class QwenImageProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images only: no video processor, so no torchvision.

    Everything the project uses is inherited unchanged (``__call__`` expands each
    ``<|image_pad|>`` into ``grid.prod() // merge**2`` tokens and returns ``mm_token_type_ids``;
    ``replace_image_token``; ``_get_num_multimodal_tokens``). Videos raise in ``__call__``.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        self.image_token = getattr(tokenizer, "image_token", IMAGE)
        self.video_token = getattr(tokenizer, "video_token", VIDEO)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        # Skip Qwen2_5_VLProcessor.__init__: it passes a video processor to the mixin.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template,
                                **kwargs)

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None,
                 **kwargs: Any) -> Any:
        if videos is not None:
            raise ValueError("QwenImageProcessor has no video processor (it avoids torchvision);"
                             " install torchvision and use AutoProcessor for videos")
        return super().__call__(images=images, text=text, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> QwenImageProcessor:
        """Reload what ``save_pretrained`` wrote (the image processor as its PIL class)."""
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer,
                   chat_template=tokenizer.chat_template)


def torchvision_available() -> bool:
    """Whether torchvision imports (then HF's own Qwen processor works). Import errors that a
    broken install raises (STACK.md: ``torchvision::nms``) count as unavailable."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


def load_qwen_processor(path: str | Path, **kwargs: Any) -> Any:
    """The processor for a Qwen2.5-VL checkpoint at ``path`` (local dir or hub id): HF's
    ``AutoProcessor`` when torchvision imports, else ``QwenImageProcessor`` (images only)."""
    if torchvision_available():
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(path, **kwargs)
    return QwenImageProcessor.from_pretrained(path, **kwargs)


def build_qwen_tokenizer(vocab_words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with Qwen's special tokens and chat template.

    Ids: ``<|endoftext|>``=0 (pad), ``<|im_start|>``=1, ``<|im_end|>``=2 (eos),
    ``<|vision_start|>``=3, ``<|vision_end|>``=4, ``<|image_pad|>``=5, ``<|video_pad|>``=6,
    ``<unk>``=7, then ``vocab_words`` (deduplicated, template words added). No bos (as Qwen).
    Text is lowercased and split like ``attanchor.data.tiny`` (words and punctuation).
    Example: "<|vision_end|>What color?" -> ``[4, id("what"), id("color"), id("?")]``.
    """
    backend, _ = word_level_backend(SPECIAL_TOKENS, [*TEMPLATE_WORDS, *vocab_words], UNK)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO,
                              "vision_start_token": VISION_START, "vision_end_token": VISION_END},
        padding_side="right", model_max_length=1024)
    tokenizer.chat_template = CHAT_TEMPLATE
    check_special_ids(tokenizer, SPECIAL_TOKENS)
    return tokenizer


def build_qwen_image_processor(min_pixels: int = 16 * 16, max_pixels: int = 64 * 64,
                               patch_size: int = 4, merge_size: int = 2,
                               temporal_patch_size: int = 2) -> Qwen2VLImageProcessorPil:
    """The PIL Qwen2-VL image processor at the tiny model's patch sizes: images are resized to
    multiples of ``patch_size * merge_size`` with area in [min_pixels, max_pixels]."""
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch_size,
        merge_size=merge_size, temporal_patch_size=temporal_patch_size)


def tiny_qwen_config(vocab_size: int, *, text_hidden: int = 64, text_layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, vision_hidden: int = 32,
                     vision_depth: int = 2, patch_size: int = 4, merge_size: int = 2,
                     temporal_patch_size: int = 2, window_size: int = 16,
                     mrope_section: tuple[int, int, int] = (2, 3, 3),
                     max_position_embeddings: int = 1024) -> Qwen2_5_VLConfig:
    """A Qwen2_5_VLConfig at toy sizes with this module's special-token ids.

    ``sum(mrope_section)`` must equal ``text_hidden / heads / 2`` (head_dim / 2: the rotary
    frequencies split over the t, h, w axes); the vision tower outputs ``text_hidden``.
    """
    head_dim = text_hidden // heads
    if text_hidden % heads or sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = "
                         f"{head_dim / 2} (text_hidden={text_hidden}, heads={heads})")
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    text = {"vocab_size": vocab_size, "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden, "num_hidden_layers": text_layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                "mrope_section": list(mrope_section)},
            "pad_token_id": ids[PAD], "eos_token_id": ids[IM_END], "bos_token_id": ids[IM_START]}
    vision = {"depth": vision_depth, "hidden_size": vision_hidden,
              "intermediate_size": 2 * vision_hidden, "num_heads": heads,
              "patch_size": patch_size, "spatial_merge_size": merge_size,
              "temporal_patch_size": temporal_patch_size, "window_size": window_size,
              "out_hidden_size": text_hidden, "fullatt_block_indexes": [vision_depth - 1]}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=ids[IMAGE], video_token_id=ids[VIDEO],
                            vision_start_token_id=ids[VISION_START],
                            vision_end_token_id=ids[VISION_END], tie_word_embeddings=False)


def build_qwen_processor(tokenizer: PreTrainedTokenizerFast, **image_kw: Any
                         ) -> QwenImageProcessor:
    """The offline processor: ``build_qwen_image_processor(**image_kw)`` + ``tokenizer``."""
    return QwenImageProcessor(image_processor=build_qwen_image_processor(**image_kw),
                              tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_tiny_qwen(out_dir: str | Path, *, vocab: list[str] | None = None, seed: int = 0,
                    **config_overrides: Any) -> Path:
    """Build a randomly initialised tiny Qwen2.5-VL with its processor and save both.

    ``vocab``: the tokenizer's words (default ``easy_vqa_vocab()``); ``seed`` fixes the weights
    without touching the caller's RNG; ``config_overrides`` go to ``tiny_qwen_config``.
    ``Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir)`` and
    ``load_qwen_processor(out_dir)`` then work offline. Returns ``Path(out_dir)``.
    """
    out = Path(out_dir)
    tokenizer = build_qwen_tokenizer(easy_vqa_vocab() if vocab is None else list(vocab))
    config = tiny_qwen_config(len(tokenizer), **config_overrides)
    vc = config.vision_config
    processor = build_qwen_processor(tokenizer, patch_size=vc.patch_size,
                                     merge_size=vc.spatial_merge_size,
                                     temporal_patch_size=vc.temporal_patch_size)
    return save_tiny_model(Qwen2_5_VLForConditionalGeneration, config, tokenizer, processor, out, seed=seed,
                           builder="attanchor.data.tiny_qwen.build_tiny_qwen", info_name="tiny_qwen.json",
                           config_overrides=config_overrides)
