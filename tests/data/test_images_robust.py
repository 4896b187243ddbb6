"""Images that cannot kill a run: a bomb, a truncated JPEG, a non-image and an empty file are
each one named bad record, in `attanchor data validate`, in the data module's checks (both
bad-record policies) and inside a DataLoader worker. Real files, no mocks."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from attanchor.data.cli import main as data_main
from attanchor.data.datamodule import VLMDataModule
from attanchor.data.formats import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadRecordError,
    check_image,
    load_image,
    max_image_pixels,
    set_max_image_pixels,
)
from attanchor.data.tiny import build_processor, build_tokenizer

VOCAB = ["user", ":", "assistant", "what", "color", "is", "the", "shape", "?", "red", "blue"]
# id -> image file; the first six are bad (each for another reason), the rest good.
BAD = {"bomb": "bomb.png", "over_limit": "big.png", "truncated": "cut.jpg",
       "not_image": "notes.png", "empty": "empty.jpg", "missing": "nowhere.png"}
N_GOOD = 594  # 6 bad of 600 = 1.0 %


def png_declaring(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header declares ``width x height`` (a decompression bomb: the
    decoder would allocate width*height*3 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def rec(rid: str, image: str) -> dict:
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape?"},
        {"from": "gpt", "value": "red"}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgworld")
    build_processor(build_tokenizer(VOCAB)).save_pretrained(d / "model")
    img = d / "images"
    img.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 30, 90)).save(img / f"good{i}.png")
    (img / "bomb.png").write_bytes(png_declaring(40_000, 40_000))  # 1.6 GP > PIL's own limit
    (img / "big.png").write_bytes(png_declaring(8_000, 8_000))  # 64 MP: over 50 MP only
    noise = bytes((i * 7919 + (i >> 8) * 104729) % 251 for i in range(256 * 256 * 3))
    Image.frombytes("RGB", (256, 256), noise).save(img / "whole.jpg", quality=95)
    data = (img / "whole.jpg").read_bytes()
    (img / "cut.jpg").write_bytes(data[: len(data) // 2])
    (img / "notes.png").write_text("these are notes, not pixels\n")
    (img / "empty.jpg").write_bytes(b"")
    records = [rec(rid, path) for rid, path in BAD.items()]
    records += [rec(f"g{i}", f"good{i % 3}.png") for i in range(N_GOOD)]
    (d / "train.json").write_text(json.dumps(records))
    (d / "val.json").write_text(json.dumps([rec("v0", "good0.png"), rec("v1", "good1.png")]))
    return d


@pytest.fixture(autouse=True)
def default_limit():
    yield
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)  # tests below change the process limit


def test_verify_passes_a_truncated_jpeg_that_decoding_refuses(world):
    cut = world / "images" / "cut.jpg"
    with Image.open(cut) as im:
        im.verify()  # the old check: no error, the file looks fine
    with pytest.raises(BadRecordError, match=r"record t: image .*cut\.jpg is corrupt or "
                                             r"not an image, or is truncated"):
        check_image(cut, "t")
    assert check_image(world / "images" / "whole.jpg", "w") == (256, 256)


def test_pixel_limit_refuses_bombs_from_the_header(world):
    img = world / "images"
    with pytest.raises(BadRecordError, match=r"8000x8000 = 64,000,000 pixels, over the limit "
                                             r"of 50,000,000"):
        check_image(img / "big.png", "b")
    # PIL itself refuses this one in Image.open (over twice its own limit): named the same.
    with pytest.raises(BadRecordError, match=r"record b: image .*bomb\.png is a decompression "
                                             r"bomb \(Image size \(1600000000 pixels\)"):
        load_image(img / "bomb.png", "b")
    # A real (solid) image over a low limit, and the same image under it.
    Image.new("RGB", (200, 100)).save(img / "solid.png")
    with pytest.raises(BadRecordError, match=r"200x100 = 20,000 pixels, over the limit of "
                                             r"10,000"):
        check_image(img / "solid.png", "s", max_pixels=10_000)
    assert check_image(img / "solid.png", "s", max_pixels=20_000) == (200, 100)
    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS == 50_000_000
    with pytest.raises(ValueError, match="max_image_pixels=0"):
        set_max_image_pixels(0)


def test_validate_names_every_bad_image_and_no_good_record(world, capsys, tmp_path):
    rejects = tmp_path / "rejects.jsonl"
    code = data_main(["validate", "--data", str(world / "train.json"),
                      "--image-root", str(world / "images"), "--rejects",
                      str(rejects)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"600 records, {N_GOOD} good, 6 bad" in out
    lines = [line.split("\t") for line in out.splitlines() if "\t" in line]
    assert [rid for rid, _ in lines] == list(BAD)  # every bad one, in file order, no good one
    reasons = dict(lines)
    assert "decompression bomb (Image size (1600000000 pixels)" in reasons["bomb"]
    assert "8000x8000 = 64,000,000 pixels" in reasons["over_limit"]
    assert "corrupt or not an image, or is truncated" in reasons["truncated"]
    assert "corrupt or not an image, or is truncated" in reasons["not_image"]
    assert "corrupt or not an image, or is truncated" in reasons["empty"]
    assert "image not found" in reasons["missing"]
    assert [json.loads(x)["id"] for x in rejects.read_text().splitlines()] == list(BAD)
    # A higher limit lets the 64 MP image through the header check (then its empty pixel
    # stream fails to decode: still a named bad record, never a crash).
    code = data_main(["validate", "--data", str(world / "train.json"),
                      "--image-root", str(world / "images"), "--max-image-pixels", "100000000"])
    out = capsys.readouterr().out
    assert code == 1 and f"{N_GOOD} good, 6 bad" in out
    over = next(r for r in out.splitlines() if r.startswith("over_limit\t"))
    assert "corrupt or not an image, or is truncated" in over


def dm(world, **kw) -> VLMDataModule:
    args = dict(model_path=str(world / "model"), train_file=str(world / "train.json"),
                val_file=str(world / "val.json"), image_root=str(world / "images"),
                batch_size=4, max_length=128, seed=0)
    args.update(kw)
    return VLMDataModule(**args)


def test_training_skip_counts_bad_images_against_max_skip_fraction(world, tmp_path):
    m = dm(world, on_bad_record="skip", max_skip_fraction=0.01,
           rejects_file=str(tmp_path / "rejects.jsonl"))
    m.setup("fit")
    assert len(m.datasets["train"]) == N_GOOD  # no good record lost
    assert [r["id"] for r in m.rejects["train"]] == list(BAD)
    rows = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(BAD)
    # 6 / 600 = 1.0 % > 0.9 %: the run refuses to start, naming the count and the first one.
    with pytest.raises(ValueError, match=r"train: 6 of 600 records .* are bad \(1\.0% > "
                                         r"max_skip_fraction=0\.009\).*record bomb"):
        dm(world, on_bad_record="skip", max_skip_fraction=0.009,
           rejects_file=str(tmp_path / "r2.jsonl")).setup("fit")


def test_training_error_policy_names_the_bomb(world):
    with pytest.raises(BadRecordError, match=r"record bomb: image .*bomb\.png is a "
                                             r"decompression bomb .*\[train file .*train\.json"):
        dm(world, on_bad_record="error").setup("fit")


def test_data_max_image_pixels_refuses_a_solid_image_in_training(world, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (120, 100), (1, 2, 3)).save(img / "solid.png")  # 12,000 pixels
    Image.new("RGB", (64, 64), (1, 2, 3)).save(img / "small.png")  # 4,096 pixels
    data = tmp_path / "d.json"
    data.write_text(json.dumps([rec("solid", "solid.png"), rec("small", "small.png")]))
    m = dm(world, train_file=str(data), val_file=None, image_root=str(img),
           on_bad_record="skip", max_skip_fraction=0.5, max_image_pixels=10_000,
           rejects_file=str(tmp_path / "rej.jsonl"))
    m.setup("fit")
    assert len(m.datasets["train"]) == 1
    assert [r["id"] for r in m.rejects["train"]] == ["solid"]
    assert "120x100 = 12,000 pixels, over the limit of 10,000" in m.rejects["train"][0]["reason"]
    with pytest.raises(ValueError, match="max_image_pixels=-1"):
        dm(world, max_image_pixels=-1)


def test_a_failure_inside_a_worker_names_the_record_and_path(world, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (50 * i, 9, 9)).save(img / f"{i}.png")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([rec(f"w{i}", f"{i}.png") for i in range(4)]))
    m = dm(world, train_file=str(data), val_file=None, image_root=str(img), num_workers=1,
           batch_size=1)
    m.setup("fit")
    (img / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken after the check")  # file changed
    with pytest.raises(RuntimeError) as info:  # the worker's BadRecordError, re-raised
        for _ in m.train_dataloader():
            pass
    msg = str(info.value)
    assert "DataLoader worker" in msg
    assert "BadRecordError: record w2: failed while loading" in msg
    assert "images ['2.png'] under " + str(img) in msg
    assert str(img / "2.png") in msg and "corrupt or not an image, or is truncated" in msg


def test_renderer_in_process_raises_a_named_bad_record(world, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (64, 64)).save(img / "a.png")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([rec("only", "a.png")]))
    m = dm(world, train_file=str(data), val_file=None, image_root=str(img))
    m.setup("fit")
    Path(img / "a.png").unlink()
    with pytest.raises(BadRecordError, match=r"record only: failed while loading \(dataset "
                                             r"index 0, images \['a\.png'\].*image not found"):
        m.datasets["train"][0]
