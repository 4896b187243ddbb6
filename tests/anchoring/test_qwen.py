"""Qwen2.5-VL family: exact against Hugging Face, hand-checked (t, h, w) positions.

The tiny Qwen2.5-VL (attanchor.data.tiny_qwen): patch 4, merge 2, so an image of h x w pixels
gives a merged grid (h / 8) x (w / 8) of image tokens. Images used here: 16x16 -> grid
(1, 4, 4), 2 x 2 tokens; 32x16 (w x h) -> grid (1, 4, 8), 2 x 4 tokens.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from attanchor.anchoring import AnchorConfig, regroup
from attanchor.anchoring.family import family_for
from attanchor.anchoring.model import AnchoredVLM
from attanchor.anchoring.qwen import QwenVLFamily, map_positions
from attanchor.data.tiny_qwen import (
    IMAGE,
    SPECIAL_TOKENS,
    VISION_END,
    VISION_START,
    build_tiny_qwen,
    load_qwen_processor,
)

WORDS = ["what", "color", "is", "the", "shape", "?", "red", "blue", "green", "circle",
         "square", "a", "b"]
VS, VE, IM = (SPECIAL_TOKENS.index(t) for t in (VISION_START, VISION_END, IMAGE))


@pytest.fixture(scope="module")
def tq(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration
    path = build_tiny_qwen(tmp_path_factory.mktemp("qwen") / "tiny", vocab=WORDS, seed=0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    return model, load_qwen_processor(path)


def _messages(question: str, n_images: int) -> list[dict]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def hf_inputs(processor, side: str):
    """Row 0: two images (16x16, 32x16) and a question; row 1: one 16x16 image, shorter."""
    processor.tokenizer.padding_side = side
    texts = [processor.apply_chat_template(_messages(q, n), add_generation_prompt=True,
                                           tokenize=False)
             for q, n in (("what color is the shape ?", 2), ("what shape ?", 1))]
    images = [Image.new("RGB", (16, 16), "red"), Image.new("RGB", (32, 16), "blue"),
              Image.new("RGB", (16, 16), "green")]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def images_of(inp: dict) -> dict:
    return {k: inp[k] for k in QwenVLFamily.image_keys}


def test_family_for_picks_qwen(tq):
    assert isinstance(family_for(tq[0]), QwenVLFamily)


@pytest.mark.parametrize("side", ["right", "left"])
def test_none_reproduces_hf_logits_exactly(tq, side):
    model, processor = tq
    inp = hf_inputs(processor, side)
    fam = QwenVLFamily()
    with torch.no_grad():
        ref = model(**inp).logits
        base = fam.baseline(model, inp["input_ids"], inp["attention_mask"], images_of(inp))
        out = regroup(base.embeds, inp["attention_mask"], base.image_mask,
                      torch.zeros_like(base.image_mask), None, AnchorConfig(strategy="none"))
        pos = fam.positions(base, out)
        got = model(inputs_embeds=out.inputs_embeds, attention_mask=out.attention_mask,
                    position_ids=pos).logits
        # AnchoredVLM's `none` path (HF's own forward with the batch's image keys).
        vlm = AnchoredVLM(model, AnchorConfig(strategy="none"))
        plain = vlm(inp["input_ids"], inp["pixel_values"], inp["attention_mask"],
                    image_grid_thw=inp["image_grid_thw"],
                    mm_token_type_ids=inp["mm_token_type_ids"]).logits
    assert torch.equal(got, ref)
    assert torch.equal(plain, ref)
    assert torch.equal(pos, base.position_ids)
    # Positions really are 3-D: row 0's first image (2 x 2 tokens) after 11 text tokens.
    first = int(inp["attention_mask"][0].argmax()) if side == "left" else 0
    start = first + 12  # <|im_start|> system ... <|im_start|> user \n <|vision_start|>
    assert pos[:, 0, start:start + 4].tolist() == [[12, 12, 12, 12], [12, 12, 13, 13],
                                                   [12, 13, 12, 13]]


def test_greedy_generation_equals_hf_token_for_token(tq):
    model, processor = tq
    inp = hf_inputs(processor, "left")
    fam = QwenVLFamily()
    with torch.no_grad():
        ref = model.generate(**inp, max_new_tokens=8, do_sample=False)
        ref = ref[:, inp["input_ids"].shape[1]:]
        base = fam.baseline(model, inp["input_ids"], inp["attention_mask"], images_of(inp))
        out = regroup(base.embeds, inp["attention_mask"], base.image_mask,
                      torch.zeros_like(base.image_mask), None, AnchorConfig(strategy="none"),
                      side="left")
        got = fam.generate(model, out, fam.positions(base, out), max_new_tokens=8,
                           do_sample=False)
        vlm = AnchoredVLM(model, AnchorConfig(strategy="none"))
        plain = vlm.generate(inp["input_ids"], inp["pixel_values"], inp["attention_mask"],
                             image_grid_thw=inp["image_grid_thw"],
                             mm_token_type_ids=inp["mm_token_type_ids"], max_new_tokens=8,
                             do_sample=False)
    assert ref.shape == (2, 8)
    assert torch.equal(got, ref)
    assert torch.equal(plain, ref)


def _one_hot(n: int, d: int = 16) -> torch.Tensor:
    return torch.eye(d)[n]


def test_golden_two_images_in_one_row_copy_after_last_token_of_grid_row(tq):
    """Row: <vs> I00 I01 I10 I11 <ve> a <vs> J00 J01 <ve> b, images 16x16 and 32x16... as
    grids (1, 4, 4) (2 x 2 tokens) and (1, 2, 4) (1 x 2 tokens). By hand (STACK.md's rule):
    <vs> 0; I: t=1, h=1+row, w=1+col; count 1 + max(2, 2) = 3: <ve> 3, a 4, <vs> 5;
    J: t=6, h=6, w=6+col; count 6 + max(1, 2) = 8: <ve> 8, b 9.
    a matches I01 (last token of grid row 0), b matches J01 (last token of J's only row)."""
    model, _ = tq
    a_id, b_id = len(SPECIAL_TOKENS) + 20, len(SPECIAL_TOKENS) + 21
    ids = torch.tensor([[VS, IM, IM, IM, IM, VE, a_id, VS, IM, IM, VE, b_id]])
    mask = torch.ones_like(ids)
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])
    pos, _ = model.model.get_rope_index(input_ids=ids, mm_token_type_ids=(ids == IM).int(),
                                        image_grid_thw=grid, attention_mask=mask)
    assert pos[:, 0].tolist() == [[0, 1, 1, 1, 1, 3, 4, 5, 6, 6, 8, 9],
                                  [0, 1, 1, 2, 2, 3, 4, 5, 6, 6, 8, 9],
                                  [0, 1, 2, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    # Embeddings chosen so that a ~ I01 and b ~ J01 and nothing else is similar.
    embeds = torch.stack([_one_hot(k) for k in range(12)])[None]
    embeds[0, 6] = embeds[0, 2]  # a == I01
    embeds[0, 11] = embeds[0, 9]  # b == J01
    cand = torch.zeros_like(ids, dtype=torch.bool)
    cand[0, [6, 11]] = True
    out = regroup(embeds, mask, ids == IM, cand, None,
                  AnchorConfig(strategy="text_into_image", threshold=0.9))
    assert out.origin[0].tolist() == [0, 1, 2, 6, 3, 4, 5, 6, 7, 8, 9, 11, 10, 11]
    got = map_positions(pos, out)
    #           <vs> I00 I01 a*  I10 I11 <ve> a  <vs> J00 J01 b*  <ve> b
    assert got[:, 0].tolist() == [[0, 1, 1, 1, 1, 1, 3, 4, 5, 6, 6, 6, 8, 9],
                                  [0, 1, 1, 1, 2, 2, 3, 4, 5, 6, 6, 6, 8, 9],
                                  [0, 1, 2, 2, 1, 2, 3, 4, 5, 6, 7, 7, 8, 9]]


def test_golden_image_into_text_with_pause_after_left_padding(tq):
    """Row (after 2 left pads): <vs> I00 I01 I10 I11 <ve> a A (A labelled). I10 ~ a, so
    image_into_text copies I10 after a; one pause token before the answer A.
    Baseline: <vs> 0, I (1,1,1) (1,1,2) (1,2,1) (1,2,2), <ve> 3, a 4, A 5; pads 0.
    The copy takes its host a's (4,4,4); the pause the original before it, a: (4,4,4)."""
    model, _ = tq
    a_id = len(SPECIAL_TOKENS) + 20
    ids = torch.tensor([[0, 0, VS, IM, IM, IM, IM, VE, a_id, a_id + 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
    labels = torch.full_like(ids, -100)
    labels[0, 9] = a_id + 1
    pos, _ = model.model.get_rope_index(input_ids=ids, mm_token_type_ids=(ids == IM).int(),
                                        image_grid_thw=torch.tensor([[1, 4, 4]]),
                                        attention_mask=mask)
    assert pos[:, 0].tolist() == [[0, 0, 0, 1, 1, 1, 1, 3, 4, 5], [0, 0, 0, 1, 1, 2, 2, 3, 4, 5],
                                  [0, 0, 0, 1, 2, 1, 2, 3, 4, 5]]
    embeds = torch.stack([_one_hot(k) for k in range(10)])[None]
    embeds[0, 8] = embeds[0, 5]  # a == I10
    cand = torch.zeros_like(ids, dtype=torch.bool)
    cand[0, 8] = True
    out = regroup(embeds, mask, ids == IM, cand, labels,
                  AnchorConfig(strategy="image_into_text", threshold=0.9, pause_tokens=1),
                  pause_embedding=torch.zeros(16))
    # One row: the regrouped width is its 10 tokens, the two pad columns are gone.
    assert out.origin[0].tolist() == [2, 3, 4, 5, 6, 7, 8, 5, -1, 9]
    assert out.inserted[0].tolist() == [False] * 7 + [True, True, False]
    got = map_positions(pos, out)
    #           <vs> I00 I01 I10 I11 <ve> a I10* P  A
    assert got[:, 0].tolist() == [[0, 1, 1, 1, 1, 3, 4, 4, 4, 5],
                                  [0, 1, 1, 2, 2, 3, 4, 4, 4, 5],
                                  [0, 1, 2, 1, 2, 3, 4, 4, 4, 5]]


def _greedy_no_cache(model, embeds, mask, pos, steps, eos, pad):
    """Cache-free greedy decoding: the whole sequence every step, positions last + 1 on all
    three axes; finished rows emit pad (as HF's generate)."""
    table = model.get_input_embeddings()
    new, done = [], torch.zeros(embeds.shape[0], dtype=torch.bool)
    for _ in range(steps):
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                       use_cache=False).logits[:, -1]
        tok = torch.where(done, pad, logits.argmax(-1))
        new.append(tok)
        done |= tok == eos
        embeds = torch.cat([embeds, table(tok)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = torch.cat([pos, pos[..., -1:] + 1], -1)
        if done.all():
            break
    return torch.stack(new, 1)


def test_anchored_generation_equals_cache_free_loop(tq):
    model, processor = tq
    inp = hf_inputs(processor, "left")
    ids = inp["input_ids"]
    # Candidates: the question words (ids of WORDS), never vision_start/end or image pads.
    cand = (ids >= len(SPECIAL_TOKENS) + 8) & (inp["attention_mask"] == 1)
    vlm = AnchoredVLM(model, AnchorConfig(strategy="text_into_image", threshold=None,
                                          top_fraction=1.0))
    with torch.no_grad():
        got = vlm.generate(ids, inp["pixel_values"], inp["attention_mask"], cand,
                           image_grid_thw=inp["image_grid_thw"],
                           mm_token_type_ids=inp["mm_token_type_ids"], max_new_tokens=6,
                           do_sample=False)
        r = vlm.last_regrouped
        assert int(r.num_anchors.sum()) == int(cand.sum())  # every candidate copied
        fam = QwenVLFamily()
        base = fam.baseline(model, ids, inp["attention_mask"], images_of(inp))
        pos = fam.positions(base, r)
        # The last prompt column holds each row's largest triple, so HF's "last + 1" decode
        # positions are "max + 1" on every axis, as for the unanchored prompt.
        assert torch.equal(pos[..., -1], pos.amax(-1))
        ref = _greedy_no_cache(model, r.inputs_embeds, r.attention_mask, pos, 6,
                               model.generation_config.eos_token_id,
                               model.generation_config.pad_token_id)
    assert torch.equal(got[:, :ref.shape[1]], ref)
    # Every original keeps its baseline triple; copies sit on their host's.
    orig = (r.origin >= 0) & ~r.inserted
    for b in range(2):
        assert torch.equal(pos[:, b, orig[b]], base.position_ids[:, b, r.origin[b, orig[b]]])
        copy = r.inserted[b] & (r.origin[b] >= 0)
        assert torch.equal(pos[:, b, copy], base.position_ids[:, b, r.host[b, copy]])


def test_lora_trains_with_anchoring_and_loss_falls(tq):
    from peft import LoraConfig, get_peft_model
    model, processor = tq
    torch.manual_seed(0)
    inp = hf_inputs(processor, "right")
    ids = inp["input_ids"]
    labels = torch.full_like(ids, -100)
    last = inp["attention_mask"].sum(1) - 1
    labels[0, last[0]], labels[1, last[1]] = ids[0, last[0]], ids[1, last[1]]
    cand = (ids >= len(SPECIAL_TOKENS) + 8) & (inp["attention_mask"] == 1) & (labels == -100)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    vlm = AnchoredVLM(peft_model, AnchorConfig(strategy="text_into_image", threshold=None,
                                               top_fraction=1.0))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    try:
        for _ in range(8):
            out = vlm(ids, inp["pixel_values"], inp["attention_mask"], labels, cand,
                      image_grid_thw=inp["image_grid_thw"],
                      mm_token_type_ids=inp["mm_token_type_ids"])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss))
        assert vlm.last_stats["anchors_mean"] > 0
    finally:
        peft_model.unload()  # the module-scoped model returns to its plain weights
    assert losses[-1] < 0.9 * losses[0], losses  # measured: 3.25 -> 2.66


def test_baseline_without_mm_token_type_ids_and_missing_grid(tq):
    model, processor = tq
    inp = hf_inputs(processor, "right")
    fam = QwenVLFamily()
    with torch.no_grad():
        full = fam.baseline(model, inp["input_ids"], inp["attention_mask"], images_of(inp))
        derived = fam.baseline(model, inp["input_ids"], inp["attention_mask"],
                               {"pixel_values": inp["pixel_values"],
                                "image_grid_thw": inp["image_grid_thw"]})
        assert torch.equal(derived.position_ids, full.position_ids)
        assert torch.equal(derived.embeds, full.embeds)
        with pytest.raises(ValueError, match="image_grid_thw"):
            fam.baseline(model, inp["input_ids"], inp["attention_mask"],
                         {"pixel_values": inp["pixel_values"]})


def test_text_only_batch_runs_the_tower_and_keeps_text_positions(tq):
    """No image: the tower runs on a dummy image whose features enter as + 0; positions are
    the plain count on all three axes, pads 0 (right padding: row 1 has 3 real tokens)."""
    model, _ = tq
    w = len(SPECIAL_TOKENS) + 8
    ids = torch.tensor([[1, w, w + 1, w + 2, 2], [1, w, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        base = QwenVLFamily().baseline(model, ids, mask, None)
        assert torch.equal(base.embeds, model.get_input_embeddings()(ids))
        assert base.position_ids[:, 1].tolist() == [[0, 1, 2, 0, 0]] * 3
        assert base.position_ids[:, 0].tolist() == [[0, 1, 2, 3, 4]] * 3
        ref = model(input_ids=ids, attention_mask=mask).logits
        got = AnchoredVLM(model, AnchorConfig(strategy="none"))(ids, None, mask).logits
    assert torch.equal(got[mask.bool()], ref[mask.bool()])
