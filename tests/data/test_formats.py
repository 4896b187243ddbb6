"""Formats: both record formats, every bad-record class, image path confinement."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from attanchor.data.formats import (
    BadRecordError,
    Conversation,
    Turn,
    check_image,
    load_image,
    parse_llava,
    parse_messages,
    read_records,
    resolve_image,
)


def llava(rid="r1", turns=(("human", "<image>\nwhat color?"), ("gpt", "red")), image="a.png"):
    rec = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        rec["image"] = image
    return rec


def test_llava_record_multi_turn():
    rec = llava(turns=[("system", "be brief"), ("human", "<image>\nwhat color?"), ("gpt", "red"),
                       ("human", "and shape?"), ("gpt", "circle")])
    conv = parse_llava(rec, "f[0]")
    assert conv == Conversation("r1", [Turn("system", "be brief"),
                                       Turn("user", "<image>\nwhat color?"), Turn("assistant", "red"),
                                       Turn("user", "and shape?"), Turn("assistant", "circle")],
                                ["a.png"])


def test_llava_int_id_and_image_list():
    conv = parse_llava(llava(rid=7, turns=[("human", "<image> <image> same?"), ("gpt", "no")],
                             image=["a.png", "b.png"]), "f[0]")
    assert conv.id == "7" and conv.images == ["a.png", "b.png"]


def test_messages_record_parts_and_string_content():
    rec = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Black."}], "images": ["x/1.jpg"]}
    conv = parse_messages(rec, "f.jsonl:3")
    assert conv.id == "f.jsonl:3"  # no id: named by file and line
    assert [t.text for t in conv.turns] == ["<image>\nWhat is it?", "A cat.", "Colour?", "Black."]
    assert conv.images == ["x/1.jpg"]


def test_read_json_and_jsonl_same_conversations(tmp_path):
    recs = [llava("a"), llava("b", image="b.png")]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    a = list(read_records(tmp_path / "d.json", "llava"))
    b = list(read_records(tmp_path / "d.jsonl", "llava"))
    assert a == b and [c.id for c in a] == ["a", "b"]


def test_jsonl_is_streamed(tmp_path):
    # A broken line late in the file does not stop the records before it from streaming out.
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(llava("a")) + "\n{not json\n")
    it = read_records(path, "llava")
    assert next(it).id == "a"
    with pytest.raises(BadRecordError, match=r"d.jsonl:2: malformed record: invalid JSON"):
        next(it)


BAD = [
    ("not a dict", [1, 2], "expected a JSON object"),
    ("no conversations", {"id": "x", "image": "a.png"}, "missing list 'conversations'"),
    ("turn without value", {"id": "x", "conversations": [{"from": "human"}]}, "needs 'from' and"),
    ("value not str", llava(turns=[("human", "<image>"), ("gpt", 3)]), "must be a string"),
    ("unknown speaker", llava(turns=[("bot", "<image>hi"), ("gpt", "x")]), "from='bot'"),
    ("empty conversation", llava(turns=[], image=None), "empty conversation"),
    ("only system", llava(turns=[("system", "hi")], image=None), "only a system prompt"),
    ("empty turn", llava(turns=[("human", "<image>"), ("gpt", " ")]), r"turn 1 \(assistant\) is empty"),
    ("assistant first", llava(turns=[("gpt", "x"), ("human", "<image>y")]), "wrong role order"),
    ("two users", llava(turns=[("human", "<image>a"), ("human", "b"), ("gpt", "c")]),
     "turn 1 is 'user' where 'assistant'"),
    ("system in the middle", llava(turns=[("human", "<image>a"), ("system", "b"), ("gpt", "c")]),
     "wrong role order"),
    ("no answer", llava(turns=[("human", "<image>a")]), "ends with a user turn"),
    ("more placeholders", llava(turns=[("human", "<image><image>a"), ("gpt", "b")]),
     "2 <image> placeholder\\(s\\) but 1 image"),
    ("no placeholder", llava(turns=[("human", "a"), ("gpt", "b")]),
     "0 <image> placeholder\\(s\\) but 1 image"),
    ("placeholder without image", llava(image=None), "1 <image> placeholder\\(s\\) but 0"),
    ("placeholder in answer", llava(turns=[("human", "<image>a"), ("gpt", "<image>")]),
     "turn 1 \\(assistant\\) holds <image>"),
    ("image not a path", llava(image=3), "'image' must be a path"),
]


@pytest.mark.parametrize("name,rec,match", BAD, ids=[b[0] for b in BAD])
def test_bad_llava_records_named_with_reason(name, rec, match):
    with pytest.raises(BadRecordError, match=match) as e:
        parse_llava(rec, "data.json[4]")
    want = rec.get("id", "data.json[4]") if isinstance(rec, dict) else "data.json[4]"
    assert e.value.record_id == want and str(e.value).startswith(f"record {want}: ")


BAD_MESSAGES = [
    ("no messages", {"conversations": []}, "missing list 'messages'"),
    ("unknown part", {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "must be {'type': 'image'}"),
    ("placeholder in text part", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "<image> hi"}]},
        {"role": "assistant", "content": "x"}], "images": ["a.png"]}, "use an {'type': 'image'}"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ("images without parts", {"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "x"}],
                              "images": ["a.png"]}, "0 <image> placeholder"),
]


@pytest.mark.parametrize("name,rec,match", BAD_MESSAGES, ids=[b[0] for b in BAD_MESSAGES])
def test_bad_messages_records(name, rec, match):
    with pytest.raises(BadRecordError, match=match):
        parse_messages(rec, "m.jsonl:1")


def test_errors_yield_reports_every_bad_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([llava("ok1"), llava("bad1", image=None), llava("ok2"),
                                {"id": "bad2"}]))
    items = list(read_records(path, "llava", errors="yield"))
    assert [type(i).__name__ for i in items] == ["Conversation", "BadRecordError",
                                                 "Conversation", "BadRecordError"]
    assert [i.record_id for i in items if isinstance(i, BadRecordError)] == ["bad1", "bad2"]


def test_generation_records_may_end_with_user(tmp_path):
    conv = parse_llava(llava(turns=[("human", "<image>\nq")]), "x", require_answer=False)
    assert conv.turns[-1].role == "user"


def test_broken_json_file_and_unknown_format(tmp_path):
    (tmp_path / "d.json").write_text('[{"id": 1}, ')
    with pytest.raises(BadRecordError, match="invalid JSON .*convert it to JSONL"):
        list(read_records(tmp_path / "d.json"))
    with pytest.raises(ValueError, match="format='sharegpt'"):
        list(read_records(tmp_path / "d.json", "sharegpt"))
    with pytest.raises(FileNotFoundError):
        list(read_records(tmp_path / "missing.json"))


# -- images ------------------------------------------------------------------------------------

@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "images"
    (r / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(r / "sub" / "ok.png")
    (r / "garbage.png").write_bytes(b"this is not an image")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "outside.png")
    data = (r / "sub" / "ok.png").read_bytes()
    (r / "truncated.png").write_bytes(data[: len(data) // 2])
    return r


def test_resolve_image_inside_root(root):
    assert resolve_image(root, "sub/ok.png", "r") == (root / "sub" / "ok.png").resolve()
    os.symlink(root / "sub" / "ok.png", root / "link.png")  # a symlink that stays inside: fine
    assert resolve_image(root, "link.png", "r") == (root / "sub" / "ok.png").resolve()


@pytest.mark.parametrize("rel,match", [
    ("/etc/passwd", "is absolute"),
    ("../outside.png", "contains '..'"),
    ("sub/../../outside.png", "contains '..'"),
    ("missing.png", "image not found"),
    ("sub", "is not a file"),
])
def test_resolve_image_refuses(root, rel, match):
    with pytest.raises(BadRecordError, match=match) as e:
        resolve_image(root, rel, "rec-9")
    assert e.value.record_id == "rec-9"


def test_symlink_out_of_root_refused(root):
    os.symlink(root.parent / "outside.png", root / "escape.png")
    os.symlink(root.parent, root / "escdir")
    for rel in ("escape.png", "escdir/outside.png"):
        with pytest.raises(BadRecordError, match="outside the image root"):
            resolve_image(root, rel, "r")


def test_load_and_check_images(root):
    assert load_image(root / "sub" / "ok.png", "r").mode == "RGB"
    assert check_image(root / "sub" / "ok.png", "r") == (8, 6)
    for name in ("garbage.png", "truncated.png"):
        with pytest.raises(BadRecordError, match="corrupt or not an image"):
            load_image(root / name, "r")
        with pytest.raises(BadRecordError, match="corrupt or not an image"):
            check_image(root / name, "r")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_image(root):
    path = root / "sub" / "ok.png"
    path.chmod(0)
    try:
        with pytest.raises(BadRecordError, match="cannot be read"):
            load_image(path, "r")
    finally:
        path.chmod(0o644)


def test_bad_record_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(BadRecordError("r1", "why")))
    assert (e.record_id, e.reason, str(e)) == ("r1", "why", "record r1: why")
