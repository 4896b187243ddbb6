"""The built-in world: easy-vqa (a real VQA data set shipped in a 3 MB PyPI wheel) as LLaVA data.

`prepare_easy_vqa(out_dir)` writes:

    out_dir/images/train/<id>.png, images/test/<id>.png   copies of the package's 64x64 PNGs
    out_dir/train.json, val.json, test.json   LLaVA conversation records, one per question:
        {"id": "train-17", "image": "train/1.png",
         "conversations": [{"from": "human", "value": "<image>\\nwhat color is the shape?"},
                           {"from": "gpt", "value": "blue"}]}
        "image" is relative to out_dir/images; the id's number is the question's index in the
        package's own question list of that split (val ids keep their "train-" prefix).
    out_dir/vqa_test.json   the open (not yes/no) test questions, LLaVA format
    out_dir/pope.jsonl      the yes/no test questions in POPE's format, one JSON object a line:
        {"question_id": 17, "image": "test/1.png", "text": "is there a red shape?",
         "label": "no", "category": "color"}
        question_id = the index in the test list (= the number in test.json's "test-17").
    out_dir/meta.json       arguments, counts, the answers, answer counts per split (written last;
                            its presence with the same arguments makes a second call a no-op)

POPE categories (ours: easy-vqa's yes/no questions are all existence questions, POPE's kind):
    "color"          is there a <colour> shape ...?            ("yes" = the colour is present)
    "shape"          is there a <shape> ...?                   ("yes" = the shape is present)
    "color_negated"  is there not / is no / does not contain a <colour> shape? ("yes" = absent)
    "shape_negated"  the same for shapes.
POPE's "yes" = object present holds only for the non-negated categories; metrics that treat
"yes" as "present" (POPE's F1) should filter on them.

Val is carved from train BY IMAGE: a seeded shuffle of the (limited) train image ids picks
round(val_fraction * n_images) images, and all their questions go to val.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

FORMAT_VERSION = 1
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
POPE_CATEGORIES = ("color", "shape", "color_negated", "shape_negated")
OUTPUT_FILES = ("train.json", "val.json", "test.json", "vqa_test.json", "pope.jsonl")
_NEGATION = re.compile(r"\b(not|no)\b")


def _load_package() -> dict[str, Any]:
    """The easy-vqa package's questions, image paths and answers."""
    try:
        import easy_vqa
    except ImportError as err:  # optional dependency: attanchor[data]
        raise ImportError("easy-vqa is not installed: pip install 'attanchor[data]'") from err
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("easy-vqa")
    except PackageNotFoundError:
        pkg_version = "unknown"
    return {
        "version": pkg_version,
        "train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        "test": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
        "answers": easy_vqa.get_answers(),
    }


def pope_category(question: str, colors: set[str]) -> str:
    """POPE category of an easy-vqa yes/no existence question (see module docstring).

    Example: pope_category("is there not a red shape?", {"red"}) == "color_negated"
    """
    words = re.findall(r"\w+", question.lower())
    if any(w in colors for w in words):
        kind = "color"
    elif any(w in SHAPES for w in words):
        kind = "shape"
    else:
        raise ValueError(f"yes/no question {question!r} names neither a colour nor a shape")
    return f"{kind}_negated" if _NEGATION.search(question.lower()) else kind


def _record(split: str, index: int, image_id: int, question: str, answer: str) -> dict:
    """One single-turn LLaVA record."""
    return {
        "id": f"{split}-{index}",
        "image": f"{split}/{image_id}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_lines_array(records: list[dict]) -> str:
    """A JSON array with one record a line (valid JSON, diff- and grep-friendly)."""
    if not records:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def _select_images(image_paths: dict[int, str], limit: int | None, split: str) -> list[int]:
    """The first `limit` image ids in numeric order (all when None)."""
    ids = sorted(image_paths)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"max_{split}_images={limit} must be >= 1 (or None for all)")
        ids = ids[:limit]
    return ids


def _read_meta(out: Path) -> dict | None:
    """out/meta.json, or None when absent."""
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return None
    return json.loads(meta_path.read_text(encoding="utf-8"))


def _is_complete(out: Path, counts: dict) -> bool:
    """Whether every output file and the expected number of images are in place."""
    if not all((out / name).is_file() for name in OUTPUT_FILES):
        return False
    for split, expected in [("train", counts["train_images"] + counts["val_images"]),
                            ("test", counts["test_images"])]:
        folder = out / "images" / split
        if not folder.is_dir() or sum(1 for _ in folder.glob("*.png")) != expected:
            return False
    return True


def prepare_easy_vqa(
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_train_images: int | None = None,
    max_test_images: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Convert the easy-vqa package into LLaVA JSON + images + POPE under `out_dir`.

    Args:
        val_fraction: share of the (limited) train IMAGES moved to val, in [0, 1).
        seed: seeds the val shuffle; same arguments -> byte-identical files.
        max_train_images / max_test_images: keep only the first N images (numeric id order)
            of each split and their questions; None keeps all (4,000 / 1,000).
        overwrite: when out_dir holds a conversion made with OTHER arguments, replace it
            (its images/train, images/test and JSON files) instead of raising.
        progress: show a tqdm bar while copying images.

    Returns counts: train_images, val_images, test_images, train_questions, val_questions,
    test_questions, vqa_test_questions, pope_questions, answers (number of possible answers).
    Invariants: no image in both train and val; train + val questions = all questions of the
    selected train images; vqa_test + pope = test.
    A second call with the same arguments returns meta.json's counts and writes nothing.

    Example: prepare_easy_vqa("data/easyvqa", max_train_images=20, max_test_images=10)
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    out = Path(out_dir)
    args = {"format_version": FORMAT_VERSION, "val_fraction": val_fraction, "seed": seed,
            "max_train_images": max_train_images, "max_test_images": max_test_images}
    meta = _read_meta(out)
    if meta is not None and meta.get("args") == args and _is_complete(out, meta["counts"]):
        return meta["counts"]
    if meta is not None and meta.get("args") != args:
        if not overwrite:
            raise ValueError(
                f"{out} holds an easy-vqa conversion made with {meta.get('args')}, not {args}; "
                "pass overwrite=True to replace it, or choose another out_dir")
        for split in ("train", "test"):
            shutil.rmtree(out / "images" / split, ignore_errors=True)
        for name in (*OUTPUT_FILES, "meta.json"):
            (out / name).unlink(missing_ok=True)

    pkg = _load_package()
    answers = list(pkg["answers"])
    colors = set(answers) - set(SHAPES) - set(YES_NO)

    # Which images go where.
    (train_q, train_paths), (test_q, test_paths) = pkg["train"], pkg["test"]
    train_ids = _select_images(train_paths, max_train_images, "train")
    test_ids = set(_select_images(test_paths, max_test_images, "test"))
    n_val = round(val_fraction * len(train_ids))
    if val_fraction > 0 and n_val == 0 and len(train_ids) > 1:
        n_val = 1  # a requested val split is never silently empty
    if n_val >= len(train_ids) and n_val > 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no train image out of "
                         f"{len(train_ids)}; lower it or raise max_train_images")
    shuffled = list(train_ids)
    random.Random(seed).shuffle(shuffled)
    val_ids = set(shuffled[:n_val])
    train_set = set(train_ids) - val_ids

    # Records, in the package's question order.
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": [], "vqa_test": []}
    pope: list[dict] = []
    for index, (question, answer, image_id) in enumerate(zip(*train_q, strict=True)):
        if answer not in answers:
            raise ValueError(f"train question {index} has answer {answer!r} outside {answers}")
        if image_id in train_set or image_id in val_ids:
            target = "val" if image_id in val_ids else "train"
            splits[target].append(_record("train", index, image_id, question, answer))
    for index, (question, answer, image_id) in enumerate(zip(*test_q, strict=True)):
        if answer not in answers:
            raise ValueError(f"test question {index} has answer {answer!r} outside {answers}")
        if image_id not in test_ids:
            continue
        record = _record("test", index, image_id, question, answer)
        splits["test"].append(record)
        if answer in YES_NO:
            pope.append({"question_id": index, "image": record["image"], "text": question,
                         "label": answer, "category": pope_category(question, colors)})
        else:
            splits["vqa_test"].append(record)

    # Images: copy exactly the referenced files.
    copies = [(train_paths[i], out / "images" / "train" / f"{i}.png") for i in train_ids]
    copies += [(test_paths[i], out / "images" / "test" / f"{i}.png") for i in sorted(test_ids)]
    wanted = {target for _, target in copies}
    for split in ("train", "test"):
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.png"):  # left by an interrupted run: keep the folder exact
            if stale not in wanted:
                stale.unlink()
    for source, target in tqdm(copies, desc="easy-vqa images", unit="img", disable=not progress):
        shutil.copyfile(source, target)

    for name in ("train", "val", "test", "vqa_test"):
        _write_atomic(out / f"{name}.json", _json_lines_array(splits[name]))
    _write_atomic(out / "pope.jsonl", "".join(json.dumps(p) + "\n" for p in pope))

    def answer_counts(records: list[dict]) -> dict[str, int]:
        counter = Counter(r["conversations"][1]["value"] for r in records)
        return {a: counter.get(a, 0) for a in answers}

    counts = {
        "train_images": len(train_set),
        "val_images": len(val_ids),
        "test_images": len(test_ids),
        "train_questions": len(splits["train"]),
        "val_questions": len(splits["val"]),
        "test_questions": len(splits["test"]),
        "vqa_test_questions": len(splits["vqa_test"]),
        "pope_questions": len(pope),
        "answers": len(answers),
    }
    meta = {
        "source": f"easy-vqa {pkg['version']} (PyPI)",
        "args": args,
        "counts": counts,
        "answers": answers,
        "answer_counts": {name: answer_counts(recs) for name, recs in splits.items()},
        "pope_categories": dict(sorted(Counter(p["category"] for p in pope).items())),
        "val_image_ids": sorted(val_ids),
        "image_root": "images",
    }
    _write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: marks completion
    return counts
