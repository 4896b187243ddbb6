"""Chat templates as lists of typed pieces: the rendered text plus which part each span is.

A ``Piece`` is a run of characters of the rendered prompt with a kind:
``bos`` / ``template`` (role markers and separators), ``system``, ``user`` and ``assistant``
(message contents), ``image`` (one image placeholder) and ``eot`` (the end-of-turn string that
closes an assistant turn and is trained on). ``render.py`` tokenizes the concatenated text once
and classifies every token by the piece its characters fall in.

Two sources of pieces:
- named templates (``NAMED_TEMPLATES``), written out here;
- the tokenizer's / processor's own Jinja chat template, rendered once with every content
  replaced by a unique sentinel; the text between sentinels is template text. Substituting the
  real contents back must give exactly what the template renders for the real messages, or the
  template transforms contents in a way we cannot map and we raise.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from attanchor.data.formats import IMAGE_PLACEHOLDER, BadRecordError, Conversation

PIECE_KINDS = ("bos", "template", "system", "user", "assistant", "image", "eot")


class TemplateMismatchError(BadRecordError):
    """The tokenizer or template produced something the masks cannot be derived from with
    certainty (PITFALLS.md: raise, never mask silently)."""


@dataclass(frozen=True)
class Piece:
    kind: str
    text: str
    turn: int = -1  # index into Conversation.turns; -1 for template text


@dataclass(frozen=True)
class NamedTemplate:
    """A LLaVA-style template written out: ``[bos] [system sep] (user_prefix USER user_suffix
    assistant_prefix ASSISTANT eos)* [generation_prompt]``."""

    name: str
    system_sep: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    generation_prompt: str


NAMED_TEMPLATES = {
    # LLaVA-1.5 (conv "vicuna_v1"): "USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>"
    "llava-1.5": NamedTemplate("llava-1.5", system_sep=" ", user_prefix="USER: ",
                               user_suffix=" ", assistant_prefix="ASSISTANT: ",
                               generation_prompt="ASSISTANT:"),
    # bczhou/tiny-llava-v1-hf (its model card): "USER: <image>\nQ\nASSISTANT: A</s>"
    "tiny-llava-v1": NamedTemplate("tiny-llava-v1", system_sep=" ", user_prefix="USER: ",
                                   user_suffix="\n", assistant_prefix="ASSISTANT: ",
                                   generation_prompt="ASSISTANT:"),
}


def _content_pieces(text: str, role: str, turn: int, image_token: str) -> list[Piece]:
    """Split one message at its placeholders: ``"<image>\\nQ"`` -> [image, user "\\nQ"]."""
    out: list[Piece] = []
    for j, seg in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if j:
            out.append(Piece("image", image_token, turn))
        if seg:
            out.append(Piece(role, seg, turn))
    return out


def named_template_pieces(conv: Conversation, template: NamedTemplate, *, bos_token: str | None,
                          eos_token: str | None, image_token: str,
                          add_generation_prompt: bool) -> list[Piece]:
    """Pieces of ``conv`` under a named template (generation prompt appended on request)."""
    if eos_token is None:
        raise ValueError(f"template {template.name!r} closes answers with the eos token, but "
                         "the tokenizer has none; set tokenizer.eos_token")
    out = [Piece("bos", bos_token)] if bos_token else []
    for i, t in enumerate(conv.turns):
        if t.role == "system":
            out += [Piece("system", t.text, i), Piece("template", template.system_sep)]
        elif t.role == "user":
            out.append(Piece("template", template.user_prefix))
            out += _content_pieces(t.text, "user", i, image_token)
            out.append(Piece("template", template.user_suffix))
        else:
            out += [Piece("template", template.assistant_prefix), Piece("assistant", t.text, i),
                    Piece("eot", eos_token)]
    if add_generation_prompt:
        out.append(Piece("template", template.generation_prompt))
    return [p for p in out if p.text]


_SENTINEL = re.compile("\ue000(\\d+)\ue001")


@functools.lru_cache(maxsize=16)
def _wants_parts(chat_template: str) -> bool:
    # Multimodal templates iterate typed parts ({"type": "image"} / {"type": "text"}); plain
    # text templates concatenate message["content"] as a string.
    return bool(re.search(r"""['"]type['"]|\.type\b""", chat_template))


def _layout(conv: Conversation, parts: bool):
    """Per turn ``(role, items)`` with items ``"image"`` or a slot number, the slot texts, and
    a key that is equal for conversations the template renders with the same skeleton.

    Texts are stripped at the message's edges (parts mode: each text part), so templates that
    ``trim`` contents render them unchanged."""
    layout, texts, slot_turns = [], [], []
    for i, t in enumerate(conv.turns):
        items: list[Any] = []
        for j, seg in enumerate(t.text.strip().split(IMAGE_PLACEHOLDER)):
            if j:
                items.append("image")
            seg = seg.strip() if parts else seg
            if seg:
                items.append(len(texts))
                texts.append(seg)
                slot_turns.append(i)
        layout.append((t.role, items))
    key = (parts, tuple((r, tuple("I" if x == "image" else "T" for x in it)) for r, it in layout))
    return layout, texts, slot_turns, key


def _messages(layout, texts: list[str], parts: bool, image_token: str) -> list[dict[str, Any]]:
    out = []
    for role, items in layout:
        if parts:
            content: Any = [{"type": "image"} if x == "image" else {"type": "text", "text": texts[x]}
                            for x in items]
        else:
            content = "".join(image_token if x == "image" else texts[x] for x in items)
        out.append({"role": role, "content": content})
    return out


def _render(rid: str, chat_template: str, messages, add_generation_prompt: bool,
            special_tokens: dict[str, Any]) -> str:
    # The function tokenizer.apply_chat_template calls, minus its per-call overhead.
    try:
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, **special_tokens)
    except TemplateError as e:  # e.g. raise_exception('unsupported role') for this record
        raise TemplateMismatchError(rid, f"the chat template refused the record: {e}") from None
    return rendered[0]


def chat_template_pieces(conv: Conversation, chat_template: str, *,
                         special_tokens: dict[str, Any], image_token: str,
                         add_generation_prompt: bool, verify: bool = True,
                         cache: dict | None = None) -> list[Piece]:
    """Pieces of ``conv`` under a Jinja chat template, derived with sentinels (module doc).

    ``special_tokens``: the tokenizer's ``special_tokens_map`` (what the template may read, as
    in ``apply_chat_template``). ``cache``: a dict reused across calls; skeletons are cached by
    conversation layout. ``verify``: also render the real messages and require equality with
    the substituted skeleton (skip only for records already verified with this template).
    Raises ``TemplateMismatchError`` when a content is lost, repeated or transformed.
    """
    parts = _wants_parts(chat_template)
    layout, texts, slot_turns, key = _layout(conv, parts)
    key = (key, add_generation_prompt)
    skeleton = cache.get(key) if cache is not None else None
    if skeleton is None:
        marks = [f"\ue000{k}\ue001" for k in range(len(texts))]
        rendered = _render(conv.id, chat_template, _messages(layout, marks, parts, image_token),
                           add_generation_prompt, special_tokens)
        skeleton, seen, pos = [], [], 0
        for m in [*_SENTINEL.finditer(rendered), None]:
            lit = rendered[pos:m.start() if m else len(rendered)]
            for j, seg in enumerate(lit.split(image_token)):
                if j:
                    skeleton.append(("image", image_token))
                if seg:
                    skeleton.append(("template", seg))
            if m:
                seen.append(int(m.group(1)))
                skeleton.append(("slot", int(m.group(1))))
                pos = m.end()
        if sorted(seen) != list(range(len(texts))):
            raise TemplateMismatchError(
                conv.id, f"the chat template rendered message contents {sorted(seen)} of "
                         f"{len(texts)}: it drops or repeats content, so masks cannot be "
                         "derived; use a named template (template='llava-1.5')")
        if cache is not None:
            cache[key] = skeleton
    roles = [r for r, _ in layout]
    pieces = [Piece(roles[slot_turns[x]], texts[x], slot_turns[x]) if kind == "slot"
              else Piece(kind, x) for kind, x in skeleton]
    if verify:
        real = _render(conv.id, chat_template, _messages(layout, texts, parts, image_token),
                       add_generation_prompt, special_tokens)
        rebuilt = "".join(p.text for p in pieces)
        if rebuilt != real:
            at = next((i for i, (a, b) in enumerate(zip(rebuilt, real)) if a != b),
                      min(len(rebuilt), len(real)))
            raise TemplateMismatchError(
                conv.id, f"the chat template transforms message contents (at char {at}: "
                         f"expected {rebuilt[at:at + 30]!r}, template gave {real[at:at + 30]!r});"
                         " masks cannot be mapped; use a named template (template='llava-1.5')")
    return pieces


def resolve_chat_template(processor: Any, tokenizer: Any) -> str:
    """The processor's chat template, else the tokenizer's; a clear error when neither has one."""
    tpl = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default")
    if not isinstance(tpl, str) or not tpl:
        names = sorted(NAMED_TEMPLATES)
        raise ValueError("template=None asks for the model's own chat template, but neither the "
                         f"processor nor the tokenizer has one; pass one of {names}")
    return tpl
