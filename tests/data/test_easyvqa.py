"""easy-vqa -> LLaVA JSON + images + POPE, on a small subset."""

from __future__ import annotations

import json

import easy_vqa
import pytest

from attanchor.data.easyvqa import POPE_CATEGORIES, pope_category, prepare_easy_vqa

KW = {"max_train_images": 20, "max_test_images": 10, "val_fraction": 0.25, "progress": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("easyvqa")
    return out, prepare_easy_vqa(out, seed=0, **KW)


def load(path):
    return json.loads(path.read_text())


def images_of(records):
    return {r["image"] for r in records}


def test_counts_match_the_package(world):
    out, counts = world
    train_q = easy_vqa.get_train_questions()
    test_q = easy_vqa.get_test_questions()
    val_ids = set(load(out / "meta.json")["val_image_ids"])
    assert len(val_ids) == 5 and val_ids <= set(range(20))  # the first 20 image ids are 0..19
    n_val_q = sum(1 for i in train_q[2] if i in val_ids)
    n_train_q = sum(1 for i in train_q[2] if i < 20 and i not in val_ids)
    test_answers = [a for a, i in zip(test_q[1], test_q[2], strict=True) if i < 10]
    n_yes_no = sum(a in ("yes", "no") for a in test_answers)
    assert counts == {
        "train_images": 15, "val_images": 5, "test_images": 10,
        "train_questions": n_train_q,
        "val_questions": n_val_q,
        "test_questions": len(test_answers),
        "vqa_test_questions": len(test_answers) - n_yes_no,
        "pope_questions": n_yes_no,
        "answers": 13,
    }
    assert 0 < counts["val_questions"] < counts["train_questions"]
    assert len(load(out / "train.json")) == counts["train_questions"]
    assert len(load(out / "val.json")) == counts["val_questions"]
    assert len(load(out / "test.json")) == counts["test_questions"]
    assert len(load(out / "vqa_test.json")) == counts["vqa_test_questions"]
    meta = load(out / "meta.json")
    assert meta["counts"] == counts
    assert meta["answers"] == easy_vqa.get_answers()
    assert sum(meta["answer_counts"]["test"].values()) == counts["test_questions"]


def test_records_are_llava_format_and_point_at_copied_images(world):
    out, _ = world
    paths = easy_vqa.get_train_image_paths()
    train = load(out / "train.json")
    record = train[0]
    assert set(record) == {"id", "image", "conversations"}
    human, gpt = record["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert gpt["from"] == "gpt" and gpt["value"] in easy_vqa.get_answers()
    # the id names the question's index in the package's own list
    index = int(record["id"].removeprefix("train-"))
    texts, answers, image_ids = easy_vqa.get_train_questions()
    assert human["value"] == "<image>\n" + texts[index] and gpt["value"] == answers[index]
    assert record["image"] == f"train/{image_ids[index]}.png"
    for image in images_of(train) | images_of(load(out / "val.json")):
        image_id = int(image.removeprefix("train/").removesuffix(".png"))
        assert (out / "images" / image).read_bytes() == open(paths[image_id], "rb").read()
    assert len(list((out / "images" / "train").glob("*.png"))) == 20
    assert len(list((out / "images" / "test").glob("*.png"))) == 10


def test_val_is_carved_by_image(world):
    out, _ = world
    train, val = load(out / "train.json"), load(out / "val.json")
    assert images_of(train).isdisjoint(images_of(val))
    assert len(images_of(train)) == 15 and len(images_of(val)) == 5
    assert images_of(train) | images_of(val) == {f"train/{i}.png" for i in range(20)}
    ids = [r["id"] for r in train + val]
    assert len(ids) == len(set(ids))


def test_pope_file_and_open_questions(world):
    out, counts = world
    lines = (out / "pope.jsonl").read_text().splitlines()
    pope = [json.loads(line) for line in lines]
    assert len(pope) == counts["pope_questions"] > 0
    test = {r["id"]: r for r in load(out / "test.json")}
    for row in pope:
        assert set(row) == {"question_id", "image", "text", "label", "category"}
        assert row["label"] in ("yes", "no")
        assert row["category"] in POPE_CATEGORIES
        record = test[f"test-{row['question_id']}"]  # same question in test.json
        assert record["image"] == row["image"]
        assert record["conversations"][0]["value"] == "<image>\n" + row["text"]
        assert record["conversations"][1]["value"] == row["label"]
    assert {row["label"] for row in pope} == {"yes", "no"}
    vqa = load(out / "vqa_test.json")
    assert all(r["conversations"][1]["value"] not in ("yes", "no") for r in vqa)
    assert {r["id"] for r in vqa} | {f"test-{p['question_id']}" for p in pope} == set(test)


def test_pope_category_hand_checked():
    colors = {"red", "teal"}
    assert pope_category("is there a red shape in the image?", colors) == "color"
    assert pope_category("does the image contain a triangle?", colors) == "shape"
    assert pope_category("is there not a teal shape?", colors) == "color_negated"
    assert pope_category("is no circle present?", colors) == "shape_negated"
    assert pope_category("does the image not contain a rectangle?", colors) == "shape_negated"
    with pytest.raises(ValueError, match="neither"):
        pope_category("is it sunny?", colors)


def test_deterministic_with_seed(world, tmp_path):
    out, _ = world
    again = prepare_easy_vqa(tmp_path / "same", seed=0, **KW)
    assert again == world[1]
    for name in ("train.json", "val.json", "test.json", "vqa_test.json", "pope.jsonl"):
        assert (tmp_path / "same" / name).read_bytes() == (out / name).read_bytes()
    prepare_easy_vqa(tmp_path / "other", seed=1, **KW)
    assert images_of(load(tmp_path / "other" / "val.json")) != images_of(load(out / "val.json"))


def test_idempotent_and_refuses_other_args(tmp_path):
    out = tmp_path / "w"
    kw = {**KW, "max_train_images": 4, "max_test_images": 2}
    first = prepare_easy_vqa(out, **kw)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert prepare_easy_vqa(out, **kw) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    with pytest.raises(ValueError, match="overwrite=True"):
        prepare_easy_vqa(out, **{**kw, "max_train_images": 3})
    counts = prepare_easy_vqa(out, **{**kw, "max_train_images": 3}, overwrite=True)
    assert counts["train_images"] + counts["val_images"] == 3
    assert len(list((out / "images" / "train").glob("*.png"))) == 3
    # a deleted output or a stray image makes the next call rebuild the exact folder
    (out / "pope.jsonl").unlink()
    (out / "images" / "train" / "999.png").write_bytes(b"stray")
    assert prepare_easy_vqa(out, **{**kw, "max_train_images": 3}) == counts
    assert (out / "pope.jsonl").is_file()
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == ["0.png", "1.png", "2.png"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_easy_vqa(tmp_path, val_fraction=1.0, progress=False)
    with pytest.raises(ValueError, match="max_train_images"):
        prepare_easy_vqa(tmp_path, max_train_images=0, progress=False)
    with pytest.raises(ValueError, match="no train image"):
        prepare_easy_vqa(tmp_path, max_train_images=1, val_fraction=0.9, progress=False)
