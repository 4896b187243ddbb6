"""`attanchor data validate | prepare | show`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from attanchor.data.cli import main
from attanchor.data.tiny import build_processor, build_tokenizer, easy_vqa_vocab

VOCAB = ["user", ":", "assistant", "what", "color", "is", "the", "shape", "?", "red"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    build_processor(build_tokenizer(VOCAB)).save_pretrained(d / "model")
    (d / "images").mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(d / "images" / "0.png")
    good = {"id": "g1", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape?"},
        {"from": "gpt", "value": "red"}]}
    (d / "good.json").write_text(json.dumps([good, {**good, "id": "g2"}]))
    long = {**good, "id": "long", "conversations": [
        {"from": "human", "value": "<image>\n" + "what " * 100}, {"from": "gpt", "value": "red"}]}
    bad = [good, {**good, "id": "b-missing", "image": "nope.png"},
           {**good, "id": "b-escape", "image": "../x.png"}, long,
           {"id": "b-order", "image": "0.png", "conversations": good["conversations"][::-1]}]
    (d / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    return d


def test_validate_good_file_exits_0(world, capsys):
    rc = main(["validate", "--data", str(world / "good.json"),
               "--image-root", str(world / "images")])
    out = capsys.readouterr().out
    assert rc == 0 and "2 records, 2 good, 0 bad" in out and "add --model" in out


def test_validate_lists_every_bad_record_and_exits_1(world, capsys, tmp_path):
    args = ["validate", "--data", str(world / "bad.jsonl"), "--image-root", str(world / "images")]
    assert main(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "5 records, 2 good, 3 bad" in lines[0]  # "long" is fine until rendering is checked
    assert [x.split("\t")[0] for x in lines[1:]] == ["b-missing", "b-escape", "b-order"]
    assert "image not found" in lines[1] and "contains '..'" in lines[2]
    assert "wrong role order" in lines[3]
    rejects = tmp_path / "r.jsonl"
    assert main(args + ["--model", str(world / "model"), "--max-length", "80",
                        "--rejects", str(rejects)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "5 records, 1 good, 4 bad" in lines[0]
    assert lines[3].startswith("long\tdoes not fit: its image(s) and first prompt take")
    assert [json.loads(x)["id"] for x in rejects.read_text().splitlines()] == [
        "b-missing", "b-escape", "long", "b-order"]


def test_show_prints_masks_token_by_token(world, capsys):
    rc = main(["show", "--data", str(world / "good.json"), "--index", "1",
               "--image-root", str(world / "images"), "--model", str(world / "model")])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("record g2 ")
    rows = {line.split()[2]: line.split()[-2:] for line in out.splitlines()[2:-1]
            if "x64" not in line}
    assert rows["what"] == [".", "C"] and rows["red"] == ["L", "."]
    assert rows["</s>"] == ["L", "."] and rows["assistant"] == [".", "."]
    assert " 3-66      4  <image> x64          image     . ." in out
    assert out.splitlines()[-1] == "77 tokens, 2 labelled (L), 6 candidates (C)"


def test_show_errors(world, capsys):
    base = ["show", "--data", str(world / "bad.jsonl"), "--image-root", str(world / "images"),
            "--model", str(world / "model")]
    assert main(base + ["--index", "9"]) == 1
    assert "has no record 9" in capsys.readouterr().err
    assert main(base + ["--index", "1"]) == 1
    assert "record b-missing: image not found" in capsys.readouterr().err


def test_prepare_then_validate_and_show_easy_vqa(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["prepare", "easy-vqa", "--out", str(out), "--max-train-images", "4",
                 "--max-test-images", "2"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["train_images"] + counts["val_images"] == 4
    model = tmp_path / "model"
    build_processor(build_tokenizer(easy_vqa_vocab())).save_pretrained(model)
    for split in ("train", "val", "test"):
        assert main(["validate", "--data", str(out / f"{split}.json"), "--image-root",
                     str(out / "images"), "--model", str(model)]) == 0
    assert main(["show", "--data", str(out / "train.json"), "--index", "0", "--image-root",
                 str(out / "images"), "--model", str(model)]) == 0
    assert " L " in capsys.readouterr().out
