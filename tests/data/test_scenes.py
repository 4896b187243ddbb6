"""The scenes world: pixels where the objects are, answers that follow from the objects,
POPE's three negative settings, determinism, vocabulary, and the `data prepare scenes` CLI."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from attanchor.data.cli import main as data_cli
from attanchor.data.scenes import (
    COLORS,
    COUNT_WORDS,
    KINDS,
    Obj,
    draw_scene,
    pope_questions,
    prepare_scenes,
    sample_scene,
    scene_questions,
    scenes_vocab,
)
from attanchor.data.tiny import split_words

BACKGROUND = (245, 245, 240)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    counts = prepare_scenes(out, n_train=60, n_val=10, n_test=20, progress=False)
    return out, counts


def test_draw_scene_puts_each_object_in_its_cell():
    # 64 px, 3x3 grid: cell 21.33 px; cell (0, 0) centre (10.7, 10.7), large half-size 9.0 px.
    img = draw_scene([Obj("red", "square", "large", 0, 0),
                      Obj("blue", "circle", "small", 2, 1)], 64)
    assert img.size == (64, 64)
    assert img.getpixel((10, 10)) == COLORS["red"]
    assert img.getpixel((2, 2)) == COLORS["red"]       # a large square reaches its corner
    assert img.getpixel((32, 53)) == COLORS["blue"]    # centre of cell (row 2, col 1)
    assert img.getpixel((24, 53)) == BACKGROUND        # a small circle (r 5.1 px) stops before
    assert img.getpixel((53, 10)) == BACKGROUND        # an empty cell


def answer_from_objects(question: str, objects: list[Obj]) -> str:
    """An independent reading of each question kind against the scene."""
    q = question.rstrip("?")
    if m := re.fullmatch(r"is there a (\w+) (\w+)( in the image)?", q):
        return "yes" if any(o.kind == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"what color is the (\w+)", q):
        (o,) = [o for o in objects if o.shape == m[1]]  # exactly one, or the question is wrong
        return o.color
    if m := re.fullmatch(r"what shape is the (\w+) object", q):
        (o,) = [o for o in objects if o.color == m[1]]
        return o.shape
    if m := re.fullmatch(r"what size is the (\w+) (\w+)", q):
        (o,) = [o for o in objects if o.kind == (m[1], m[2])]
        return o.size
    if m := re.fullmatch(r"is the (\w+) (left of|above) the (\w+)", q):
        (a,) = [o for o in objects if o.shape == m[1]]
        (b,) = [o for o in objects if o.shape == m[3]]
        return "yes" if (a.col < b.col if m[2] == "left of" else a.row < b.row) else "no"
    if m := re.fullmatch(r"how many (\w+)s are there", q):
        return COUNT_WORDS[sum(o.shape == m[1] for o in objects)]
    raise AssertionError(f"unknown question {question!r}")


def test_every_answer_follows_from_the_scene_and_every_kind_is_asked():
    kinds = Counter()
    for i in range(300):
        objects = sample_scene(0, "train", i)
        assert 2 <= len(objects) <= 4
        assert len({(o.row, o.col) for o in objects}) == len(objects)  # distinct cells
        for kind, question, answer in scene_questions(objects, random.Random(i)):
            assert answer == answer_from_objects(question, objects), (i, question)
            kinds[kind] += 1
    assert kinds["exist"] == 600  # one yes and one no per scene
    assert set(kinds) == {"exist", "color", "shape", "size", "relation", "count"}
    assert kinds["relation"] > 100


def test_pope_settings_pair_each_present_object_with_an_absent_one():
    frequency = Counter({k: 100 - n for n, k in enumerate(KINDS)})  # KINDS[0] most popular
    cooccur = {k: Counter() for k in KINDS}
    cooccur[("red", "circle")][("gray", "diamond")] = 50  # gray diamond follows red circle
    scene = [Obj("red", "circle", "small", 0, 0), Obj("blue", "square", "large", 1, 1)]
    items = pope_questions(scene, random.Random(0), frequency, cooccur, per_image=2)
    by = {s: [(t, lab) for s2, t, lab in items if s2 == s]
          for s in ("random", "popular", "adversarial")}
    for setting, pairs in by.items():
        assert [lab for _, lab in pairs] == ["yes", "no", "yes", "no"], setting
        for text, label in pairs:
            assert answer_from_objects(text, scene) == label
    popular_no = [t for t, lab in by["popular"] if lab == "no"]
    # The two most popular kinds absent from the scene: KINDS[0] is red circle (present).
    assert popular_no == [f"is there a {c} {s} in the image?" for c, s in KINDS[1:3]]
    assert "is there a gray diamond in the image?" in [t for t, _ in by["adversarial"]]


def test_prepare_writes_records_images_and_pope(world):
    out, counts = world
    assert counts["train_images"] == 60 and counts["test_images"] == 20
    assert len(list((out / "images" / "test").glob("*.png"))) == 20
    train = json.loads((out / "train.json").read_text())
    assert len(train) == counts["train_questions"]
    assert len({r["id"] for r in train}) == len(train)
    assert train[0]["conversations"][0]["value"].startswith("<image>\n")
    pope = [json.loads(line) for line in (out / "pope.jsonl").read_text().splitlines()]
    # Per image and setting: up to 2 present kinds, each with an absent one.
    asked = [min(2, len({o.kind for o in sample_scene(0, "test", i)})) for i in range(20)]
    assert len(pope) == counts["pope_questions"] == 3 * 2 * sum(asked)
    n = 2 * sum(asked)
    assert Counter(p["category"] for p in pope) == {"random": n, "popular": n, "adversarial": n}
    assert Counter(p["label"] for p in pope) == {"yes": 3 * n // 2, "no": 3 * n // 2}
    vqa = json.loads((out / "vqa_test.json").read_text())
    assert all(r["conversations"][1]["value"] not in ("yes", "no") for r in vqa)


def test_same_arguments_give_identical_files_and_larger_worlds_extend(world, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    prepare_scenes(again, n_train=60, n_val=10, n_test=20, progress=False)
    for name in ("train.json", "test.json", "pope.jsonl", "images/train/7.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    assert sample_scene(0, "train", 7) == sample_scene(0, "train", 7)
    assert sample_scene(1, "train", 7) != sample_scene(0, "train", 7)
    # A second call is a no-op; other arguments in the same directory are refused.
    assert prepare_scenes(out, n_train=60, n_val=10, n_test=20, progress=False)["train_images"] \
        == 60
    with pytest.raises(ValueError, match="holds a scenes world made with"):
        prepare_scenes(out, n_train=61, n_val=10, n_test=20, progress=False)


@pytest.mark.parametrize("kwargs, match", [({"n_test": 0}, "n_test=0"),
                                           ({"image_size": 16}, "image_size=16")])
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prepare_scenes(tmp_path, **{"n_train": 2, "n_val": 1, "n_test": 1, **kwargs})


def test_vocab_covers_every_word_the_world_writes(world):
    out, _ = world
    vocab = set(scenes_vocab())
    for name in ("train.json", "val.json", "test.json"):
        for r in json.loads((out / name).read_text()):
            for turn in r["conversations"]:
                words = split_words(turn["value"].replace("<image>", ""))
                assert set(words) <= vocab, (r["id"], set(words) - vocab)
    for line in (out / "pope.jsonl").read_text().splitlines():
        assert set(split_words(json.loads(line)["text"])) <= vocab


def test_cli_prepares_the_world_and_a_model_for_its_words(tmp_path, capsys):
    code = data_cli(["prepare", "scenes", "--out", str(tmp_path / "w"), "--n-train", "4",
                     "--n-val", "1", "--n-test", "2", "--vocab-model", str(tmp_path / "m")])
    assert code == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[:printed.index("}") + 1])["train_images"] == 4
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(tmp_path / "m").tokenizer
    ids = tok("how many triangles are there?", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == 6


def _kind_of(question: str) -> str:
    """The question kind, read back from the question's wording (scene_questions' forms)."""
    for prefix, kind in (("is there a", "exist"), ("what color", "color"),
                         ("what shape", "shape"), ("what size", "size"), ("how many", "count")):
        if question.startswith(prefix):
            return kind
    assert re.fullmatch(r"is the \w+ (left of|above) the \w+\?", question), question
    return "relation"


def test_stages_split_the_questions_by_kind(tmp_path):
    stages = {"pretrain": ("exist", "color", "shape", "size"), "adapt": ("relation", "count")}
    counts = prepare_scenes(tmp_path, n_train=30, n_val=5, n_test=8, stages=stages,
                            progress=False)
    for split in ("train", "val", "test"):
        full = json.loads((tmp_path / f"{split}.json").read_text())
        for name, kinds in stages.items():
            staged = json.loads((tmp_path / name / f"{split}.json").read_text())
            # Exactly the full split's records of the stage's kinds, in order, same images.
            assert staged == [r for r in full
                              if _kind_of(r["conversations"][0]["value"][8:]) in kinds]
            assert counts[f"{name}_{split}_questions"] == len(staged)
        # The two stages share no question and together hold every one.
        assert counts[f"pretrain_{split}_questions"] + counts[f"adapt_{split}_questions"] \
            == len(full)
    # 30 train scenes: one count question each, two existence questions each.
    adapt = json.loads((tmp_path / "adapt" / "train.json").read_text())
    assert sum(r["conversations"][0]["value"].startswith("<image>\nhow many") for r in adapt) \
        == 30
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["args"]["stages"] == {k: list(v) for k, v in stages.items()}


@pytest.mark.parametrize("stages, match", [({"adapt": ("relations",)}, "unknown: \\['relations"),
                                           ({"images": ("count",)}, "plain folder name"),
                                           ({"adapt": ()}, "non-empty")])
def test_bad_stages_are_named(tmp_path, stages, match):
    with pytest.raises(ValueError, match=match):
        prepare_scenes(tmp_path, n_train=2, n_val=1, n_test=1, stages=stages, progress=False)
