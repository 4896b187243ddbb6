"""Bad input at scale: thousands of generated records (hypothesis), good ones and ones with one
of ~30 kinds of defect, in both formats, through the parser, the image checks, the renderer
and the collator. The only failures allowed are ``BadRecordError`` (and subclasses) naming
the record; every bad record is named and no good one is. Recipes with wrong types and
unknown keys fail with an error naming the key."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attanchor.data.collate import collate
from attanchor.data.records import index_records
from attanchor.data.render import Renderer
from attanchor.data.tiny import build_processor, build_tokenizer

VOCAB = ["user", ":", "assistant", "system", "what", "color", "is", "the", "shape", "?", "red",
         "blue", "be", "brief"]
MAX_LENGTH = 512
EXAMPLES = 170  # x 15-28 records each: about 3,200 records (counts asserted below)

GOOD_IMAGES = ["good0.png", "good1.png", "sub/good2.png", "bild_ü_画.png", {"path": "good0.png"}]
# Image references that must each make the record bad (path escapes, wrong types, bad files).
BAD_IMAGES = ["../outside.png", "/etc/hostname", "sub/../good0.png", "missing.png", "folder",
              "corrupt.png", "cut.jpg", "empty.png", "link_out.png", "a\x00b.png", "", 7, None,
              ["good0.png", 3], {"path": 5}, "C:\\Windows\\x.png", "\\\\server\\share.png"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    root = d / "images"
    (root / "sub").mkdir(parents=True)
    (root / "folder").mkdir()
    for i, name in enumerate(["good0.png", "good1.png", "sub/good2.png", "bild_ü_画.png"]):
        Image.new("RGB", (64, 64), (60 * i, 10, 99)).save(root / name)
    Image.new("RGB", (8, 8)).save(d / "outside.png")
    os.symlink(d / "outside.png", root / "link_out.png")
    (root / "corrupt.png").write_text("not a png")
    (root / "empty.png").write_bytes(b"")
    noise = bytes((i * 31 + (i >> 7) * 17) % 253 for i in range(128 * 128 * 3))
    Image.frombytes("RGB", (128, 128), noise).save(d / "whole.jpg", quality=90)
    (root / "cut.jpg").write_bytes((d / "whole.jpg").read_bytes()[:3000])
    processor = build_processor(build_tokenizer(VOCAB))
    renderer = Renderer(processor, image_root=root, max_length=MAX_LENGTH)
    return {"dir": d, "root": root, "renderer": renderer,
            "pad": processor.tokenizer.pad_token_id}


# -- strategies -------------------------------------------------------------------------------
# Text: any unicode but "<" (so no stray <image>), mixed with the model's own words.
words = st.sampled_from(VOCAB + ["grün", "Ωmega", "日本", "🙂", "x\ty", "ﬁ", "İ"])
wild = st.text(st.characters(codec="utf-8", exclude_characters="<"), min_size=1, max_size=30)
text = st.one_of(st.lists(words, min_size=1, max_size=8).map(" ".join), wild) \
    .filter(lambda s: s.strip())
ids = st.one_of(st.text(min_size=1, max_size=10), st.integers(-10**12, 10**12))


@st.composite
def good_record(draw, fmt: str) -> dict:
    """A record that must parse, pass the image checks and render."""
    n_img = draw(st.integers(0, 2))
    images = [draw(st.sampled_from(GOOD_IMAGES)) for _ in range(n_img)]
    n_rounds = draw(st.integers(1, 3))
    system = draw(st.one_of(st.none(), text))
    qs = [draw(text) for _ in range(n_rounds)]
    ans = [draw(text) for _ in range(n_rounds)]
    rec: dict = {"id": draw(ids)}
    if draw(st.integers(0, 9)) == 0:
        rec.pop("id")  # named by file:line
    if draw(st.booleans()):
        rec["extra_" + draw(st.text("abcxyz", min_size=1, max_size=4))] = draw(text)  # ignored
    if fmt == "llava":
        conv = [] if system is None else [{"from": "system", "value": system}]
        for k, (q, a) in enumerate(zip(qs, ans, strict=True)):
            value = ("<image>\n" * n_img + q) if k == 0 else q
            conv += [{"from": draw(st.sampled_from(["human", "user"])), "value": value},
                     {"from": draw(st.sampled_from(["gpt", "assistant"])), "value": a}]
        rec["conversations"] = conv
        if images:
            rec["image"] = images[0] if n_img == 1 and draw(st.booleans()) else images
    else:
        msgs = [] if system is None else [{"role": "system", "content": system}]
        for k, (q, a) in enumerate(zip(qs, ans, strict=True)):
            parts = [{"type": "image"}] * (n_img if k == 0 else 0) + [{"type": "text", "text": q}]
            content = q if k and draw(st.booleans()) else parts
            msgs += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        rec["messages"] = msgs
        if images:
            rec["images"] = images
    return rec


def _turns_key(fmt: str) -> str:
    return "conversations" if fmt == "llava" else "messages"


def _first_user(fmt: str, rec: dict) -> dict:
    turns = rec[_turns_key(fmt)]
    return turns[1] if turns[0].get("from", turns[0].get("role")) == "system" else turns[0]


@st.composite
def bad_record(draw, fmt: str) -> tuple[str, dict | str]:
    """``(defect, record)``: a good record with exactly one defect; a str record is a raw line."""
    rec = draw(good_record(fmt))
    key, role, value = _turns_key(fmt), ("from" if fmt == "llava" else "role"), \
        ("value" if fmt == "llava" else "content")
    turns = rec[key]
    kind = draw(st.sampled_from([
        "not_object", "broken_json", "no_turns_key", "turns_not_list", "turn_not_object",
        "turn_missing_role", "turn_missing_text", "unknown_role", "text_wrong_type",
        "empty_text", "no_turns", "only_system", "wrong_order", "no_answer",
        "extra_placeholder", "missing_placeholder", "placeholder_in_answer", "bad_image",
        "image_wrong_type", "too_long", "part_wrong"]))
    if kind == "not_object":
        return kind, draw(st.sampled_from(['[1, 2]', '"text"', "42", "null", "true"]))
    if kind == "broken_json":
        return kind, json.dumps(rec)[:-1 - draw(st.integers(0, 5))]
    if kind == "no_turns_key":
        del rec[key]
    elif kind == "turns_not_list":
        rec[key] = draw(st.sampled_from(["hello", {"a": 1}, 3, None]))
    elif kind == "turn_not_object":
        turns[draw(st.integers(0, len(turns) - 1))] = draw(st.sampled_from(["hi", 1, None, []]))
    elif kind == "turn_missing_role":
        del turns[draw(st.integers(0, len(turns) - 1))][role]
    elif kind == "turn_missing_text":
        del turns[draw(st.integers(0, len(turns) - 1))][value]
    elif kind == "unknown_role":
        turns[draw(st.integers(0, len(turns) - 1))][role] = draw(
            st.sampled_from(["robot", "", "Human ", "bot", "tool"]))
    elif kind == "text_wrong_type":
        turns[-1][value] = draw(st.sampled_from([1, None, 2.5, {"t": "x"}] if fmt == "llava"
                                                else [1, None, {"type": "text"}]))
    elif kind == "empty_text":
        empty = draw(st.sampled_from(["", " ", "\n\t "]))
        turns[-1][value] = empty if fmt == "llava" else [{"type": "text", "text": empty}]
    elif kind == "no_turns":
        rec[key] = []
    elif kind == "only_system":
        rec[key] = [{role: "system", value: "be brief"}]
    elif kind == "wrong_order":
        turns.insert(len(turns) - 1, dict(turns[-1]))  # two answers in a row
    elif kind == "no_answer":
        turns.pop()
    elif kind == "extra_placeholder":
        u = _first_user(fmt, rec)
        if fmt == "llava":
            u[value] = "<image>\n" + u[value]
        else:
            u[value] = [{"type": "image"}] + (u[value] if isinstance(u[value], list) else
                                              [{"type": "text", "text": u[value]}])
    elif kind == "missing_placeholder":
        rec["image" if fmt == "llava" else "images"] = ["good0.png", "good1.png", "good0.png"]
    elif kind == "placeholder_in_answer":
        turns[-1][value] = "<image> red" if fmt == "llava" else [{"type": "image"}]
    elif kind in ("bad_image", "image_wrong_type"):
        u = _first_user(fmt, rec)
        pool = [b for b in BAD_IMAGES if isinstance(b, str)] if kind == "bad_image" else \
            [b for b in BAD_IMAGES if not isinstance(b, str)]
        bad = draw(st.sampled_from(pool))
        n = 2 if isinstance(bad, list) else 1  # one placeholder per listed image
        if fmt == "llava":
            u[value] = "<image>\n" * n + u[value].replace("<image>\n", "")
            rec["image"] = bad
        else:
            parts = u[value] if isinstance(u[value], list) else [{"type": "text", "text":
                                                                 u[value]}]
            u[value] = [{"type": "image"}] * n + [p for p in parts if p.get("type") == "text"]
            rec["images"] = bad if isinstance(bad, list) else [bad]
        rec.pop("images" if fmt == "llava" else "image", None)
    elif kind == "too_long":  # the first prompt must fit (an answer may be truncated)
        huge = " ".join(["red"] * (MAX_LENGTH + draw(st.integers(1, 3000))))
        u = _first_user(fmt, rec)
        if fmt == "llava":
            u[value] += " " + huge
        else:
            u[value] = u[value] + [{"type": "text", "text": huge}]
    elif kind == "part_wrong":
        u = _first_user(fmt, rec)
        if fmt == "llava":
            u[value] = ["<image>", "what"]
        else:
            u[value] = draw(st.sampled_from([[{"type": "video"}], [{"type": "text", "text": 3}],
                                             [{"type": "text", "text": "a <image> b"}], ["x"]]))
    return kind, rec


@st.composite
def long_answer(draw, fmt: str) -> dict:
    """A good record whose answer is longer than max_length: truncated, still trained on."""
    rec = draw(good_record(fmt))
    huge = " ".join(["blue"] * (MAX_LENGTH + draw(st.integers(1, 2000))))
    turns = rec[_turns_key(fmt)]
    turns[1 if turns[0].get("from", turns[0].get("role")) != "system" else 2][
        "value" if fmt == "llava" else "content"] = huge
    return rec


def spec(fmt: str):
    """Half good (one in five of them with an over-long answer), half with one defect."""
    def pick(k: int):
        if k < 4:
            return good_record(fmt).map(lambda r: ("good", r))
        return long_answer(fmt).map(lambda r: ("good", r)) if k == 4 else bad_record(fmt)
    return st.integers(0, 9).flatmap(pick)


def _line(rec: dict | str) -> str:
    return rec if isinstance(rec, str) else json.dumps(rec, ensure_ascii=draw_ascii(rec))


def draw_ascii(rec: dict) -> bool:
    return len(json.dumps(rec)) % 2 == 0  # both JSON spellings of unicode, deterministically


def expected_id(rec: dict | str, fallback: str) -> str:
    if isinstance(rec, dict) and rec.get("id") is not None:
        return str(rec["id"])
    return fallback


def test_thousands_of_generated_records_fail_only_by_name(world, tmp_path_factory):
    counts: Counter = Counter()
    folder = tmp_path_factory.mktemp("files")
    renderer = world["renderer"]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(st.sampled_from(["llava", "messages"]).flatmap(
        lambda fmt: st.tuples(st.just(fmt), st.lists(spec(fmt), min_size=15, max_size=28))))
    def check(case):
        fmt, specs = case
        path = folder / f"{fmt}.jsonl"
        path.write_text("".join(_line(r) + "\n" for _, r in specs), encoding="utf-8")
        good, bad, total = index_records(path, format=fmt, image_root=world["root"],
                                         renderer=renderer, progress=False)
        assert total == len(specs)
        want_bad = [(expected_id(r, f"{path.name}:{n}"), kind)
                    for n, (kind, r) in enumerate(specs, 1) if kind != "good"]
        got = [e.record_id for e in bad]
        assert got == [rid for rid, _ in want_bad], (got, want_bad)
        for e, (rid, kind) in zip(bad, want_bad, strict=True):
            assert str(e).startswith(f"record {rid}: "), (kind, str(e))
            assert type(e).__name__ in ("BadRecordError", "TemplateMismatchError"), kind
            if kind == "too_long":
                assert "does not fit" in e.reason, e.reason
            counts[kind] += 1
        assert len(good) == sum(kind == "good" for kind, _ in specs)  # no good record lost
        samples = [renderer(good[i]) for i in range(len(good))]  # with images, as a worker
        for i in range(0, len(samples), 4):
            batch = collate(samples[i:i + 4], pad_token_id=world["pad"])
            assert batch["ids"] == [s.id for s in samples[i:i + 4]]
        counts["good"] += len(good)
        counts["records"] += total
        counts[fmt] += total

    check()
    print("generated records:", dict(sorted(counts.items())))
    assert counts["records"] >= 3000, counts
    assert counts["good"] >= 1200 and counts["records"] - counts["good"] >= 1200, counts
    assert min(counts["llava"], counts["messages"]) >= 1000, counts
    kinds = {k for k in counts if k not in ("good", "records", "llava", "messages")}
    assert len(kinds) == 21, kinds  # every kind of defect was tried


DEMO = str(Path(__file__).resolve().parents[2] / "recipes" / "demo" / "anchored.yaml")
RECIPE_FAULTS = [  # (override, text the error must contain: the key)
    (["--data.batch_size", "eight"], 'data.batch_size'),
    (["--trainer.max_steps", "many"], 'trainer.max_steps'),
    (["--run.wandb", "maybe"], 'run.wandb'),
    (["--model.model.dtype", "float8"], 'model.model.dtype'),
    (["--model.anchor.top_fraction", "[1]"], 'top_fraction'),
    (["--model.anchor.strategy", "sideways"], "strategy='sideways'"),
    (["--data.on_bad_record", "ignore"], "on_bad_record='ignore'"),
    (["--data.max_image_pixels", "0"], "max_image_pixels=0"),
    (["--model.numerics.on_nonfinite_loss", "never"], "on_nonfinite_loss"),
    (["--model.numerics.max_nonfinite_skips", "-1"], "max_nonfinite_skips=-1"),
    (["--data.batchsize", "3"], "--data.batchsize"),
    (["--model.anchor.stratgy", "none"], "--model.anchor.stratgy"),
    (["--run.nmae", "x"], "--run.nmae"),
]


@pytest.mark.parametrize("override,named", RECIPE_FAULTS, ids=[o[0] for o, _ in RECIPE_FAULTS])
def test_recipe_with_a_wrong_type_or_an_unknown_key_names_it(override, named):
    from attanchor.train.cli import validate_recipe

    with pytest.raises(Exception) as info:  # noqa: B017  (argparse or ValueError; both name it)
        validate_recipe(DEMO, override)
    assert named in str(info.value), str(info.value)


@pytest.mark.parametrize("block", ["model:\n  anchor: {stratgy: none}\n",
                                   "data:\n  batch_sise: 4\n", "runn:\n  name: x\n"])
def test_recipe_file_with_an_unknown_key_names_it(tmp_path, block):
    from attanchor.train.cli import validate_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {DEMO}\n{block}")
    with pytest.raises(Exception) as info:  # noqa: B017
        validate_recipe(str(bad))
    key = block.split("{")[-1].split(":")[0].strip() if "{" in block else \
        block.splitlines()[-1].split(":")[0].strip() if block.startswith(("model", "data")) \
        else "runn"
    assert key in str(info.value), str(info.value)


def test_every_bad_image_reference_is_one_named_bad_record(world, tmp_path):
    """Each entry of BAD_IMAGES once (the generated test draws them at random), in one file
    between good records: each is named, every good record kept."""
    recs, want = [], []
    for i, bad in enumerate(BAD_IMAGES):
        n = 2 if isinstance(bad, list) else 1
        recs.append({"id": f"bad{i}", "image": bad, "conversations": [
            {"from": "human", "value": "<image>\n" * n + "what color"},
            {"from": "gpt", "value": "red"}]})
        recs.append({"id": f"good{i}", "image": GOOD_IMAGES[i % len(GOOD_IMAGES)],
                     "conversations": [{"from": "human", "value": "<image>\nwhat color"},
                                       {"from": "gpt", "value": "blue"}]})
        want.append(f"bad{i}")
    path = tmp_path / "images.json"
    path.write_text(json.dumps(recs))
    good, bad, total = index_records(path, format="llava", image_root=world["root"],
                                     renderer=world["renderer"], progress=False)
    assert total == 2 * len(BAD_IMAGES) and len(good) == len(BAD_IMAGES)
    assert [e.record_id for e in bad] == want
    reasons = {e.record_id: e.reason for e in bad}
    assert "contains '..'" in reasons["bad0"] and "contains '..'" in reasons["bad2"]
    assert "is absolute" in reasons["bad1"] and "is absolute" in reasons["bad16"]
    assert "outside the image root" in reasons["bad8"]  # the symlink
    assert "cannot be resolved" in reasons["bad9"] and "null" in reasons["bad9"]  # NUL byte
    assert "corrupt or not an image, or is truncated" in reasons["bad6"]  # the cut JPEG
