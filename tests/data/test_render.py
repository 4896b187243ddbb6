"""Rendering: golden masks, templates, one tokenization, truncation, bad records."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from attanchor.data.collate import collate
from attanchor.data.formats import BadRecordError, Conversation, Turn
from attanchor.data.render import KINDS, Renderer, render
from attanchor.data.templates import TemplateMismatchError
from attanchor.data.tiny import build_processor, build_tokenizer, tiny_llava_config

VOCAB = ["user", ":", "assistant", "be", "brief", "what", "color", "is", "the", "shape", "?",
         "red", "size", "big"]
M = 64  # image tokens per 64x64 image at patch 8


def make_processor(vocab=VOCAB):
    return build_processor(build_tokenizer(vocab))


def make_images(root, n=2):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (200 * (i % 2), 50 * i, 30)).save(root / f"{i}.png")
    return root


def two_turn(images=("0.png",)):
    return Conversation("golden", [
        Turn("system", "be brief"), Turn("user", "<image>\nwhat color is the shape?"),
        Turn("assistant", "red"), Turn("user", "what size?"), Turn("assistant", "big")],
        list(images))


# The golden two-turn sample: (token, label?, candidate with scope image_turn, ... all_user_turns)
GOLDEN = [("<s>", 0, 0, 0), ("be", 0, 0, 0), ("brief", 0, 0, 0), ("user", 0, 0, 0),
          (":", 0, 0, 0)] + [("<image>", 0, 0, 0)] * M + [
    ("what", 0, 1, 1), ("color", 0, 1, 1), ("is", 0, 1, 1), ("the", 0, 1, 1), ("shape", 0, 1, 1),
    ("?", 0, 1, 1), ("assistant", 0, 0, 0), (":", 0, 0, 0), ("red", 1, 0, 0), ("</s>", 1, 0, 0),
    ("user", 0, 0, 0), (":", 0, 0, 0), ("what", 0, 0, 1), ("size", 0, 0, 1), ("?", 0, 0, 1),
    ("assistant", 0, 0, 0), (":", 0, 0, 0), ("big", 1, 0, 0), ("</s>", 1, 0, 0)]


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture()
def root(tmp_path):
    return make_images(tmp_path / "img")


@pytest.mark.parametrize("template", [None, "llava-1.5", "tiny-llava-v1"])
@pytest.mark.parametrize("scope", ["image_turn", "all_user_turns"])
def test_golden_two_turn_masks(processor, root, template, scope):
    s = render(two_turn(), processor, template=template, scope=scope, image_root=root,
               max_length=512)
    tokens = processor.tokenizer.convert_ids_to_tokens(s.input_ids.tolist())
    col = 2 if scope == "image_turn" else 3
    assert tokens == [g[0] for g in GOLDEN]
    assert (s.labels != -100).int().tolist() == [g[1] for g in GOLDEN]
    assert s.candidate_mask.int().tolist() == [g[col] for g in GOLDEN]
    labelled = s.labels != -100
    assert torch.equal(s.labels[labelled], s.input_ids[labelled])
    assert s.input_ids.dtype == s.labels.dtype == torch.long
    assert s.candidate_mask.dtype == torch.bool
    assert s.pixel_values.shape == (1, 3, 64, 64)


def test_named_template_texts(processor):
    r = Renderer(processor, template="llava-1.5")
    text = "".join(p.text for p in r.pieces(two_turn()))
    assert text == ("<s>be brief USER: <image>\nwhat color is the shape? ASSISTANT: red</s>"
                    "USER: what size? ASSISTANT: big</s>")
    r = Renderer(processor, template="tiny-llava-v1")
    assert "".join(p.text for p in r.pieces(two_turn(), for_generation=True)) == (
        "<s>be brief USER: <image>\nwhat color is the shape?\nASSISTANT: red</s>"
        "USER: what size?\nASSISTANT:")


def test_own_template_ids_equal_hf_processor(processor, root):
    """One tokenization, same ids as HF's processor expanding the image itself."""
    conv = two_turn()
    s = render(conv, processor, image_root=root)
    msgs = [{"role": t.role, "content": t.text} for t in conv.turns]
    text = processor.apply_chat_template(msgs, tokenize=False)
    hf = processor(text=text, images=[Image.open(root / "0.png").convert("RGB")])
    assert hf["input_ids"][0] == s.input_ids.tolist()
    assert torch.allclose(torch.as_tensor(np.asarray(hf["pixel_values"])), s.pixel_values)


def test_batch_feeds_llava_forward(processor, root):
    """The image token count is what LlavaForConditionalGeneration checks."""
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer))).eval()
    r = Renderer(processor, image_root=root)
    short = Conversation("s", [Turn("user", "<image>\nwhat?"), Turn("assistant", "red")],
                         ["1.png"])
    batch = collate([r(two_turn()), r(short)], pad_token_id=processor.tokenizer.pad_token_id)
    ids = batch.pop("ids")
    batch.pop("candidate_mask")
    with torch.no_grad():
        out = model(**batch)
    assert ids == ["golden", "s"] and torch.isfinite(out.loss)


def test_generation_prompt(processor, root):
    for template in (None, "llava-1.5"):
        r = Renderer(processor, template=template, image_root=root)
        s = r(two_turn(), for_generation=True)
        tokens = processor.tokenizer.convert_ids_to_tokens(s.input_ids.tolist())
        assert tokens == [g[0] for g in GOLDEN[:-2]]  # last answer and </s> dropped
        assert (s.labels == -100).all()
        assert s.candidate_mask.int().tolist() == [g[2] for g in GOLDEN[:-2]]


# -- other tokenizers and templates ------------------------------------------------------------

def word_processor(words, specials=(), *, chat_template, pre=None, bos="<s>", eos="</s>"):
    base = ["<pad>", bos, eos, "<unk>", "<image>", *specials]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(base + list(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre or pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in base])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                  pad_token="<pad>", unk_token="<unk>",
                                  extra_special_tokens={"image_token": "<image>",
                                                        **{f"x{i}": s for i, s in
                                                           enumerate(specials)}})
    ip = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                          vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=chat_template)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chatml_string_template_labels_im_end(root):
    p = word_processor(["user", "assistant", "what", "color", "?", "red"],
                       ["<|im_start|>", "<|im_end|>"], chat_template=CHATML)
    conv = Conversation("c", [Turn("user", "<image>\nwhat color ?"), Turn("assistant", "red")],
                        ["0.png"])
    s = render(conv, p, image_root=root)
    tokens = p.tokenizer.convert_ids_to_tokens(s.input_ids.tolist())
    rows = [t for t in tokens if t != "<image>"]
    # no post-processor here, so no <s>: exactly what the template wrote
    assert rows == ["<|im_start|>", "user", "what", "color", "?", "<|im_end|>",
                    "<|im_start|>", "assistant", "red", "<|im_end|>"]
    assert [t for t, lab in zip(tokens, s.labels.tolist()) if lab != -100] == ["red", "<|im_end|>"]
    assert [t for t, c in zip(tokens, s.candidate_mask.tolist()) if c] == ["what", "color", "?"]
    assert tokens.count("<image>") == M


def test_tokens_carrying_spaces_are_classified(root):
    """Metaspace tokens carry the space before them ("▁red" covers " red"): the space belongs to
    the template, the word to the answer; blank tokens are never candidates."""
    words = ["▁USER:", "▁ASSISTANT:", "▁what", "▁color?", "▁red", "▁", "USER:"]
    p = word_processor(words, chat_template=None, pre=pre_tokenizers.Metaspace())
    conv = Conversation("m", [Turn("user", "<image> what color?"), Turn("assistant", "red")],
                        ["0.png"])
    s = Renderer(p, template="llava-1.5", image_root=root)(conv)
    tokens = p.tokenizer.convert_ids_to_tokens(s.input_ids.tolist())
    assert [t for t, lab in zip(tokens, s.labels.tolist()) if lab != -100] == ["▁red", "</s>"]
    assert [t for t, c in zip(tokens, s.candidate_mask.tolist()) if c] == ["▁what", "▁color?"]


def _conv():
    return Conversation("t", [Turn("user", "what color ?"), Turn("assistant", "red")], [])


@pytest.mark.parametrize("template,match", [
    # role glued to content: one token covers template text and user text
    ("{% for m in messages %}{{ m['role'] }}{{ m['content'] }} {% endfor %}",
     "spans two parts of the prompt"),
    ("{% for m in messages %}{{ m['role'] }} {{ m['content'] | upper }} {% endfor %}",
     "transforms message contents"),
    ("{% for m in messages %}{{ m['role'] }} {% endfor %}", "drops or repeats content"),
    ("{% for m in messages %}{{ m['content'] }} {{ m['content'] }} {% endfor %}",
     "drops or repeats content"),
])
def test_template_mismatch_raises(template, match):
    p = word_processor(["user", "assistant", "what", "color", "?", "red", "RED", "WHAT", "COLOR"],
                       chat_template=template)
    with pytest.raises(TemplateMismatchError, match=match) as e:
        render(_conv(), p)
    assert e.value.record_id == "t"


def test_template_refusing_a_record_is_a_bad_record():
    p = word_processor(["user", "assistant", "what", "color", "?", "red"], chat_template=(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}{{ m['role'] }} {{ m['content'] }} "
        "{% endfor %}"))
    conv = Conversation("sys", [Turn("system", "hi"), *_conv().turns], [])
    with pytest.raises(BadRecordError, match="record sys: the chat template refused the record: "
                                             "no system role"):
        render(conv, p)


def test_special_token_in_message_text_raises(processor):
    conv = Conversation("sp", [Turn("user", "what </s> color?"), Turn("assistant", "red")], [])
    for template in (None, "llava-1.5"):
        with pytest.raises(TemplateMismatchError, match="special token '</s>'"):
            render(conv, processor, template=template)


def test_image_token_must_be_one_special_token(root):
    base = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3,
                                             "<image>": 4, "what": 5, "red": 6}, unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()  # "<image>" -> "<", "image", ">"
    base.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "<pad>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    ip = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    p = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1)
    conv = Conversation("i", [Turn("user", "<image>\nwhat"), Turn("assistant", "red")], ["0.png"])
    with pytest.raises(TemplateMismatchError, match="'<image>' became 3 tokens"):
        render(conv, p, template="llava-1.5", image_root=root)


def test_unknown_template_and_scope(processor):
    with pytest.raises(ValueError, match="allowed are"):
        Renderer(processor, template="vicuna")
    with pytest.raises(ValueError, match="scope="):
        Renderer(processor, scope="everything")


# -- truncation --------------------------------------------------------------------------------

def test_truncation_at_every_boundary(processor, root):
    """Full length 88: the image and first prompt end at 75, the first answer token is 77."""
    full = render(two_turn(), processor, image_root=root)
    n = len(full.input_ids)
    assert n == len(GOLDEN) == 88
    for max_length in range(1, n + 3):
        r = Renderer(processor, image_root=root, max_length=max_length)
        if max_length < 75:
            with pytest.raises(BadRecordError, match="image\\(s\\) and first prompt take 75"):
                r(two_turn())
        elif max_length < 78:  # cut before "red": nothing left to train on
            with pytest.raises(BadRecordError, match="no answer token fits"):
                r(two_turn())
        else:
            s = r(two_turn())
            keep = min(max_length, n)
            assert torch.equal(s.input_ids, full.input_ids[:keep])
            assert torch.equal(s.labels, full.labels[:keep])  # a cut answer keeps its labels
            assert torch.equal(s.candidate_mask, full.candidate_mask[:keep])
            assert s.pixel_values.shape[0] == 1


def test_truncation_never_cuts_an_image_span(processor, root):
    conv = Conversation("two", [Turn("user", "<image>\nwhat color?"), Turn("assistant", "red"),
                                Turn("user", "<image>\nwhat size?"), Turn("assistant", "big")],
                        ["0.png", "1.png"])
    full = render(conv, processor, image_root=root)
    starts = [i for i in range(len(full.input_ids)) if full.input_ids[i] == 4 and
              (i == 0 or full.input_ids[i - 1] != 4)]
    second = starts[1]  # <s> user : img*64 what color ? assistant : red </s> user : -> 79
    assert second == 1 + 2 + M + 3 + 2 + 2 + 2
    for max_length in range(second, second + M + 1):
        s = Renderer(processor, image_root=root, max_length=max_length)(conv)
        cut = second if max_length < second + M else max_length
        assert torch.equal(s.input_ids, full.input_ids[:cut])
        assert s.pixel_values.shape[0] == (1 if cut == second else 2)
        assert int((s.input_ids == 4).sum()) == M * s.pixel_values.shape[0]


def test_generation_prompt_never_truncated(processor, root):
    r = Renderer(processor, image_root=root, max_length=80)
    with pytest.raises(BadRecordError, match="prompt takes 86 tokens"):
        r(two_turn(), for_generation=True)


# -- images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel,match", [("missing.png", "image not found"),
                                       ("bad.png", "corrupt or not an image"),
                                       ("../0.png", "contains '..'")])
def test_bad_images_in_render(processor, root, rel, match):
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    conv = Conversation("b", [Turn("user", "<image>\nwhat?"), Turn("assistant", "red")], [rel])
    with pytest.raises(BadRecordError, match=match) as e:
        render(conv, processor, image_root=root / "sub" if rel.startswith("..") else root)
    assert e.value.record_id == "b"


def test_image_cache_is_exact_and_bounded(processor, root):
    r = Renderer(processor, image_root=root, image_cache_mb=0.05)  # room for one 48 KiB image
    a = r(two_turn(["0.png"])).pixel_values
    b = r(two_turn(["1.png"])).pixel_values
    assert len(r._cache) == 1 and torch.equal(r(two_turn(["0.png"])).pixel_values, a)
    assert not torch.equal(a, b)


def test_kinds_name_every_token(processor, root):
    r = Renderer(processor, template="llava-1.5", image_root=root)
    tr = r.render_text(two_turn(), [M])
    kinds = [KINDS[k] for k in tr.kinds.tolist()]
    assert kinds[:5] == ["bos", "system", "system", "template", "template"]
    assert kinds[5:5 + M] == ["image"] * M and kinds[-2:] == ["assistant", "eot"]


def test_template_without_end_of_turn_warns_once():
    p = word_processor(["user", "assistant", "what", "color", "?", "red"],
                       chat_template="{% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
                                     "{% endfor %}")
    r = Renderer(p)
    with pytest.warns(UserWarning, match="never trained to stop"):
        s = r(_conv())
    assert p.tokenizer.convert_ids_to_tokens(s.labels[s.labels != -100].tolist()) == ["red"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r(_conv())  # once per renderer
