"""Read LLaVA-style training records into one typed, validated ``Conversation``.

Two on-disk formats are accepted, as JSON (an array of records) or JSONL (one record a line,
streamed so a large file is never held whole):

- ``llava``: ``{"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt",
  "value": "<image>\\n..."}]}`` (LLaVA-Instruct-150K and friends).
- ``messages``: ``{"messages": [{"role", "content": str | [{"type": "image"} |
  {"type": "text", "text"}]}], "images": [paths]}`` (HF llava-instruct-mix-vsft).

Every problem is a ``BadRecordError`` naming the record (its id, else file and line or index)
and how to fix it. Image paths are confined to an image root (no absolute paths, no ``..``, no
symlink leading out of it).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
FORMATS = ("llava", "messages")
# LLaVA's speaker names, and the role names some converted files already use.
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


class BadRecordError(ValueError):
    """A record that cannot be trained on. ``record_id`` names it, ``reason`` says why and how
    to fix it; ``str(err)`` is ``"record <id>: <reason>"``."""

    def __init__(self, record_id: str, reason: str) -> None:
        super().__init__(f"record {record_id}: {reason}")
        self.record_id = record_id
        self.reason = reason

    def __reduce__(self):  # keeps the two-argument constructor picklable (DataLoader workers)
        return (type(self), (self.record_id, self.reason))


@dataclass(frozen=True)
class Turn:
    """One message. ``text`` holds literal ``<image>`` placeholders where images go."""

    role: str
    text: str


@dataclass
class Conversation:
    """A validated record: turns in order and image paths (relative to an image root), one
    path per ``<image>`` placeholder, in placeholder order. ``id_given`` is False when the
    record had no ``id`` of its own and ``id`` is its position (``file:line`` / ``file[i]``),
    which changes when the file is reordered."""

    id: str
    turns: list[Turn]
    images: list[str] = field(default_factory=list)
    id_given: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "turns": [[t.role, t.text] for t in self.turns],
             "images": list(self.images)}
        if not self.id_given:
            d["id_given"] = False
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Conversation:
        return cls(id=d["id"], turns=[Turn(r, t) for r, t in d["turns"]], images=list(d["images"]),
                   id_given=d.get("id_given", True))


def validate_conversation(conv: Conversation, *, require_answer: bool = True) -> Conversation:
    """Check roles, order and placeholders; return ``conv`` or raise ``BadRecordError``.

    Invariants after it passes: an optional system turn first, then user and assistant turns
    alternating, starting with user and (when ``require_answer``) ending with assistant; no
    turn is empty; ``<image>`` appears only in user turns and exactly ``len(images)`` times.
    """
    rid = conv.id
    if not conv.turns:
        raise BadRecordError(rid, "empty conversation: it has no turns; add a user question and "
                                  "an assistant answer or remove the record")
    turns = conv.turns
    for i, t in enumerate(turns):
        if t.role not in ROLES:
            raise BadRecordError(rid, f"turn {i} has role {t.role!r}; allowed are {ROLES}")
        if not isinstance(t.text, str) or not t.text.strip():
            raise BadRecordError(rid, f"turn {i} ({t.role}) is empty; give it text or remove it")
    body = turns[1:] if turns[0].role == "system" else turns
    if not body:
        raise BadRecordError(rid, "empty conversation: only a system prompt; add a user turn")
    for i, t in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:
            k = i + (len(turns) - len(body))
            raise BadRecordError(
                rid, f"wrong role order: turn {k} is {t.role!r} where {want!r} was expected "
                     f"(roles: {[x.role for x in turns]}); turns must be an optional system "
                     "prompt, then user and assistant alternating, starting with user")
    if require_answer and body[-1].role != "assistant":
        raise BadRecordError(rid, "the conversation ends with a user turn and has no answer to "
                                  "train on; end it with an assistant turn")
    count = 0
    for i, t in enumerate(turns):
        n = t.text.count(IMAGE_PLACEHOLDER)
        if n and t.role != "user":
            raise BadRecordError(rid, f"turn {i} ({t.role}) holds {IMAGE_PLACEHOLDER}; images "
                                      "belong in user turns")
        count += n
    if count != len(conv.images):
        raise BadRecordError(
            rid, f"{count} {IMAGE_PLACEHOLDER} placeholder(s) but {len(conv.images)} image(s); "
                 f"put one {IMAGE_PLACEHOLDER} in the user text per image (LLaVA puts "
                 f"'{IMAGE_PLACEHOLDER}\\n' before the first question)")
    return conv


def _as_image_list(value: Any, rid: str, key: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if isinstance(v, dict) and isinstance(v.get("path"), str):
            v = v["path"]
        if not isinstance(v, str) or not v:
            raise BadRecordError(rid, f"malformed record: {key!r} must be a path or a list of "
                                      f"paths, got {v!r}")
        out.append(v)
    return out


def own_record_id(rec: Any) -> str | None:
    """A raw record's own id as a string (``{"id": 7}`` -> ``"7"``), or None when it has none
    (or is not a JSON object). The one rule for what a record's id is."""
    if not isinstance(rec, dict) or rec.get("id") is None:
        return None
    return str(rec["id"])


def _record_id(rec: Any, fallback_id: str) -> str:
    """The record's own id, else ``fallback_id`` (file:line); a non-object record is bad."""
    if not isinstance(rec, dict):
        raise BadRecordError(fallback_id, f"malformed record: expected a JSON object, got "
                                          f"{type(rec).__name__}")
    own = own_record_id(rec)
    return own if own is not None else fallback_id


def parse_llava(rec: Any, fallback_id: str, *, require_answer: bool = True) -> Conversation:
    """One LLaVA-format record -> validated ``Conversation``."""
    rid = _record_id(rec, fallback_id)
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        raise BadRecordError(rid, "malformed record: missing list 'conversations' (LLaVA "
                                  "format: [{'from': 'human'|'gpt', 'value': ...}]); use "
                                  "--format messages for HF 'messages' records")
    turns = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise BadRecordError(rid, f"malformed record: conversations[{i}] needs 'from' and "
                                      f"'value', got {m!r:.80}")
        role = _LLAVA_ROLES.get(str(m["from"]).lower())
        if role is None:
            raise BadRecordError(rid, f"conversations[{i}] has from={m['from']!r}; allowed are "
                                      f"{sorted(_LLAVA_ROLES)}")
        if not isinstance(m["value"], str):
            raise BadRecordError(rid, f"malformed record: conversations[{i}].value must be a "
                                      f"string, got {type(m['value']).__name__}")
        turns.append(Turn(role, m["value"]))
    images = _as_image_list(rec.get("image", rec.get("images")), rid, "image")
    return validate_conversation(Conversation(rid, turns, images, own_record_id(rec) is not None),
                                 require_answer=require_answer)


def parse_messages(rec: Any, fallback_id: str, *, require_answer: bool = True) -> Conversation:
    """One HF messages-format record -> validated ``Conversation``.

    Content parts are joined with a newline; an ``{"type": "image"}`` part becomes ``<image>``,
    so ``[image, text "What?"]`` becomes ``"<image>\\nWhat?"`` (LLaVA's own layout).
    """
    rid = _record_id(rec, fallback_id)
    msgs = rec.get("messages")
    if not isinstance(msgs, list):
        raise BadRecordError(rid, "malformed record: missing list 'messages' (HF format: "
                                  "[{'role', 'content'}]); use --format llava for LLaVA records")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecordError(rid, f"malformed record: messages[{i}] needs 'role' and "
                                      f"'content', got {m!r:.80}")
        content = m["content"]
        if isinstance(content, str):
            parts = [content]
        elif isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "image":
                    parts.append(IMAGE_PLACEHOLDER)
                elif kind == "text" and isinstance(p.get("text"), str):
                    if IMAGE_PLACEHOLDER in p["text"]:
                        raise BadRecordError(rid, f"messages[{i}].content[{j}] text holds "
                                                  f"{IMAGE_PLACEHOLDER}; use an "
                                                  "{'type': 'image'} part instead")
                    parts.append(p["text"])
                else:
                    raise BadRecordError(rid, f"malformed record: messages[{i}].content[{j}] "
                                              "must be {'type': 'image'} or {'type': 'text', "
                                              f"'text': str}}, got {p!r:.80}")
        else:
            raise BadRecordError(rid, f"malformed record: messages[{i}].content must be a "
                                      f"string or a list of parts, got {type(content).__name__}")
        turns.append(Turn(str(m["role"]), "\n".join(parts)))
    images = _as_image_list(rec.get("images", rec.get("image")), rid, "images")
    return validate_conversation(Conversation(rid, turns, images, own_record_id(rec) is not None),
                                 require_answer=require_answer)


def raw_records(path: Path) -> Iterator[tuple[str, Any, str]]:
    """Yield ``(fallback_id, parsed JSON | BadRecordError, original line)``, in file order.

    JSONL streams line by line and keeps each record's line verbatim (``attanchor data split``
    writes it back untouched); a .json array has no per-record text (``""``). A line that is
    not JSON is yielded as a ``BadRecordError`` naming it; a broken .json file raises.
    """
    if path.suffix == ".jsonl":
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{lineno}"
                try:
                    yield where, json.loads(line), line.rstrip("\r\n")
                except json.JSONDecodeError as e:
                    yield where, BadRecordError(where, f"malformed record: invalid JSON ({e.msg} "
                                                       f"at column {e.colno}); fix the line"), ""
        return
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        # A broken JSON array cannot be read past the error: the whole file is the bad record.
        raise BadRecordError(f"{path.name}:{e.lineno}", f"invalid JSON ({e.msg}); the file "
                             "cannot be read; fix it or convert it to JSONL (one record a line)")\
            from e
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise BadRecordError(path.name, "a .json data file must hold a list of records")
    for i, rec in enumerate(data):
        yield f"{path.name}[{i}]", rec, ""


def read_records(path: str | os.PathLike, format: str = "llava", *, require_answer: bool = True,
                 errors: str = "raise") -> Iterator[Conversation]:
    """Iterate the validated conversations of a ``.json`` or ``.jsonl`` file, in file order.

    ``errors="raise"`` raises the first ``BadRecordError``; ``errors="yield"`` yields the error
    object in the record's place so a caller can report every bad record in one pass.
    A record without an id is named ``file:line`` (JSONL) or ``file[index]`` (JSON).
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: allowed are {FORMATS}")
    if errors not in ("raise", "yield"):
        raise ValueError(f"errors={errors!r}: allowed are 'raise' and 'yield'")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    parse = parse_llava if format == "llava" else parse_messages
    for where, rec, _ in raw_records(path):
        try:
            if isinstance(rec, BadRecordError):
                raise rec
            yield parse(rec, where, require_answer=require_answer)
        except BadRecordError as e:
            if errors == "raise":
                raise
            yield e


def resolve_image(image_root: str | os.PathLike, rel: str, record_id: str) -> Path:
    """Resolve ``rel`` under ``image_root``; refuse anything that leads outside it.

    Refused: absolute paths, any ``..`` component, and paths whose resolved target (symlinks
    followed) lies outside the resolved root. A missing file is a ``BadRecordError`` too.
    Example: ``resolve_image("/data", "coco/1.jpg", "r1") -> Path("/data/coco/1.jpg")``.
    """
    root = Path(image_root).resolve()
    p = Path(rel)
    if p.is_absolute() or p.drive or rel.startswith(("/", "\\")):
        raise BadRecordError(record_id, f"image path {rel!r} is absolute; give it relative to "
                                        f"the image root {root}")
    if ".." in p.parts or ".." in rel.replace("\\", "/").split("/"):
        raise BadRecordError(record_id, f"image path {rel!r} contains '..'; paths must stay "
                                        f"inside the image root {root}")
    full = root / p
    try:
        target = full.resolve(strict=True)
    except FileNotFoundError:
        raise BadRecordError(record_id, f"image not found: {full} (image root {root}); fix the "
                                        "path or --image-root") from None
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, parent permissions, NUL
        raise BadRecordError(record_id, f"image path {full!r} cannot be resolved ({e})") \
            from None
    if not target.is_relative_to(root):
        raise BadRecordError(record_id, f"image path {rel!r} is a symlink to {target}, outside "
                                        f"the image root {root}; copy the file into the root")
    if not target.is_file():
        raise BadRecordError(record_id, f"image path {full} is not a file")
    return target


DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: above any training image, below a bomb
_max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
_PIL_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own default


def set_max_image_pixels(limit: int) -> None:
    """Set this process's pixel limit (``width * height``) for ``load_image``/``check_image``.

    The data module sets it from ``data.max_image_pixels`` (and every DataLoader worker sets it
    again before decoding, so spawned workers agree). PIL's own bomb limit is raised to match
    when ours is higher, so the limit that refuses an image is always this one.
    """
    global _max_image_pixels
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_image_pixels={limit!r}: must be a positive int (pixels, "
                         f"width x height; default {DEFAULT_MAX_IMAGE_PIXELS:,})")
    _max_image_pixels = limit
    if Image.MAX_IMAGE_PIXELS is not None:  # None: someone turned PIL's check off on purpose
        Image.MAX_IMAGE_PIXELS = max(_PIL_MAX_IMAGE_PIXELS, limit)


def max_image_pixels() -> int:
    """This process's pixel limit (``set_max_image_pixels``; default 50 MP)."""
    return _max_image_pixels


def load_image(path: Path, record_id: str, max_pixels: int | None = None) -> Image.Image:
    """Decode an image fully and convert it to RGB; return it.

    Refused, each as a ``BadRecordError`` naming the record and the file: more than
    ``max_pixels`` pixels (default: ``max_image_pixels()``), checked from the header before any
    pixel is decoded, PIL's decompression-bomb warning and error included; a truncated file
    (PIL refuses to decode a partial image: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off); a
    file that is not an image, unreadable, or that any decoder fails on. Nothing else escapes:
    a broken image can never raise anything but ``BadRecordError``.
    Example: a 10000 x 10000 PNG with ``max_pixels=50_000_000`` -> ``BadRecordError("r1",
    "image .../big.png is 10000x10000 = 100,000,000 pixels, over the limit ...")``.
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > limit:
                    raise BadRecordError(record_id, _too_big(path, w, h, limit))
                im.load()
                return im.convert("RGB")
    except BadRecordError:
        raise
    except PermissionError as e:
        raise BadRecordError(record_id, f"image {path} cannot be read ({e.strerror}); fix its "
                                        "permissions") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRecordError(record_id, f"image {path} is a decompression bomb ({e}); over the "
                                        f"limit of {limit:,} pixels: resize it, drop the record "
                                        "or raise data.max_image_pixels") from None
    except Exception as e:  # noqa: BLE001  (any decoder failure is this record's fault)
        raise BadRecordError(record_id, f"image {path} is corrupt or not an image, or is "
                                        f"truncated ({type(e).__name__}: {e}); replace the "
                                        "file or drop the record") from None


def _too_big(path: Path, w: int, h: int, limit: int) -> str:
    return (f"image {path} is {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} (a "
            "decompression bomb or an oversized image); resize it, drop the record or raise "
            "data.max_image_pixels")


def check_image(path: Path, record_id: str, max_pixels: int | None = None) -> tuple[int, int]:
    """Decode the image exactly as training will (``load_image``: pixel limit, full decode, RGB
    conversion) and return ``(width, height)``. Used when records are indexed, before training
    starts, so an image that passes here cannot fail later in a DataLoader worker (unless the
    file changes in between). ``verify()`` alone is not enough: it does not decode, so a
    truncated JPEG passes it."""
    return load_image(path, record_id, max_pixels).size
