"""Conversation + processor -> ``RenderedSample``: ids, labels and candidate mask from ONE
tokenization.

How: the chat template is rendered as typed pieces (``templates.py``), the concatenated text is
tokenized once by the fast tokenizer with character offsets, and every token takes the kind of
the piece its non-whitespace characters fall in. Labels and candidates are read off the kinds;
nothing is ever re-tokenized to measure a length. Anything ambiguous (a token that straddles two
pieces, an image placeholder that is not exactly one image token, a piece that produced no
token, a special token inside message text) raises; no sample is ever masked silently.

Rules (METHOD.md "Candidates"):
- labels: assistant content tokens, plus the end-of-turn token that closes an assistant turn
  (named templates: the eos token; own templates: the first non-blank token after the answer
  when it is a special token, e.g. ``</s>`` or ``<|im_end|>``). -100 elsewhere.
- candidate_mask: non-blank, non-special tokens of user contents in scope (``image_turn``: user
  turns that hold an image; ``all_user_turns``). Never role markers, the system prompt, image
  tokens, padding, unknown-word tokens (``unk`` is special) or a labelled token.
- each image placeholder becomes the processor's number of image tokens (asked from the
  processor, ``replace_image_token``: LLaVA fixed, LLaVA-NeXT by ``image_sizes``, Qwen2.5-VL
  ``grid // merge**2``; ``images.py``), so the model's placeholder check holds; the family's
  size tensors and (Qwen) ``mm_token_type_ids`` ride along in the sample.
- truncation to ``max_length`` never cuts an image span; the images and the first prompt must
  fit, and at least one answer token must remain, else the record is a ``BadRecordError``.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from attanchor.data.formats import (
    IMAGE_PLACEHOLDER,
    Conversation,
    load_image,
    resolve_image,
)
from attanchor.data.images import (
    ProcessedImage,
    batch_images,
    process,
    take_images,
    token_counts,
)
from attanchor.data.templates import (
    NAMED_TEMPLATES,
    Piece,
    TemplateMismatchError,
    chat_template_pieces,
    named_template_pieces,
    resolve_chat_template,
)
from attanchor.data.tokens import IGNORE_INDEX, TextRender, expand, token_pieces

SCOPES = ("image_turn", "all_user_turns")
# Token kinds as stored in TextRender.kinds; "special" = added by the tokenizer, not in the text.
KINDS = ("special", "bos", "template", "system", "user", "assistant", "image", "eot")
_KIND_ID = {k: i for i, k in enumerate(KINDS)}


@dataclass
class RenderedSample:
    """One training/eval sample. All tensors have length L (the expanded sequence)."""

    id: str
    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor  # (L,) long, -100 = not trained on
    candidate_mask: torch.Tensor  # (L,) bool
    # Float, None without images. LLaVA (n_images, 3, H, W); LLaVA-NeXT (n_images, n_tiles, 3,
    # S, S); Qwen2.5-VL (n_patches, C * T * P * P), flat patches (attanchor.data.images).
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None = None  # (n_images, 2) long, (h, w): LLaVA-NeXT
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3) long: Qwen2.5-VL
    mm_token_type_ids: torch.Tensor | None = None  # (L,) int32, 1 at image tokens: Qwen2.5-VL


def _prompt_only(conv: Conversation) -> Conversation:
    if conv.turns and conv.turns[-1].role == "assistant":
        return Conversation(conv.id, conv.turns[:-1], conv.images)
    return conv


class Renderer:
    """Renders conversations for one processor and template; what every call needs (special
    ids, the chat template, skeletons, processed images) is computed once and cached.

    ``template``: None = the processor's/tokenizer's own chat template, or a name from
    ``NAMED_TEMPLATES`` (``"llava-1.5"``, ``"tiny-llava-v1"``). ``verify_template=False`` skips
    re-rendering the real messages to check the sentinel mapping; only for records already
    rendered once with verification (the data module does that when it indexes records).
    ``image_cache_mb``: keep processed pixel values of recently used images (per process).
    """

    def __init__(self, processor: Any, *, template: str | None = None,
                 scope: str = "image_turn", max_length: int | None = None,
                 image_root: str | os.PathLike | None = None, verify_template: bool = True,
                 image_cache_mb: float = 0) -> None:
        tok = getattr(processor, "tokenizer", None)
        if tok is None or getattr(processor, "image_processor", None) is None:
            raise TypeError(f"{type(processor).__name__} needs .tokenizer and .image_processor "
                            "(a LlavaProcessor: AutoProcessor.from_pretrained(model_path))")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r}: allowed are {SCOPES}")
        if template is not None and template not in NAMED_TEMPLATES:
            raise ValueError(f"template={template!r}: allowed are {sorted(NAMED_TEMPLATES)} or "
                             "None (the model's own chat template)")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1 or None")
        self.backend = getattr(tok, "backend_tokenizer", None)
        if self.backend is None:
            raise TypeError(f"{type(tok).__name__} is not a fast tokenizer; masks need "
                            "character offsets: load it with use_fast=True")
        self.processor, self.tokenizer = processor, tok
        self.template, self.scope, self.max_length = template, scope, max_length
        self.image_root = None if image_root is None else str(image_root)
        self.verify_template = verify_template
        self.image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tok.unk_token_id:
            raise ValueError(f"the tokenizer has no token {self.image_token!r}; add it as a "
                             "special token")
        self.special = frozenset(tok.all_special_ids)
        # Read once: HF tokenizers resolve these attributes through __getattr__ on every access.
        self.bos_token, self.eos_token = tok.bos_token, tok.eos_token
        self.bos_token_id, self.eos_token_id = tok.bos_token_id, tok.eos_token_id
        self.unk_token_id = tok.unk_token_id  # unknown words: allowed in text, never candidates
        self.special_tokens = dict(tok.special_tokens_map)
        self.chat_template = None if template is not None else \
            resolve_chat_template(processor, tok)
        self._skeletons: dict = {}
        self._warned_eot = False
        self._size_counts: dict = {}
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, int(image_cache_mb * 2**20)

    # -- text -------------------------------------------------------------------------------
    def pieces(self, conv: Conversation, for_generation: bool = False) -> list[Piece]:
        """The template's typed pieces for ``conv`` (for generation: without a final answer,
        ending with the generation prompt)."""
        conv = _prompt_only(conv) if for_generation else conv
        if self.template is not None:
            return named_template_pieces(
                conv, NAMED_TEMPLATES[self.template], bos_token=self.bos_token,
                eos_token=self.eos_token, image_token=self.image_token,
                add_generation_prompt=for_generation)
        return chat_template_pieces(
            conv, self.chat_template, special_tokens=self.special_tokens,
            image_token=self.image_token, add_generation_prompt=for_generation,
            verify=self.verify_template, cache=self._skeletons)

    def render_text(self, conv: Conversation, image_token_counts: list[int], *,
                    for_generation: bool = False) -> TextRender:
        """Tokenize ``conv`` once and derive labels / candidates / kinds (module doc).

        ``image_token_counts[i]``: tokens of image i. ``for_generation``: drop a final answer,
        end with the generation prompt, no labels, never truncate (too long = bad record).
        Example (llava-1.5, word tokenizer): ``<s>USER: <image>\\nwhat color? ASSISTANT:
        red</s>`` -> labels on ``red </s>``, candidates on ``what color ?``.
        """
        rid, tok = conv.id, self.tokenizer
        conv = _prompt_only(conv) if for_generation else conv
        if len(image_token_counts) != len(conv.images):
            raise ValueError(f"record {rid}: {len(conv.images)} images but "
                             f"{len(image_token_counts)} token counts")
        pieces = self.pieces(conv, for_generation)
        text = "".join(p.text for p in pieces)
        if self.template is not None:
            add_special = False  # the named template writes bos itself
        else:  # as HF's processor does: add special tokens unless the template wrote bos
            add_special = not (self.bos_token and text.startswith(self.bos_token))
        enc = self.backend.encode(text, add_special_tokens=add_special)
        ids = enc.ids
        owner, blank = token_pieces(text, pieces, enc.offsets, rid)

        n_img_pieces = sum(p.kind == "image" for p in pieces)
        if n_img_pieces != len(image_token_counts):
            raise TemplateMismatchError(rid, f"the chat template rendered {n_img_pieces} image "
                                             f"placeholder(s) for {len(image_token_counts)} "
                                             "image(s)")
        in_scope = {i for i, t in enumerate(conv.turns) if t.role == "user" and (
            self.scope == "all_user_turns" or IMAGE_PLACEHOLDER in t.text)}
        first_user = next((i for i, t in enumerate(conv.turns) if t.role == "user"), -1)
        n_first_images = conv.turns[first_user].text.count(IMAGE_PLACEHOLDER)
        special, image_id = self.special, self.image_token_id
        k_special, k_template, k_eot = _KIND_ID["special"], _KIND_ID["template"], _KIND_ID["eot"]
        k_user, k_asst, k_image = _KIND_ID["user"], _KIND_ID["assistant"], _KIND_ID["image"]
        kinds = [k_special if o < 0 else _KIND_ID[pieces[o].kind] for o in owner]
        seen = [0] * len(pieces)
        for o in owner:
            if o >= 0:
                seen[o] += 1
        for i, p in enumerate(pieces):
            if p.kind == "image" and seen[i] != 1:
                raise TemplateMismatchError(
                    rid, f"{self.image_token!r} became {seen[i]} tokens, not 1; add it to the "
                         "tokenizer as a special token")
            if not seen[i] and p.text.strip():
                raise TemplateMismatchError(rid, f"the {p.kind} text {p.text[:30]!r} produced "
                                                 "no token; the tokenizer drops it")
        for j, (t, k) in enumerate(zip(ids, kinds)):
            if (t == image_id) != (k == k_image):
                raise TemplateMismatchError(
                    rid, f"token {j} is {tok.convert_ids_to_tokens(t)!r} in a {KINDS[k]} part; "
                         f"the image token {self.image_token!r} may only stand for an image "
                         "(remove it from message text)")
            if t in special and t != self.unk_token_id and k in (_KIND_ID["system"], k_user,
                                                                 k_asst):
                raise TemplateMismatchError(
                    rid, f"message text contains the special token "
                         f"{tok.convert_ids_to_tokens(t)!r}; remove it from the record (it would "
                         "be read as a control token)")
            if k == _KIND_ID["bos"] and t != self.bos_token_id or k == k_eot and \
                    t != self.eos_token_id:
                raise TemplateMismatchError(rid, f"the {KINDS[k]} string did not tokenize to "
                                                 "its single special token")
        if self.template is None:  # own template: first non-blank token after an answer
            for j in range(len(ids) - 1):
                if kinds[j] == k_asst and kinds[j + 1] != k_asst:
                    k = j + 1
                    while k < len(ids) and blank[k] and kinds[k] == k_template:
                        k += 1
                    if k < len(ids) and ids[k] in special and kinds[k] in (k_template,
                                                                           k_special):
                        kinds[k] = k_eot
            if not for_generation and not self._warned_eot and k_asst in kinds and \
                    k_eot not in kinds:
                self._warned_eot = True
                warnings.warn(f"the chat template closes assistant turns with no special token "
                              f"(record {rid}): the model is never trained to stop; use a "
                              "template that ends answers with eos, e.g. template='llava-1.5'",
                              stacklevel=2)

        # Per token: label and candidate; then one vectorised expansion of image tokens.
        labs, cands, reps = [], [], [1] * len(ids)
        need = 0  # tokens (before expansion) through the first user turn's content
        n_img = 0
        for j, (t, k, o) in enumerate(zip(ids, kinds, owner)):
            if k == k_image:
                reps[j] = image_token_counts[n_img]
                n_img += 1
                if n_img == n_first_images:
                    need = max(need, j + 1)
            lab = t if (k == k_asst or k == k_eot) and not for_generation else IGNORE_INDEX
            turn = pieces[o].turn if o >= 0 else -1
            labs.append(lab)
            cands.append(k == k_user and not blank[j] and t not in special and
                         turn in in_scope and lab == IGNORE_INDEX)
            if turn == first_user:
                need = j + 1
        return expand(rid, ids, labs, cands, kinds, reps, need, self.max_length,
                      for_generation, k_image)

    # -- images -----------------------------------------------------------------------------
    def image_token_counts(self, image_inputs: torch.Tensor | dict[str, Any]) -> list[int]:
        """Tokens the model reserves for each processed image, asked from the processor
        (``images.token_counts``: LLaVA fixed, NeXT by ``image_sizes``, Qwen by
        ``image_grid_thw // merge**2``). ``image_inputs``: the image processor's output, or
        LLaVA's ``pixel_values`` tensor."""
        return token_counts(self.processor, image_inputs, self.image_token)

    def token_count_for_size(self, size: tuple[int, int]) -> int:
        """Token count of an image of ``size`` (width, height) without reading it (a blank
        image of that size is processed once per size). For checks before training."""
        if size not in self._size_counts:
            self._size_counts[size] = process(self.processor, Image.new("RGB", size),
                                              self.image_token).num_tokens
        return self._size_counts[size]

    def image_inputs(self, conv: Conversation) -> tuple[dict[str, torch.Tensor] | None,
                                                        list[int]]:
        """``({"pixel_values", size tensors} | None, token count per image)`` for ``conv``
        (layouts per family: ``attanchor.data.images``): images resolved under
        ``image_root``, decoded, processed (bad ones raise ``BadRecordError``); cached per
        path within ``image_cache_mb``."""
        if not conv.images:
            return None, []
        if self.image_root is None:
            raise ValueError(f"record {conv.id} has images but image_root is None")
        done = []
        for rel in conv.images:
            hit = self._cache.get(rel)
            if hit is None:
                im = load_image(resolve_image(self.image_root, rel, conv.id), conv.id)
                hit = process(self.processor, im, self.image_token)
                self._remember(rel, hit)
            else:
                self._cache.move_to_end(rel)
            done.append(hit)
        return batch_images(done, f"record {conv.id}"), [h.num_tokens for h in done]

    def images(self, conv: Conversation) -> tuple[torch.Tensor | None, list[int]]:
        """``(pixel_values | None, token count per image)``: ``image_inputs`` without the size
        tensors (LLaVA: (n_images, 3, H, W))."""
        inputs, counts = self.image_inputs(conv)
        return (None if inputs is None else inputs["pixel_values"]), counts

    def _remember(self, key: str, item: ProcessedImage) -> None:
        size = item.nbytes()
        if size > self._cache_limit:
            return
        self._cache[key] = item
        self._cache_bytes += size
        while self._cache_bytes > self._cache_limit:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes()

    def __call__(self, conv: Conversation, *, for_generation: bool = False) -> RenderedSample:
        """Render one conversation (module doc). Invariants: ``labels[i] in (-100,
        input_ids[i])``; ``candidate_mask`` and ``labels != -100`` are disjoint; the image
        tokens number the processor's count summed over the images kept; size tensors
        (``image_sizes`` / ``image_grid_thw``) have one row per image kept;
        ``mm_token_type_ids`` (processors that return it: Qwen) is 1 exactly at image tokens."""
        inputs, counts = self.image_inputs(conv)
        tr = self.render_text(conv, counts, for_generation=for_generation)
        kept = take_images(inputs, tr.num_images) if inputs is not None else None
        kept = kept or {}
        mm = None
        if getattr(self.processor, "return_mm_token_type_ids", False):
            mm = torch.from_numpy((tr.kinds == _KIND_ID["image"]).astype(np.int32))
        return RenderedSample(
            id=conv.id, input_ids=torch.from_numpy(tr.input_ids),
            labels=torch.from_numpy(tr.labels),
            candidate_mask=torch.from_numpy(tr.candidate_mask),
            pixel_values=kept.get("pixel_values"), image_sizes=kept.get("image_sizes"),
            image_grid_thw=kept.get("image_grid_thw"), mm_token_type_ids=mm)


def render(conversation: Conversation, processor: Any, *, template: str | None = None,
           scope: str = "image_turn", max_length: int | None = None,
           image_root: str | os.PathLike | None = None,
           for_generation: bool = False) -> RenderedSample:
    """Render one conversation into a ``RenderedSample`` (see ``Renderer``; to render many,
    build one ``Renderer`` and call it, which caches what this recomputes per call)."""
    return Renderer(processor, template=template, scope=scope, max_length=max_length,
                    image_root=image_root)(conversation, for_generation=for_generation)
