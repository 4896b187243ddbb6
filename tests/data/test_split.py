"""The validation split by record-id hash: golden buckets, invariants, the written split, and
agreement between ``VLMDataModule(val_fraction=...)`` and ``attanchor data split``."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from attanchor.data.cli import main
from attanchor.data.datamodule import VLMDataModule
from attanchor.data.formats import BadRecordError
from attanchor.data.split import split_mask, val_bucket, write_split
from attanchor.data.tiny import build_processor, build_tokenizer

IDS = [f"q{i}" for i in range(20)]
# sha256("q{i}") starts with these bytes, so bucket = 0x<hex>/2**64: q4 0x112f.. = 0.0671,
# q7 0x0bd7.. = 0.0463, q15 0x178a.. = 0.0920, q18 0x0bb3.. = 0.0457, q19 0x16ea.. = 0.0895;
# every other id is above 0.1 (the next lowest is q5 0x26ea.. = 0.1520).
VAL_AT_10 = ["q4", "q7", "q15", "q18", "q19"]
VAL_AT_5 = ["q7", "q18"]


def record(i, rid=None):
    rec = {"image": f"{i % 2}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape?"},
        {"from": "gpt", "value": ["red", "blue"][i % 2]}]}
    if rid is not None:
        rec = {"id": rid, **rec}
    return rec


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    vocab = ["user", ":", "assistant", "what", "color", "is", "the", "shape", "?", "red", "blue"]
    build_processor(build_tokenizer(vocab)).save_pretrained(d / "model")
    for i in range(2):
        Image.new("RGB", (64, 64), (200 * i, 30, 90)).save(d / f"{i}.png")
    recs = [record(i, f"q{i}") for i in range(20)]
    (d / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "all.json").write_text(json.dumps(recs))
    return d


def test_bucket_is_the_sha256_prefix():
    assert val_bucket("q0") == 0x341C0A3E67C31467 / 2**64
    assert round(val_bucket("q0"), 4) == 0.2036
    assert round(val_bucket("q7"), 4) == 0.0463
    assert round(val_bucket("ü"), 4) == 0.3768  # UTF-8 bytes c3 bc


def test_mask_picks_low_buckets_whatever_the_order():
    ids = [(i, True) for i in IDS]
    mask = split_mask(ids, 0.1, source="t")
    assert [i for i, m in zip(IDS, mask, strict=True) if m] == VAL_AT_10
    rev = split_mask(ids[::-1], 0.1, source="t")
    assert [i for i, m in zip(IDS[::-1], rev, strict=True) if m] == VAL_AT_10[::-1]
    # a larger fraction only adds validation records
    small = split_mask(ids, 0.05, source="t")
    assert [i for i, m in zip(IDS, small, strict=True) if m] == VAL_AT_5


def test_mask_errors_name_the_counts_and_the_record():
    ids = [(i, True) for i in IDS]
    with pytest.raises(ValueError, match=r"20 records of t into 20 training and 0 validation"):
        split_mask(ids, 0.04, source="t")  # lowest bucket is q18's 0.0457
    with pytest.raises(ValueError, match=r"into 0 training and 1 validation.*lower val_fraction"):
        split_mask([("q7", True)], 0.5, source="t")
    with pytest.raises(BadRecordError, match=r"record t:3: no 'id' field in t: .*unique 'id'"):
        split_mask([("q1", True), ("t:3", False)], 0.5, source="t")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            split_mask(ids, bad, source="t")


@pytest.mark.parametrize("ext", ["jsonl", "json"])
def test_datamodule_and_written_split_agree(world, tmp_path, ext):
    def dm(**kw):
        return VLMDataModule(model_path=str(world / "model"), image_root=str(world),
                             max_length=128, **kw)

    mem = dm(train_file=str(world / f"all.{ext}"), val_fraction=0.1)
    mem.setup("fit")
    info = write_split(world / f"all.{ext}", 0.1, tmp_path)
    assert (info["train"], info["val"]) == (15, 5)
    disk = dm(train_file=info["train_file"], val_file=info["val_file"])
    disk.setup("fit")
    for split in ("train", "val"):
        a, b = mem.datasets[split].index, disk.datasets[split].index
        assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    val = mem.datasets["val"].index
    assert [val[i].id for i in range(len(val))] == VAL_AT_10
    assert [x["ids"] for x in mem.val_dataloader()] == [VAL_AT_10]


def test_written_jsonl_lines_are_verbatim(world, tmp_path):
    lines = (world / "all.jsonl").read_text().splitlines()
    write_split(world / "all.jsonl", 0.05, tmp_path)
    assert (tmp_path / "val.jsonl").read_text().splitlines() == [lines[7], lines[18]]
    train = (tmp_path / "train.jsonl").read_text().splitlines()
    assert train == [x for i, x in enumerate(lines) if i not in (7, 18)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl", "val.jsonl"]


def test_write_split_failures_leave_nothing(world, tmp_path):
    recs = [record(i, f"q{i}") for i in range(5)] + [record(5)]
    (tmp_path / "noid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    with pytest.raises(BadRecordError, match=r"record noid.jsonl:6: no 'id' field"):
        write_split(tmp_path / "noid.jsonl", 0.5, out)
    assert list(out.iterdir()) == []  # temporary files removed, nothing renamed
    with pytest.raises(ValueError, match=r"into 20 training and 0 validation"):
        write_split(world / "all.json", 0.04, out)
    assert list(out.iterdir()) == []
    write_split(world / "all.json", 0.1, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_split(world / "all.json", 0.1, out)
    info = write_split(world / "all.json", 0.05, out, overwrite=True)
    assert [r["id"] for r in json.loads((out / "val.json").read_text())] == VAL_AT_5
    assert info["train"] == 18
    (tmp_path / "train.json").write_text(json.dumps([record(0, "q0"), record(7, "q7")]))
    with pytest.raises(ValueError, match="is the input file itself"):
        write_split(tmp_path / "train.json", 0.5, tmp_path, overwrite=True)


def test_cli_split_prints_counts(world, tmp_path, capsys):
    rc = main(["split", "--data", str(world / "all.jsonl"), "--val-fraction", "0.1",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0] == (f"{world / 'all.jsonl'}: 20 records -> 15 train ({tmp_path / 'train.jsonl'})"
                      f", 5 val ({tmp_path / 'val.jsonl'})")
    assert out[1].startswith(f"note: image paths stay relative to {world}")
    assert [json.loads(x)["id"] for x in (tmp_path / "val.jsonl").read_text().splitlines()] == \
        VAL_AT_10
    assert main(["split", "--data", str(world / "all.jsonl"), "--val-fraction", "0.01",
                 "--out", str(tmp_path / "x")]) == 1
    assert "into 20 training and 0 validation" in capsys.readouterr().err
