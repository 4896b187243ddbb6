"""Token-level helpers of the renderer: which prompt piece owns each token, and the image
expansion + truncation of the per-token lists. Pure functions over lists and numpy arrays.

Example (``expand``): ids ``[u, I, q, a]`` with reps ``[1, 3, 1, 1]`` (the image token stands
for 3 features) become ``[u, I, I, I, q, a]``; with ``max_length=3`` the cut would fall inside
the image span [1, 4), so it moves back to 1; the image belongs to the first prompt, which must
fit, so this record raises ``BadRecordError`` (with ``max_length=5`` it keeps the first 5).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from attanchor.data.formats import BadRecordError
from attanchor.data.templates import Piece, TemplateMismatchError

IGNORE_INDEX = -100


@dataclass
class TextRender:
    """The text half of a render (numpy, length L after image expansion and truncation)."""

    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64
    candidate_mask: np.ndarray  # (L,) bool
    kinds: np.ndarray  # (L,) int8 index into KINDS
    num_images: int  # images whose tokens survived truncation


def _raise_fit(rid: str, reason: str) -> None:
    raise BadRecordError(rid, f"does not fit: {reason}")


def token_pieces(text: str, pieces: list[Piece], offsets, rid: str):
    """Piece index of every token (-1: zero-width, added by the tokenizer) and whether it covers
    only whitespace. A token whose non-blank characters fall in two pieces raises."""
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p.text)
    owner, blank = [], []
    for j, (s, e) in enumerate(offsets):
        if s >= e:
            owner.append(-1)
            blank.append(False)
            continue
        chunk = text[s:e]
        stripped = chunk.strip()
        if not stripped:
            owner.append(bisect_right(starts, s) - 1)
            blank.append(True)
            continue
        a = s + len(chunk) - len(chunk.lstrip())
        pa = bisect_right(starts, a) - 1
        pb = bisect_right(starts, a + len(stripped) - 1) - 1
        if pa != pb:
            raise TemplateMismatchError(
                rid, f"token {j} ({chunk!r}) spans two parts of the prompt ({pieces[pa].kind} "
                     f"and {pieces[pb].kind}); the tokenizer merges template text with message "
                     "text, so masks would be a guess; use a template that separates them")
        owner.append(pa)
        blank.append(False)
    return owner, blank


def expand(rid: str, ids: list[int], labs: list[int], cands: list[bool], kinds: list[int],
           reps: list[int], need: int, max_length: int | None, for_generation: bool,
           image_kind: int) -> TextRender:
    """Per-token lists (before image expansion) -> the expanded, truncated ``TextRender``.

    ``kinds``: indices into the renderer's ``KINDS``, ``image_kind`` the image tokens' one;
    ``reps[j]``: copies of token j (an image token's count, else 1); ``need``: tokens through
    the first user turn's content, which must fit. Truncation to ``max_length`` never cuts an
    image span; at least one answer token must remain (else ``BadRecordError``)."""
    reps_a = np.asarray(reps, dtype=np.int64)
    ends = np.cumsum(reps_a)  # expanded end of each token
    out = [np.repeat(np.asarray(x, dtype=dt), reps_a) for x, dt in
           ((ids, np.int64), (labs, np.int64), (cands, bool), (kinds, np.int8))]
    is_img = np.asarray(kinds, dtype=np.int8) == image_kind  # per token, before expansion
    img_end = ends[is_img]
    img_start = img_end - reps_a[is_img]  # image i occupies [img_start[i], img_end[i])
    need = int(ends[need - 1]) if need else 0
    total, n_images = int(ends[-1]) if len(ends) else 0, int(is_img.sum())
    cut = total
    if max_length is not None and total > max_length:
        if for_generation:
            _raise_fit(rid, f"its prompt takes {total} tokens, more than max_length="
                            f"{max_length}; raise max_length or shorten the prompt")
        cut = max_length
        inside = (img_start < cut) & (cut < img_end)
        if inside.any():
            cut = int(img_start[inside][0])  # never cut an image span
        if cut < need:
            _raise_fit(rid, f"its image(s) and first prompt take {need} tokens (whole "
                            f"record {total}), more than max_length={max_length}; "
                            "raise max_length or shorten the prompt")
        n_images = int((img_start < cut).sum())
        out = [x[:cut] for x in out]
    if not for_generation and not (out[1] != IGNORE_INDEX).any():
        _raise_fit(rid, f"no answer token fits in max_length={max_length} (the record "
                        f"takes {total} tokens); raise max_length")
    return TextRender(out[0], out[1], out[2], out[3], n_images)
