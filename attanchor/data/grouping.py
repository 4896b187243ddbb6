"""Length-grouped batch order: batches of similar lengths, one modality per batch.

The idea is LLaVA's modality-length grouping (``get_modality_length_grouped_indices``):
shuffle each modality's records, cut the shuffle into *megabatches* of several batches, sort
every megabatch by length (longest first) and cut it into batches, so a batch holds records of
similar length (little padding) while which records meet is still random. Image records and
text-only records never share a batch (except in the leftovers at the very end), because an
image record's length is dominated by its image tokens.

Everything is a pure function of ``(seed, epoch)``: the draws are a counter-based hash
(splitmix64 of seed, epoch, a stream number and the item), not a generator state, so the
order is the same on every rank, process, NumPy version and resume (a resumed run recomputes
the epoch's order and skips the batches it already consumed).

Example (``batch_size=2``, one megabatch of 3 batches, all records with images)::

    lengths     : [5, 1, 4, 2, 3, 6]
    megabatch   : a shuffle of 0..5, sorted by length -> [5, 0, 2, 4, 3, 1]
    batches     : {5, 0} (6, 5), {2, 4} (4, 3), {3, 1} (2, 1), in a shuffled batch order

Padding per batch is then at most the spread inside a batch (1 token here) instead of the
spread of the whole data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from attanchor.data.formats import IMAGE_PLACEHOLDER, Conversation

# Batches per megabatch, as HF's LengthGroupedSampler (LLaVA's modality grouping uses the
# world size, which groups little on few devices). Larger: less padding (log-normal lengths,
# batch 16: 70 % padding shuffled, 48 % at 4, 26 % at 16, 13 % at 50, 5 % at 200), but who
# meets whom is drawn from a smaller set of neighbours in length.
MEGABATCH_BATCHES = 50
# Tokens per whitespace-separated word of English text for a LLaMA-style BPE (about 1.3), and
# the template's tokens per turn ("USER: ", "ASSISTANT: ", the end of turn): an estimate only.
TOKENS_PER_WORD = 1.3
TOKENS_PER_TURN = 4

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): [0, 2**64) -> same."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_keys(seed: int, epoch: int, stream: int, n: int) -> np.ndarray:
    """n uint64 draws: h_i = mix(mix(mix(mix(seed) ^ epoch) ^ stream) ^ i), ``mix`` splitmix64.

    Pure integer arithmetic: the same values on every machine and library version.
    """
    h = _splitmix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    for v in (epoch, stream):
        h = _splitmix64(h ^ np.uint64(int(v) & 0xFFFFFFFFFFFFFFFF))
    return _splitmix64(h ^ np.arange(n, dtype=np.uint64))


def _shuffle(items: np.ndarray, seed: int, epoch: int, stream: int) -> np.ndarray:
    """``items`` in the order of their hash keys (a permutation drawn from the arguments)."""
    return items[np.argsort(hash_keys(seed, epoch, stream, len(items)), kind="stable")]


def length_grouped_indices(lengths: Sequence[int], multimodal: Sequence[bool],
                           batch_size: int, seed: int, epoch: int, *,
                           megabatch_batches: int = MEGABATCH_BATCHES) -> list[int]:
    """A permutation of ``range(len(lengths))`` whose consecutive blocks of ``batch_size``
    hold records of one modality and similar length (module doc).

    Invariants: a pure function of its arguments (``(seed, epoch)`` pick the order, nothing
    else); every full block before the tail is one modality and sorted by length, longest
    first; the tail holds each modality's last partial batch (image records first), so at most
    the last two blocks mix modalities. Multi-device: pass the batch summed over the ranks
    that take consecutive records (per-device batch x world size for a strided split), so
    each rank's share of a block is still one modality and similar lengths.
    """
    n = len(lengths)
    if len(multimodal) != n:
        raise ValueError(f"length_grouped_indices: {n} lengths but {len(multimodal)} "
                         "modality flags; give one of each per record")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"length_grouped_indices: batch_size={batch_size!r} must be an int >= 1")
    if megabatch_batches < 1:
        raise ValueError(f"length_grouped_indices: megabatch_batches={megabatch_batches} "
                         "must be >= 1")
    lens = np.asarray(lengths, dtype=np.int64)
    if n and lens.min() < 0:
        bad = int(np.argmin(lens))
        raise ValueError(f"length_grouped_indices: record {bad} has length {lens[bad]}; "
                         "lengths count tokens and are >= 0")
    mm = np.asarray(multimodal, dtype=bool)
    mega = batch_size * megabatch_batches
    full: list[np.ndarray] = []
    tail: list[np.ndarray] = []
    for stream, group in ((0, np.flatnonzero(mm)), (1, np.flatnonzero(~mm))):
        order = _shuffle(group, seed, epoch, stream)
        for start in range(0, len(order), mega):
            chunk = order[start:start + mega]
            # Longest first; equal lengths keep their shuffled order (stable sort).
            chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
            for b in range(0, len(chunk), batch_size):
                block = chunk[b:b + batch_size]
                (full if len(block) == batch_size else tail).append(block)
    # Batch order is shuffled too, so the run does not walk each megabatch long to short.
    out = [full[i] for i in _shuffle(np.arange(len(full)), seed, epoch, 2)] + tail
    return [int(i) for block in out for i in block]


def conversation_length(conv: Conversation, image_tokens: int) -> int:
    """An estimate of a record's rendered length without a tokenizer or an image:
    ``ceil(1.3 * words) + 4 * turns + image_tokens * images`` (``TOKENS_PER_WORD``,
    ``TOKENS_PER_TURN``). Good enough to group by; the padding it leaves is measured in
    ``bench/packing.py``."""
    words = sum(len(t.text.replace(IMAGE_PLACEHOLDER, " ").split()) for t in conv.turns)
    return int(np.ceil(TOKENS_PER_WORD * words)) + TOKENS_PER_TURN * len(conv.turns) + \
        image_tokens * len(conv.images)


def nominal_image_tokens(renderer: Any) -> int:
    """Tokens of one image at the processor's nominal input size (its crop size, else its
    shortest edge squared, else 336 x 336), from one blank image (``token_count_for_size``).
    Exact for fixed-size processors (LLaVA-1.5: 576); for any-resolution processors
    (LLaVA-NeXT) the base-size count, an estimate."""
    ip = renderer.processor.image_processor
    crop = getattr(ip, "crop_size", None) or {}
    size = getattr(ip, "size", None) or {}
    if "height" in crop and "width" in crop:
        wh = (int(crop["width"]), int(crop["height"]))
    elif "shortest_edge" in size:
        wh = (int(size["shortest_edge"]),) * 2
    elif "height" in size and "width" in size:
        wh = (int(size["width"]), int(size["height"]))
    else:
        wh = (336, 336)
    return int(renderer.token_count_for_size(wh))


def modality_lengths(source: Any, *, image_tokens: int | None = None
                     ) -> tuple[list[int], list[bool]]:
    """``(lengths, multimodal)`` per record for ``length_grouped_indices``; no image is read.

    ``source``: a ``RenderedDataset`` (anything with ``.index``, its conversations, and
    ``.renderer``): each record's text is tokenized once (``render_text``) with
    ``image_tokens`` per image (default ``nominal_image_tokens(renderer)``), so the length is
    the rendered one, truncation to ``max_length`` included. Or an iterable of
    ``Conversation``s: then ``conversation_length``'s estimate, and ``image_tokens`` is
    required. ``multimodal``: the record has an image.
    """
    renderer = getattr(source, "renderer", None)
    conversations = source.index if renderer is not None else source
    if renderer is not None and image_tokens is None:
        image_tokens = nominal_image_tokens(renderer)
    if image_tokens is None or image_tokens < 0:
        raise ValueError(f"modality_lengths: image_tokens={image_tokens!r}: give the tokens "
                         "per image (>= 0) for conversations without a renderer")
    lengths, multimodal = [], []
    if renderer is not None:
        for i in range(len(conversations)):
            conv = conversations[i]
            tr = renderer.render_text(conv, [image_tokens] * len(conv.images))
            lengths.append(len(tr.input_ids))
            multimodal.append(bool(conv.images))
    else:
        for conv in conversations:
            lengths.append(conversation_length(conv, image_tokens))
            multimodal.append(bool(conv.images))
    return lengths, multimodal


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Pad tokens / all tokens when ``order`` is cut into batches of ``batch_size``, each padded
    to its longest record. Example: lengths [3, 1], one batch -> 2 pads of 6 tokens = 1/3."""
    lens = np.asarray(lengths, dtype=np.int64)[np.asarray(order, dtype=np.int64)]
    total = pad = 0
    for start in range(0, len(lens), batch_size):
        block = lens[start:start + batch_size]
        width = int(block.max())
        total += width * len(block)
        pad += width * len(block) - int(block.sum())
    return pad / total if total else 0.0
