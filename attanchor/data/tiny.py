"""A tiny LLaVA built offline: the project's embedded default model and the tests' model.

Nothing here downloads anything. The pieces are the real transformers classes
(`LlavaForConditionalGeneration` = CLIP vision tower + projector + Llama, `LlavaProcessor` with a
PIL CLIP image processor) at toy sizes, plus a word-level tokenizer over the easy-vqa vocabulary.

Defaults: 64x64 images, patch 8, so M = (64 / 8)^2 = 64 image tokens per image (CLIP adds a CLS
token, and LLaVA's "default" feature strategy drops it again). About 0.45M parameters.

Example:
    >>> path = build_tiny_llava("/tmp/tiny")            # doctest: +SKIP
    >>> model = LlavaForConditionalGeneration.from_pretrained(path)  # doctest: +SKIP
    >>> processor = AutoProcessor.from_pretrained(path)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
# Fixed ids 0..4, in this order (pad must be 0: collate pads with it, HF masks it).
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)

# LLaVA-1.5 conversation format:
#   [system + " "] "USER: " user " " "ASSISTANT: " answer "</s>" ... ["ASSISTANT:"]
# e.g. "USER: <image>\nwhat color is the shape? ASSISTANT: red</s>".
# A message's content is either a string (literal "<image>" placeholders, the project's Turn.text)
# or HF's list of parts ({"type": "image"} / {"type": "text", "text": ...}); images are then
# rendered first, one "<image>\n" each, like llava-hf's own template. The answer and its "</s>"
# sit inside {% generation %} so `return_assistant_tokens_mask=True` works too.
# No "<s>" in the template (as llava-1.5-hf): the tokenizer adds it when it encodes the rendered
# string; `apply_chat_template(tokenize=True)` (add_special_tokens=False in HF) gives no "<s>".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(images='', texts=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.images = ns.images + '<image>\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.texts = ns.texts + [part['text']] -%}"
    "{%- else -%}{{ raise_exception('unsupported content part type: ' + part['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.images + ns.texts | join(' ') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ content + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + content + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}"
    "{% generation %}{{ content + '</s>' }}{% endgeneration %}"
    "{%- else -%}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Words the template itself writes (lowercased, since the tokenizer lowercases).
TEMPLATE_WORDS: tuple[str, ...] = ("user", ":", "assistant")

def _normalizer() -> normalizers.Normalizer:
    return normalizers.Lowercase()


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split on whitespace, then isolate every punctuation character ("shape?" -> "shape", "?")."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


def split_words(text: str) -> list[str]:
    """Lowercased words as the tiny tokenizer sees them (its own normalizer + pre-tokenizer).

    Example: split_words("Is there a red shape?") == ["is", "there", "a", "red", "shape", "?"]
    """
    return [w for w, _ in _pre_tokenizer().pre_tokenize_str(_normalizer().normalize_str(text))]


def build_tokenizer(vocab_words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with a LLaVA-1.5 chat template.

    Ids: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4, then `vocab_words` in the given order
    (duplicates and special tokens in `vocab_words` are dropped, first occurrence wins).
    Text is lowercased, split on whitespace, and every punctuation character is its own token;
    unknown words map to <unk>. Encoding adds <s> at the start (as Llama tokenizers do).
    Offsets (`return_offsets_mapping=True`) index the ORIGINAL text; <s> gets (0, 0).

    `vocab_words` must hold the template's words "user", ":", "assistant".

    Example: with vocab ["user", ":", "assistant", "what", "color", "?"], "What color?" ->
    ids [1, 8, 9, 10], offsets [(0, 0), (0, 4), (5, 10), (10, 11)].
    """
    backend, vocab = word_level_backend(SPECIAL_TOKENS, vocab_words, UNK)
    missing = [w for w in TEMPLATE_WORDS if w not in vocab]
    if missing:
        raise ValueError(f"vocabulary lacks the chat template's words {missing}; add them")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},  # -> tokenizer.image_token, read by LlavaProcessor
        padding_side="right",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    check_special_ids(tokenizer, SPECIAL_TOKENS)
    return tokenizer


def word_level_backend(special_tokens: Sequence[str], vocab_words: Sequence[str], unk: str
                       ) -> tuple[Tokenizer, dict[str, int]]:
    """The word-level backend every tiny tokenizer shares: ids 0.. for ``special_tokens`` in
    order, then ``vocab_words`` (duplicates and special tokens dropped, first occurrence wins);
    lowercasing, words-and-punctuation splitting, special tokens matched before lowercasing.
    Raises ValueError for a word the tokenizer could never produce (not lowercase, or not one
    word / one punctuation character). Returns the backend and its vocabulary."""
    words: list[str] = []
    seen = set(special_tokens)
    for word in vocab_words:
        if not isinstance(word, str) or word != word.lower():
            raise ValueError(f"vocabulary word {word!r} must be lowercase (the tokenizer lowercases)")
        if split_words(word) != [word]:
            raise ValueError(f"vocabulary word {word!r} must be one word or one punctuation "
                             "character without spaces, else the tokenizer never produces it")
        if word not in seen:
            seen.add(word)
            words.append(word)
    vocab = {token: i for i, token in enumerate([*special_tokens, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    # normalized=False: special tokens match the raw text, before lowercasing.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t in special_tokens])
    return backend, vocab


def check_special_ids(tokenizer: PreTrainedTokenizerFast, special_tokens: Sequence[str]) -> None:
    """Fail loudly unless ``special_tokens[i]`` has id ``i``: every consumer relies on them."""
    for expected, token in enumerate(special_tokens):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise RuntimeError(f"special token {token} got id {got}, expected {expected}")


def easy_vqa_vocab() -> list[str]:
    """Every word of easy-vqa's questions and answers plus the chat template's words, sorted.

    Deterministic (a sorted set), so the same package gives the same ids on every machine.
    Example: "what color is the shape?" contributes "what", "color", "is", "the", "shape", "?".
    """
    try:
        import easy_vqa
    except ImportError as err:  # optional dependency: attanchor[data]
        raise ImportError("easy-vqa is not installed: pip install 'attanchor[data]'") from err
    words = set(TEMPLATE_WORDS)
    for get in (easy_vqa.get_train_questions, easy_vqa.get_test_questions):
        questions, answers, _ = get()
        for text in set(questions) | set(answers):  # few distinct strings among ~48k
            words.update(split_words(text))
    words.update(w for a in easy_vqa.get_answers() for w in split_words(a))
    return sorted(words)


def tiny_llava_config(
    vocab_size: int,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_intermediate: int | None = None,
    text_hidden: int = 128,
    text_layers: int = 2,
    text_intermediate: int | None = None,
    heads: int = 4,
    max_position_embeddings: int = 512,
    image_token_id: int = SPECIAL_TOKENS.index(IMAGE),
    pad_token_id: int = SPECIAL_TOKENS.index(PAD),
    bos_token_id: int = SPECIAL_TOKENS.index(BOS),
    eos_token_id: int = SPECIAL_TOKENS.index(EOS),
) -> LlavaConfig:
    """A LlavaConfig for a toy CLIP tower + Llama, with LLaVA-1.5's feature choices.

    Image tokens per image: M = (image_size // patch_size) ** 2 (64 by default): CLIP's CLS token
    is dropped by vision_feature_select_strategy="default"; features come from layer -2.
    Every Linear keeps in_features >= 64 (bitsandbytes' 4-bit packing crashes below 64 on CPU).
    Intermediate sizes default to 4 * vision_hidden and 2 * text_hidden.
    """
    vision_intermediate = vision_intermediate or 4 * vision_hidden
    text_intermediate = text_intermediate or 2 * text_hidden
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    for name, size in [("vision_hidden", vision_hidden), ("text_hidden", text_hidden)]:
        if size % heads:
            raise ValueError(f"{name}={size} is not divisible by heads={heads}")
    small = {k: v for k, v in [("vision_hidden", vision_hidden), ("text_hidden", text_hidden),
                               ("vision_intermediate", vision_intermediate),
                               ("text_intermediate", text_intermediate)] if v < 64}
    if small:
        raise ValueError(f"{small}: every Linear needs in_features >= 64 (QLoRA on CPU); raise them")
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int = 64, patch_size: int = 8
) -> LlavaProcessor:
    """An offline LlavaProcessor: PIL CLIP image processor (resize + center crop to
    image_size, CLIP mean/std) + `tokenizer`, expanding each "<image>" into
    (image_size // patch_size) ** 2 image tokens, exactly what `tiny_llava_config` produces
    (num_additional_image_tokens=1 counts CLIP's CLS, the "default" strategy drops it).
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava(
    out_dir: str | Path,
    *,
    vocab: list[str] | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Build a randomly initialised tiny LLaVA and save it, with its processor, to `out_dir`.

    `vocab`: the tokenizer's words (default: `easy_vqa_vocab()`). `seed` fixes the weights
    (same seed, same vocab, same overrides -> identical weights). `config_overrides` go to
    `tiny_llava_config` (e.g. patch_size=16 for 16 image tokens). Writes safetensors weights,
    config.json, generation_config.json, the processor, tokenizer and chat template, so that
    `LlavaForConditionalGeneration.from_pretrained(out_dir)` and
    `AutoProcessor.from_pretrained(out_dir)` work offline. Also writes `tiny_llava.json` with the
    build arguments and parameter count. Returns `Path(out_dir)`.
    """
    out = Path(out_dir)
    words = easy_vqa_vocab() if vocab is None else list(vocab)
    tokenizer = build_tokenizer(words)
    config = tiny_llava_config(len(tokenizer), **config_overrides)
    vision = config.vision_config
    processor = build_processor(tokenizer, vision.image_size, vision.patch_size)

    return save_tiny_model(LlavaForConditionalGeneration, config, tokenizer, processor, out,
                           seed=seed, builder="attanchor.data.tiny.build_tiny_llava",
                           info_name="tiny_llava.json", config_overrides=config_overrides,
                           image_tokens_per_image=config.image_seq_length)


def save_tiny_model(model_class: Any, config: Any, tokenizer: PreTrainedTokenizerFast,
                    processor: Any, out: Path, *, seed: int, builder: str, info_name: str,
                    config_overrides: dict[str, Any], **info: Any) -> Path:
    """The one save step of every tiny builder (LLaVA, LLaVA-NeXT, Qwen2.5-VL): weights
    initialised from ``seed`` without touching the caller's RNG, greedy generation config
    from the tokenizer's special ids, safetensors + processor in ``out``, and ``info_name``
    recording the build arguments and parameter count. Returns ``out``."""
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=16)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    record = {"builder": builder, "seed": seed, "vocab_size": len(tokenizer),
              "config_overrides": config_overrides,
              "num_parameters": sum(p.numel() for p in model.parameters()), **info}
    (out / info_name).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out
