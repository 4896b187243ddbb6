"""The data module: indexing with the bad-record policy, deterministic order, loaders."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from PIL import Image

from attanchor.data.datamodule import VLMDataModule
from attanchor.data.formats import BadRecordError, Conversation, Turn
from attanchor.data.records import RecordIndex, index_records
from attanchor.data.tiny import build_processor, build_tokenizer

VOCAB = ["user", ":", "assistant", "what", "color", "is", "the", "shape", "?", "red", "blue",
         "green", "circle", "size", "big"]
COLORS = ["red", "blue", "green"]


def record(i, image=None, **over):
    rec = {"id": f"q{i}", "image": image or f"{i % 4}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape?" + " ?" * (i % 3)},
        {"from": "gpt", "value": COLORS[i % 3]}]}
    rec.update(over)
    return rec


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    build_processor(build_tokenizer(VOCAB)).save_pretrained(d / "model")
    (d / "images").mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 20, 200 - 40 * i)).save(d / "images" / f"{i}.png")
    (d / "train.json").write_text(json.dumps([record(i) for i in range(20)]))
    (d / "val.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(100, 105)))
    return d


def dm(world, **kw):
    args = dict(model_path=str(world / "model"), train_file=str(world / "train.json"),
                val_file=str(world / "val.jsonl"), image_root=str(world / "images"),
                batch_size=4, max_length=128, seed=0)
    args.update(kw)
    return VLMDataModule(**args)


def epoch_ids(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [i for b in loader for i in b["ids"]]


def test_order_is_a_function_of_seed_and_epoch(world):
    a, b, c = dm(world), dm(world), dm(world, seed=1)
    for m in (a, b, c):
        m.setup("fit")
    la, lb, lc = a.train_dataloader(), b.train_dataloader(), c.train_dataloader()
    e0, e1 = epoch_ids(la, 0), epoch_ids(la, 1)
    assert sorted(e0) == sorted(f"q{i}" for i in range(20))
    assert e0 != e1 and e0 == epoch_ids(lb, 0) and e1 == epoch_ids(lb, 1)
    assert epoch_ids(lc, 0) != e0
    ba, bb = next(iter(la)), next(iter(lb))
    for key in ("input_ids", "attention_mask", "labels", "candidate_mask", "pixel_values"):
        assert torch.equal(ba[key], bb[key])


@pytest.mark.slow
def test_workers_give_the_same_batches(world):
    ref, par = dm(world), dm(world, num_workers=2)
    ref.setup("fit")
    par.setup("fit")
    for x, y in zip(ref.train_dataloader(), par.train_dataloader(), strict=True):
        assert x["ids"] == y["ids"] and torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["pixel_values"], y["pixel_values"])


def test_val_and_predict_loaders(world):
    m = dm(world, test_file=str(world / "val.jsonl"), eval_batch_size=5)
    m.setup(None)
    val = next(iter(m.val_dataloader()))
    assert val["ids"] == [f"q{i}" for i in range(100, 105)]  # file order
    assert val["attention_mask"][:, 0].all()  # right padding
    assert (val["labels"] != -100).any(dim=1).all()
    pred = next(iter(m.predict_dataloader()))
    assert pred["attention_mask"][:, -1].all() and not pred["attention_mask"][:, 0].all()  # left
    assert (pred["labels"] == -100).all()
    tok = m.processor.tokenizer
    for row in pred["input_ids"]:  # every prompt ends with the generation prompt
        assert tok.convert_ids_to_tokens(row[-2:].tolist()) == ["assistant", ":"]
    assert pred["candidate_mask"].any(dim=1).all()


def test_bad_record_error_policy_names_the_record(world, tmp_path):
    recs = [record(0), record(1, image="missing.png"), record(2)]
    (tmp_path / "t.json").write_text(json.dumps(recs))
    m = dm(world, train_file=str(tmp_path / "t.json"))
    with pytest.raises(BadRecordError, match=r"record q1: image not found.*attanchor data validate"):
        m.setup("fit")


def test_skip_policy_writes_every_reject(world, tmp_path):
    recs = [record(i) for i in range(20)]
    recs[3] = record(3, image="bad.png")
    recs[7]["conversations"] = recs[7]["conversations"][:1]  # no answer
    recs[9] = record(9, conversations=[{"from": "human", "value": "<image>\n" + "what " * 200},
                                       {"from": "gpt", "value": "red"}])  # too long
    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.open(world / "images" / f"{i}.png").save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"not an image")
    (tmp_path / "t.json").write_text(json.dumps(recs))
    rejects = tmp_path / "out" / "rejects.jsonl"
    m = dm(world, train_file=str(tmp_path / "t.json"), val_file=None,
           image_root=str(tmp_path / "images"), on_bad_record="skip", max_skip_fraction=0.2,
           rejects_file=str(rejects))
    m.setup("fit")
    rows = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q3", "q7", "q9"]
    assert "corrupt or not an image" in rows[0]["reason"]
    assert "ends with a user turn" in rows[1]["reason"]
    assert "does not fit" in rows[2]["reason"] and rows[2]["split"] == "train"
    assert len(m.datasets["train"]) == 17
    strict = dm(world, train_file=str(tmp_path / "t.json"), val_file=None,
                image_root=str(tmp_path / "images"), on_bad_record="skip",
                max_skip_fraction=0.1, rejects_file=str(rejects))
    with pytest.raises(ValueError, match=r"3 of 20 records .* are bad \(15.0% > "
                                         r"max_skip_fraction=0.1\)"):
        strict.setup("fit")


def test_messages_format_gives_the_same_batches(world, tmp_path):
    """The HF messages form of the train file renders to exactly the same batches."""
    rows = []
    for rec in json.loads((world / "train.json").read_text()):
        q, a = (c["value"] for c in rec["conversations"])
        rows.append({"id": rec["id"], "images": [rec["image"]], "messages": [
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": q.split("\n", 1)[1]}]},
            {"role": "assistant", "content": [{"type": "text", "text": a}]}]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = dm(world, val_file=None)
    b = dm(world, val_file=None, train_file=str(tmp_path / "m.jsonl"), format="messages")
    for m in (a, b):
        m.setup("fit")
    for x, y in zip(a.train_dataloader(), b.train_dataloader(), strict=True):
        assert x["ids"] == y["ids"]
        for key in ("input_ids", "labels", "candidate_mask", "pixel_values"):
            assert torch.equal(x[key], y[key])


def test_image_root_defaults_to_the_data_folder(world, tmp_path):
    Image.open(world / "images" / "0.png").save(tmp_path / "0.png")
    (tmp_path / "t.jsonl").write_text(json.dumps(record(0)) + "\n")
    m = dm(world, train_file=str(tmp_path / "t.jsonl"), val_file=None, image_root=None)
    m.setup("fit")
    assert len(m.datasets["train"]) == 1


def test_init_arguments_are_checked(world):
    for kw, match in [({"format": "csv"}, "format"), ({"template": "x"}, "template"),
                      ({"on_bad_record": "drop"}, "on_bad_record"), ({"scope": "x"}, "scope"),
                      ({"max_skip_fraction": 2.0}, "max_skip_fraction"),
                      ({"global_batch_size": 0}, "global_batch_size"),
                      ({"global_batch_size": 8.0}, "global_batch_size"),
                      ({"val_fraction": 1.0}, "val_fraction"),
                      ({"val_fraction": 0.1}, "val_file=.* and val_fraction=0.1 are both")]:
        with pytest.raises(ValueError, match=match):
            dm(world, **kw)


def test_record_index_round_trip(world):
    convs = [Conversation("a", [Turn("user", "<image>\nü?"), Turn("assistant", "x")], ["1.png"]),
             Conversation("b", [Turn("user", "y"), Turn("assistant", "z")], [])]
    idx = RecordIndex(convs)
    assert len(idx) == 2 and [idx[0], idx[1]] == convs
    good, bad, total = index_records(world / "train.json", format="llava",
                                     image_root=world / "images")
    assert (len(good), bad, total) == (20, [], 20)


class _Consumer(L.LightningModule):
    """Just enough of a module to drive the real Trainer over the data module's loaders."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[str]] = []

    def training_step(self, batch, _):
        self.seen.append(batch["ids"])
        return self.w * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_drives_epochs_deterministically(world, tmp_path):
    def run():
        module = _Consumer()
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False,
                            default_root_dir=tmp_path)
        trainer.fit(module, datamodule=dm(world, val_file=None, on_bad_record="skip"))
        return module.seen

    first, second = run(), run()
    assert first == second and len(first) == 10
    assert [i for b in first[:5] for i in b] != [i for b in first[5:] for i in b]
    assert (tmp_path / "rejects.jsonl").read_text() == ""  # skip mode: rejects under root dir


def test_init_arguments_are_jsonargparse_friendly():
    from jsonargparse import ArgumentParser

    p = ArgumentParser()
    p.add_class_arguments(VLMDataModule, "data")
    cfg = p.parse_args(["--data.model_path", "m", "--data.template", "llava-1.5",
                        "--data.on_bad_record", "skip", "--data.max_length", "64",
                        "--data.global_batch_size", "128", "--data.val_fraction", "0.05"])
    assert (cfg.data.template, cfg.data.on_bad_record, cfg.data.max_length) == \
        ("llava-1.5", "skip", 64)
    assert (cfg.data.global_batch_size, cfg.data.val_fraction) == (128, 0.05)
    m = VLMDataModule(**cfg.data)
    assert (m.global_batch_size, m.val_fraction) == (128, 0.05)


# sha256 buckets of q0..q19 below 0.1 (see tests/data/test_split.py for the hex prefixes)
VAL_AT_10 = ["q4", "q7", "q15", "q18", "q19"]


def ids_of(ds):
    return [ds.index[i].id for i in range(len(ds))]


def test_val_fraction_holds_out_by_id_hash_in_any_order(world, tmp_path):
    m = dm(world, val_file=None, val_fraction=0.1)
    m.setup("fit")
    assert ids_of(m.datasets["val"]) == VAL_AT_10
    assert ids_of(m.datasets["train"]) == [f"q{i}" for i in range(20)
                                           if f"q{i}" not in VAL_AT_10]
    assert [b["ids"] for b in m.val_dataloader()] == [VAL_AT_10[:4], VAL_AT_10[4:]]
    # the same records, reversed on disk, image root from the data folder: the same split
    for i in range(4):
        Image.open(world / "images" / f"{i}.png").save(tmp_path / f"{i}.png")
    (tmp_path / "rev.jsonl").write_text("".join(json.dumps(record(i)) + "\n"
                                                for i in reversed(range(20))))
    r = dm(world, train_file=str(tmp_path / "rev.jsonl"), val_file=None, image_root=None,
           val_fraction=0.1)
    r.setup("validate")  # validation alone still carves the split from train_file
    assert sorted(ids_of(r.datasets["val"])) == sorted(VAL_AT_10)
    assert len(r.datasets["train"]) == 15


def test_val_fraction_errors(world, tmp_path):
    with pytest.raises(ValueError, match=r"into 20 training and 0 validation records: no "
                                         r"validation record is left; raise val_fraction"):
        dm(world, val_file=None, val_fraction=0.04).setup("fit")  # lowest bucket: q18 0.0457
    with pytest.raises(ValueError, match=r"into 0 training and 20 validation"):
        dm(world, val_file=None, val_fraction=0.95).setup("fit")  # highest: q16 0.9117
    rec = record(3)
    del rec["id"]
    (tmp_path / "t.json").write_text(json.dumps([record(0), rec]))
    with pytest.raises(BadRecordError, match=r"record t.json\[1\]: no 'id' field"):
        dm(world, train_file=str(tmp_path / "t.json"), val_file=None,
           val_fraction=0.5).setup("fit")
    with pytest.raises(ValueError, match="no train_file"):
        dm(world, train_file=None, val_file=None, val_fraction=0.5).setup("validate")
