"""A validation split carved from a training file, decided record by record by its id.

A record goes to validation when ``val_bucket(id) < fraction``, where ``val_bucket`` maps the
SHA-256 of the id's UTF-8 bytes to [0, 1) (the first 8 bytes, big-endian, over 2**64). So the
split depends on nothing but each record's id and the fraction: not on the seed, the rank, the
world size, a resume or the order of the file; records sharing an id land on the same side
(copies cannot leak from training into validation); and a larger fraction only adds records
to validation (a record held out at 0.05 is held out at 0.1 too).

Records without an id of their own are refused: formats.py names them by their position
(``file:line``), which changes when the file is reordered or edited.

``VLMDataModule(val_fraction=f)`` splits in memory with ``split_mask``; ``attanchor data split``
writes the same split to two files with ``write_split`` (a test checks they agree).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from attanchor.data.formats import BadRecordError, own_record_id, raw_records

_NO_ID_FIX = ("val_fraction splits by a hash of the record id, and a record without one is "
              "known only by its position, which changes when the file is reordered; give "
              "every record a unique 'id' field, or split the file yourself and pass val_file")


def val_bucket(record_id: str) -> float:
    """``record_id`` -> a number in [0, 1), uniform over ids and the same on every machine.

    Example: ``val_bucket("q0")`` is ``int.from_bytes(sha256(b"q0")[:8], "big") / 2**64``.
    """
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_fraction(fraction: float) -> None:
    """Raise unless 0 < fraction < 1."""
    if not isinstance(fraction, int | float) or not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction={fraction!r}: must lie strictly between 0 and 1 (the "
                         "fraction of the training records held out for validation)")


def is_val(record_id: str, fraction: float) -> bool:
    """True when the record with this id belongs to the validation side."""
    return val_bucket(record_id) < fraction


def split_mask(ids: Iterable[tuple[str, bool]], fraction: float, *, source: str
               ) -> list[bool]:
    """``[(id, id_given), ...]`` -> one flag per record (True = validation), in input order.

    Raises ``BadRecordError`` for the first record with ``id_given`` False, and ``ValueError``
    when either side is empty (naming both counts and ``source``, the file split).
    """
    check_fraction(fraction)
    mask = []
    for rid, given in ids:
        if not given:
            raise BadRecordError(rid, f"no 'id' field in {source}: {_NO_ID_FIX}")
        mask.append(is_val(rid, fraction))
    check_sides(len(mask) - sum(mask), sum(mask), fraction, source)
    return mask


def check_sides(n_train: int, n_val: int, fraction: float, source: str) -> None:
    """Raise ``ValueError`` when the split leaves no training or no validation record."""
    if n_train == 0 or n_val == 0:
        empty = "training" if n_train == 0 else "validation"
        fix = "lower val_fraction" if n_train == 0 else \
            "raise val_fraction (or use more records)"
        raise ValueError(f"val_fraction={fraction} splits the {n_train + n_val} records of "
                         f"{source} into {n_train} training and {n_val} validation records: "
                         f"no {empty} record is left; {fix}, or pass a val_file")


def _read_raw(path: Path) -> Iterator[tuple[str, Any, str]]:
    """``formats.raw_records``, with an unreadable record an error: nothing is split then."""
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: a data file must end in .json or .jsonl")
    for where, rec, line in raw_records(path):
        if isinstance(rec, BadRecordError):
            raise BadRecordError(where, f"{rec.reason}, before splitting")
        yield where, rec, line


def write_split(data: str | os.PathLike, fraction: float, out_dir: str | os.PathLike, *,
                overwrite: bool = False) -> dict[str, Any]:
    """Write ``out_dir/train.<ext>`` and ``out_dir/val.<ext>`` (ext: the input's, .json or
    .jsonl) with the records of ``data`` split as ``val_fraction=fraction`` splits them.

    Records are passed through unchanged (JSONL lines verbatim), in file order; bad records
    that still have an id go where their id sends them, so the datamodule skips or rejects
    them on either side exactly as it would in the unsplit file. Each file is written to a
    temporary name and renamed, so a failure leaves no half-written output. Returns the
    counts and paths.
    """
    check_fraction(fraction)
    src = Path(data)
    if not src.is_file():
        raise FileNotFoundError(f"data file not found: {src}")
    out = Path(out_dir)
    ext = src.suffix
    paths = {"train": out / f"train{ext}", "val": out / f"val{ext}"}
    for p in paths.values():
        if p.resolve() == src.resolve():
            raise ValueError(f"{p} is the input file itself; choose another --out")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
    counts = {"train": 0, "val": 0}
    kept: dict[str, list[Any]] = {"train": [], "val": []}  # .json only: written as arrays
    files = {k: t.open("w", encoding="utf-8") for k, t in tmp.items()}
    try:
        for where, rec, line in _read_raw(src):
            rid = own_record_id(rec)
            if not isinstance(rec, dict):
                raise BadRecordError(where, f"malformed record: expected a JSON object, got "
                                            f"{type(rec).__name__}; fix it before splitting")
            if rid is None:
                raise BadRecordError(where, f"no 'id' field in {src}: {_NO_ID_FIX}")
            side = "val" if is_val(rid, fraction) else "train"
            counts[side] += 1
            if ext == ".jsonl":
                files[side].write(line + "\n")
            else:
                kept[side].append(rec)
        check_sides(counts["train"], counts["val"], fraction, str(src))
        for side, f in files.items():
            if ext == ".json":
                json.dump(kept[side], f, ensure_ascii=False)
            f.close()
        for side in paths:
            os.replace(tmp[side], paths[side])
    finally:
        for side, f in files.items():
            f.close()
            tmp[side].unlink(missing_ok=True)
    return {"data": str(src), "val_fraction": fraction, "train": counts["train"],
            "val": counts["val"], "train_file": str(paths["train"]),
            "val_file": str(paths["val"])}
