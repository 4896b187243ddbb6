"""A built-in world where looking matters: procedural scenes of several objects, with questions.

`prepare_scenes(out_dir)` draws each scene from a seed and writes, like `prepare_easy_vqa`:

    out_dir/images/<split>/<i>.png          64x64 by default; 2-4 objects in a 3x3 grid
    out_dir/train.json, val.json, test.json LLaVA records, one per question, e.g.
        {"id": "scenes-test-7-2", "image": "test/7.png",
         "conversations": [{"from": "human", "value": "<image>\\nwhat color is the triangle?"},
                           {"from": "gpt", "value": "blue"}]}
    out_dir/vqa_test.json                   the open test questions (colour, shape, size, count)
    out_dir/pope.jsonl                      POPE over the test scenes, its three settings:
        {"question_id": 12, "image": "test/7.png", "text": "is there a red circle in the
         image?", "label": "no", "category": "adversarial"}
    out_dir/meta.json                       arguments, counts, object frequencies (written last)

An object is (colour, shape, size) at a grid cell. Question kinds, each asked only where its
answer is unambiguous:

    exist     "is there a red circle?"                  yes / no
    color     "what color is the triangle?"             the triangle is the only triangle
    shape     "what shape is the blue object?"          the only blue object
    size      "what size is the green square?"          small / large
    relation  "is the circle left of the square?"       both unique, in different columns
              "is the circle above the square?"         (rows for "above")
    count     "how many circles are there?"             one .. four

The world has POPE's structure on purpose: object kinds ("red circle") are drawn with
Zipf-like popularity, and each kind has a fixed partner kind that joins it in half the scenes.
So POPE's negatives differ by setting, as in the paper's benchmark: ``random`` asks about an
absent kind drawn uniformly, ``popular`` about the most frequent absent kinds (over the train
scenes), ``adversarial`` about the absent kinds that co-occur most with those present.

Deterministic: scene i of a split depends only on (seed, split, i), so a larger world extends a
smaller one, and the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from attanchor.data.easyvqa import _json_lines_array, _record, _write_atomic

FORMAT_VERSION = 1
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (230, 200, 30), "purple": (140, 60, 180), "gray": (110, 110, 110),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
GRID = 3
POPE_SETTINGS = ("random", "popular", "adversarial")
QUESTION_KINDS = ("exist", "color", "shape", "size", "relation", "count")
KINDS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
QUESTIONS = ("is there a {c} {s}?", "what color is the {s}?", "what shape is the {c} object?",
             "what size is the {c} {s}?", "is the {s} left of the {t}?",
             "is the {s} above the {t}?", "how many {s}s are there?",
             "is there a {c} {s} in the image?")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def kind(self) -> tuple[str, str]:
        return (self.color, self.shape)


def _world_structure(seed: int) -> tuple[list[float], dict[tuple[str, str], tuple[str, str]]]:
    """Popularity weights per kind (Zipf over a seeded order) and each kind's partner."""
    rng = random.Random(f"scenes-structure-{seed}")
    order = list(KINDS)
    rng.shuffle(order)
    rank = {k: r for r, k in enumerate(order)}
    weights = [1.0 / (1 + rank[k]) ** 0.8 for k in KINDS]
    partners = list(KINDS)
    rng.shuffle(partners)
    partner = {k: p for k, p in zip(KINDS, partners, strict=True) if p != k}
    return weights, partner


def sample_scene(seed: int, split: str, index: int, *, min_objects: int = 2,
                 max_objects: int = 4) -> list[Obj]:
    """Scene ``index`` of ``split``: distinct cells, kinds by popularity, partners join."""
    weights, partner = _world_structure(seed)
    rng = random.Random(f"scenes-{seed}-{split}-{index}")
    n = rng.randint(min_objects, max_objects)
    kinds = [rng.choices(KINDS, weights)[0]]
    if kinds[0] in partner and rng.random() < 0.5:
        kinds.append(partner[kinds[0]])
    while len(kinds) < n:
        kinds.append(rng.choices(KINDS, weights)[0])
    cells = rng.sample(range(GRID * GRID), len(kinds))
    return [Obj(c, s, rng.choice(SIZES), cell // GRID, cell % GRID)
            for (c, s), cell in zip(kinds, cells, strict=True)]


def draw_scene(objects: list[Obj], image_size: int = 64) -> Image.Image:
    """The scene as an RGB image: each object centred in its grid cell."""
    img = Image.new("RGB", (image_size, image_size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    cell = image_size / GRID
    for o in objects:
        cx, cy = (o.col + 0.5) * cell, (o.row + 0.5) * cell
        r = cell * (0.42 if o.size == "large" else 0.24)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def scene_questions(objects: list[Obj], rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for one scene; each only where the answer is unambiguous."""
    out: list[tuple[str, str, str]] = []
    present = {o.kind for o in objects}
    shapes, colors = Counter(o.shape for o in objects), Counter(o.color for o in objects)
    yes = rng.choice(sorted(present))
    no = rng.choice(sorted(set(KINDS) - present))
    out += [("exist", f"is there a {yes[0]} {yes[1]}?", "yes"),
            ("exist", f"is there a {no[0]} {no[1]}?", "no")]
    unique_shapes = [o for o in objects if shapes[o.shape] == 1]
    if unique_shapes:
        o = rng.choice(unique_shapes)
        out.append(("color", f"what color is the {o.shape}?", o.color))
    unique_colors = [o for o in objects if colors[o.color] == 1]
    if unique_colors:
        o = rng.choice(unique_colors)
        out.append(("shape", f"what shape is the {o.color} object?", o.shape))
    unique_kinds = [o for o in objects if sum(p.kind == o.kind for p in objects) == 1]
    if unique_kinds:
        o = rng.choice(unique_kinds)
        out.append(("size", f"what size is the {o.color} {o.shape}?", o.size))
    pairs = [(a, b) for a, b in combinations(unique_shapes, 2)]
    rng.shuffle(pairs)
    for a, b in pairs:
        if rng.random() < 0.5:
            a, b = b, a
        if a.col != b.col:
            out.append(("relation", f"is the {a.shape} left of the {b.shape}?",
                        "yes" if a.col < b.col else "no"))
            break
        if a.row != b.row:
            out.append(("relation", f"is the {a.shape} above the {b.shape}?",
                        "yes" if a.row < b.row else "no"))
            break
    s = rng.choice(sorted(shapes))
    out.append(("count", f"how many {s}s are there?", COUNT_WORDS[shapes[s]]))
    return out


def pope_questions(objects: list[Obj], rng: random.Random, frequency: Counter,
                   cooccur: dict[tuple[str, str], Counter], per_image: int = 2
                   ) -> list[tuple[str, str, str]]:
    """(setting, question, label) POPE items: ``per_image`` present kinds, each paired with
    an absent kind chosen by the setting (random / popular / adversarial)."""
    present = sorted({o.kind for o in objects})
    absent = sorted(set(KINDS) - set(present))
    asked = rng.sample(present, min(per_image, len(present)))
    text = "is there a {} {} in the image?"
    out = []
    for setting in POPE_SETTINGS:
        if setting == "random":
            negatives = rng.sample(absent, len(asked))
        elif setting == "popular":
            negatives = sorted(absent, key=lambda k: (-frequency[k], k))[:len(asked)]
        else:
            score = Counter()
            for k in present:
                score.update({a: cooccur[k][a] for a in absent})
            negatives = sorted(absent, key=lambda k: (-score[k], -frequency[k], k))[:len(asked)]
        for pos, neg in zip(asked, negatives, strict=True):
            out += [(setting, text.format(*pos), "yes"), (setting, text.format(*neg), "no")]
    return out


def scenes_vocab() -> list[str]:
    """Every word the scenes world writes (questions, answers) plus the chat template's."""
    from attanchor.data.tiny import TEMPLATE_WORDS, split_words

    words = set(TEMPLATE_WORDS)
    for q in QUESTIONS:
        words.update(split_words(q.replace("{c}", "").replace("{s}s", "").replace(
            "{s}", "").replace("{t}", "")))
    for w in (*COLORS, *SHAPES, *(s + "s" for s in SHAPES), *SIZES, *COUNT_WORDS, "yes", "no"):
        words.update(split_words(w))
    return sorted(words)


def prepare_scenes(out_dir: str | Path, *, n_train: int = 3000, n_val: int = 300,
                   n_test: int = 500, image_size: int = 64, seed: int = 0,
                   stages: Mapping[str, Sequence[str]] | None = None,
                   progress: bool = True) -> dict[str, int]:
    """Draw the scenes world into ``out_dir`` (see the module docstring); return its counts.

    ``stages`` ({name: question kinds}) also writes, per stage, ``<name>/train.json``,
    ``<name>/val.json`` and ``<name>/test.json`` holding only the questions of those kinds
    (images stay under ``out_dir/images``), e.g. LLaVA's two stages: {"pretrain": ("exist",
    "color", "shape", "size"), "adapt": ("relation", "count")}. Counts gain
    ``<name>_<split>_questions``.
    A second call with the same arguments finds meta.json and writes nothing.
    Invariants: every question's answer follows from the scene's objects; POPE has, per test
    image and setting, as many "yes" as "no" items; no image is in two splits; a stage's
    files are the full split's records of its kinds, in the same order.
    """
    stages = {str(k): tuple(v) for k, v in (stages or {}).items()}
    for name, wanted in stages.items():
        unknown = sorted(set(wanted) - set(QUESTION_KINDS))
        if unknown or not wanted or not name or "/" in name or name == "images":
            raise ValueError(f"stages[{name!r}] = {list(wanted)}: give a plain folder name and "
                             f"a non-empty list of question kinds among {list(QUESTION_KINDS)}"
                             + (f" (unknown: {unknown})" if unknown else ""))
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 1:
            raise ValueError(f"{name}={n}: every split needs at least one scene")
    if image_size < GRID * 8:
        raise ValueError(f"image_size={image_size}: at least {GRID * 8} px for a {GRID}x{GRID} "
                         "grid of visible objects")
    out = Path(out_dir)
    args = {"format_version": FORMAT_VERSION, "n_train": n_train, "n_val": n_val,
            "n_test": n_test, "image_size": image_size, "seed": seed}
    if stages:  # only when asked, so worlds made without stages keep their meta.json
        args["stages"] = {k: list(v) for k, v in stages.items()}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("args") == args:
            return meta["counts"]
        raise ValueError(f"{out} holds a scenes world made with {meta.get('args')}, not "
                         f"{args}; remove it or choose another out_dir")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    scenes = {split: [sample_scene(seed, split, i) for i in range(n)]
              for split, n in sizes.items()}
    # Per scene, each kind counts once: "how many train scenes show a red circle".
    frequency: Counter = Counter(k for s in scenes["train"] for k in {o.kind for o in s})
    cooccur: dict[tuple[str, str], Counter] = {k: Counter() for k in KINDS}
    for s in scenes["train"]:
        kinds = {o.kind for o in s}
        for a in kinds:
            cooccur[a].update(kinds - {a})

    records: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": [],
                                                "vqa_test": []}
    pope: list[dict[str, Any]] = []
    staged: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (stage, split) -> records
    kinds_count: Counter = Counter()
    for split, items in scenes.items():
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, objects in enumerate(tqdm(items, desc=f"scenes {split}", disable=not progress)):
            draw_scene(objects, image_size).save(folder / f"{i}.png")
            rng = random.Random(f"scenes-questions-{seed}-{split}-{i}")
            for k, (kind, question, answer) in enumerate(scene_questions(objects, rng)):
                rec = _record(split, i, i, question, answer)
                rec["id"] = f"scenes-{split}-{i}-{k}"
                records[split].append(rec)
                for name, wanted in stages.items():
                    if kind in wanted:
                        staged.setdefault((name, split), []).append(rec)
                kinds_count[kind] += split == "train"
                if split == "test" and kind != "exist" and kind != "relation":
                    records["vqa_test"].append(rec)
            if split == "test":
                for setting, text, label in pope_questions(objects, rng, frequency, cooccur):
                    pope.append({"question_id": len(pope), "image": f"test/{i}.png",
                                 "text": text, "label": label, "category": setting})
    for name, recs in records.items():
        _write_atomic(out / f"{name}.json", _json_lines_array(recs))
    _write_atomic(out / "pope.jsonl", "".join(json.dumps(p) + "\n" for p in pope))
    counts = {f"{s}_images": n for s, n in sizes.items()}
    counts.update({f"{s}_questions": len(r) for s, r in records.items()})
    for name in stages:
        (out / name).mkdir(exist_ok=True)
        for split in sizes:
            recs = staged.get((name, split), [])
            _write_atomic(out / name / f"{split}.json", _json_lines_array(recs))
            counts[f"{name}_{split}_questions"] = len(recs)
    counts["pope_questions"] = len(pope)
    meta = {"source": "attanchor.data.scenes", "args": args, "counts": counts,
            "question_kinds_train": dict(sorted(kinds_count.items())),
            "kind_frequency_train": {f"{c} {s}": frequency[(c, s)] for c, s in KINDS},
            "image_root": "images"}
    _write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")  # last: marks completion
    return counts
