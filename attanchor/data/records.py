"""Checked records and the dataset that renders them: the two halves of the data path.

``index_records`` reads a data file once, checks every record (format and roles, images
confined to their root, present and fully decoded under the pixel limit, and a text render
that proves the record fits) and returns ``(good, bad, total)``: every bad record named, no
good one lost. The good ones live in a ``RecordIndex`` (one byte buffer plus offsets, so
DataLoader workers share it without copy-on-write growth); ``RenderedDataset`` renders record
``i`` with its images on access, inside the loader's workers. Example::

    good, bad, total = index_records("train.json", format="llava", image_root="imgs",
                                     renderer=renderer)
    # total 1000, len(good) 998, bad = [BadRecordError("r17: image ... is truncated"), ...]
    RenderedDataset(good, renderer)[0]   # -> RenderedSample (ids, labels, candidate mask, pixels)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from attanchor.data.formats import (
    BadRecordError,
    Conversation,
    check_image,
    read_records,
    resolve_image,
    set_max_image_pixels,
)
from attanchor.data.formats import max_image_pixels as max_image_pixels_now
from attanchor.data.render import RenderedSample, Renderer


class RecordIndex:
    """Validated conversations stored as one byte buffer plus offsets: DataLoader workers read
    it without the copy-on-write growth a list of Python objects causes."""

    def __init__(self, conversations: list[Conversation]) -> None:
        blobs = [json.dumps(c.to_dict(), ensure_ascii=False).encode() for c in conversations]
        self.offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([len(b) for b in blobs])
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else \
            np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Conversation:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Conversation.from_dict(json.loads(self.buffer[a:b].tobytes()))

    def subset(self, keep: list[int]) -> RecordIndex:
        """The records at positions ``keep``, in that order (bytes copied, nothing decoded)."""
        out = RecordIndex([])
        starts, ends = self.offsets[keep], self.offsets[np.asarray(keep, dtype=np.int64) + 1]
        out.offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        out.offsets[1:] = np.cumsum(ends - starts)
        if len(keep):
            out.buffer = np.concatenate([self.buffer[a:b] for a, b in zip(starts, ends,
                                                                           strict=True)])
        return out


def index_records(path: str | os.PathLike, *, format: str, image_root: str | os.PathLike,
                  renderer: Renderer | None = None, for_generation: bool = False,
                  stop_at_first: bool = False, progress: bool = True,
                  ) -> tuple[RecordIndex, list[BadRecordError], int]:
    """Read and check every record of ``path``; return ``(good, bad, total)``.

    Checks: format and roles (``read_records``), each image path confined to ``image_root``,
    present and intact (header + PIL verify, once per path), and with a ``renderer`` a text
    render with the processor's image token counts (template mapping, ``max_length``).
    ``stop_at_first`` raises the first bad record instead of collecting them. ``progress``
    shows a bar on rank 0 (checking LLaVA-Instruct-150K takes about half a minute).
    """
    good, bad, total = [], [], 0
    image_sizes: dict[str, tuple[int, int] | BadRecordError] = {}
    records = read_records(path, format, require_answer=not for_generation, errors="yield")
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))  # torchrun / Lightning
    show = progress and int(rank) == 0
    for item in tqdm(records, desc=f"checking {Path(path).name}", unit="rec", disable=not show,
                     leave=False, mininterval=1.0):
        total += 1
        try:
            if isinstance(item, BadRecordError):
                raise item
            sizes = []
            for rel in item.images:
                if rel not in image_sizes:
                    try:
                        image_sizes[rel] = check_image(resolve_image(image_root, rel, item.id),
                                                       item.id)
                    except BadRecordError as e:
                        image_sizes[rel] = e
                got = image_sizes[rel]
                if isinstance(got, BadRecordError):
                    raise BadRecordError(item.id, got.reason)
                sizes.append(got)
            if renderer is not None:
                counts = [renderer.token_count_for_size(s) for s in sizes]
                renderer.render_text(item, counts, for_generation=for_generation)
            good.append(item)
        except BadRecordError as e:
            if stop_at_first:
                raise
            bad.append(e)
    return RecordIndex(good), bad, total


class RenderedDataset(Dataset):
    """Map-style dataset: index i -> ``RenderedSample`` (rendered on access)."""

    def __init__(self, index: RecordIndex, renderer: Renderer,
                 for_generation: bool = False, max_image_pixels: int | None = None) -> None:
        self.index, self.renderer, self.for_generation = index, renderer, for_generation
        # The pixel limit the records were checked with (default: this process's, which
        # VLMDataModule._checked has set); re-applied in each worker, spawned ones included.
        self.max_image_pixels = max_image_pixels or max_image_pixels_now()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> RenderedSample:
        """Render record ``i``. Any failure (an image changed or removed since the records
        were checked, a processor error) is re-raised naming the record id and its image
        paths, so a crash inside a DataLoader worker says which record to fix."""
        conv = self.index[i]
        try:
            if max_image_pixels_now() != self.max_image_pixels:
                set_max_image_pixels(self.max_image_pixels)
            return self.renderer(conv, for_generation=self.for_generation)
        except Exception as e:
            reason = e.reason if isinstance(e, BadRecordError) else f"{type(e).__name__}: {e}"
            raise BadRecordError(conv.id, f"failed while loading (dataset index {i}, images "
                                          f"{conv.images} under {self.renderer.image_root}): "
                                          f"{reason}; the record passed the checks at setup, "
                                          "so a file changed since: fix it and restart (with "
                                          "--ckpt_path last to resume)") from e
