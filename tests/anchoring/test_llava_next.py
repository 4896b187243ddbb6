"""AnchoredVLM on LLaVA-NeXT against Hugging Face's own model: exactness, golden hosts, generate.

The tiny model: CLIP 32 px / patch 8 (4x4-feature tiles), pinpoints [[32, 64], [64, 32],
[64, 64]]. Image sizes used (H x W) and their packed blocks, hand-derived
(``attanchor.data.tiny_next`` module doc):
  40x80 -> pinpoint 32x64, grid 4 rows x 8 cols: 16 + 4 * (8 + 1) = 52 slots, newlines at
           24, 33, 42, 51;
  90x30 -> pinpoint 64x32, grid 8 x 4 unpadded to width 2 (aspect 3:1 -> 8 x 2.67 -> 2 cols):
           16 + 8 * (2 + 1) = 40 slots, newlines at 18, 21, ..., 39;
  32x32 -> pinpoint 32x64, grid 4 x 8 unpadded to 4 x 4: 16 + 4 * 5 = 36, newlines 20, 25, 30, 35.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.anchoring.family import LlavaNextFamily
from attanchor.data.tiny_next import tiny_next_config
from tests.anchoring import padded_batch

IMG, PAD, BOS = 4, 0, 1
V = 64
SIZES = [[40, 80], [90, 30], [32, 32]]  # row 0: two images; row 1: one
SLOTS = [52, 40, 36]


def tiny_next(seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(tiny_next_config(V)).eval()
    model.generation_config.pad_token_id = PAD
    return model


def batch(padding: str = "right", answers: bool = True) -> dict[str, torch.Tensor]:
    """Row 0: [bos, <img 52>, <img 40>, 3 prompt words, (3 answers)]; row 1: [bos, <img 36>,
    2 prompt words, (2 answers)]. Prompt words are ids 10, 11, 12 (row 0) and 10, 12 (row 1)."""
    g = torch.Generator().manual_seed(1)
    specs = [([52, 40], [10, 11, 12], [20, 21, 22]), ([36], [10, 12], [23, 24])]
    rows, labels, cands = [], [], []
    for slots, prompt, ans in specs:
        ans = ans if answers else []
        ids = [BOS] + [IMG] * sum(slots) + prompt + ans
        rows.append(ids)
        labels.append([-100] * (len(ids) - len(ans)) + ans)
        cands.append([False] * (1 + sum(slots)) + [True] * len(prompt) + [False] * len(ans))
    t = padded_batch(rows, labels, cands, padding=padding, pad_id=PAD)
    t["pixel_values"] = torch.randn(3, 3, 3, 32, 32, generator=g)  # (images, tiles, C, H, W)
    t["image_sizes"] = torch.tensor(SIZES)
    return t


def hf_inputs(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: b[k] for k in ("input_ids", "pixel_values", "image_sizes", "attention_mask")}


@pytest.fixture(scope="module")
def model() -> LlavaNextForConditionalGeneration:
    return tiny_next()


def test_layout_marks_newline_slots_through_the_public_api(model):
    layout = LlavaNextFamily().layout(model, torch.tensor(SIZES))
    assert [len(x) for x in layout] == SLOTS
    assert (layout[0] < 0).nonzero().flatten().tolist() == [24, 33, 42, 51]
    assert (layout[1] < 0).nonzero().flatten().tolist() == list(range(18, 40, 3))
    assert (layout[2] < 0).nonzero().flatten().tolist() == [20, 25, 30, 35]
    # 40x80: slots 0..15 the base tile; grid row 0 = tile 1 patches (0, 0..3) = 16..19, then
    # tile 2 patches (0, 0..3) = 32..35; grid row 1 starts at tile 1 patch (1, 0) = 20.
    assert layout[0][:16].tolist() == list(range(16))
    assert layout[0][16:25].tolist() == [16, 17, 18, 19, 32, 33, 34, 35, -1]
    assert layout[0][25] == 20


def test_baseline_equals_hf_internals_and_excludes_newlines(model):
    b = batch()
    captured = {}

    def grab(module, args, kwargs, output):
        captured["e"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_hook(grab, with_kwargs=True)
    model(**hf_inputs(b))
    hook.remove()
    wrapped = AnchoredVLM(model, AnchorConfig())
    embeds, image_mask = wrapped.baseline_embeds(b["input_ids"], b["pixel_values"],
                                                 image_sizes=b["image_sizes"])
    assert torch.equal(embeds, captured["e"])
    # Hosts: every slot but the newlines: 52 - 4 + 40 - 8 = 80 and 36 - 4 = 32.
    assert image_mask.sum(dim=1).tolist() == [80, 32]
    newline_pos = [1 + 24, 1 + 33, 1 + 42, 1 + 51, 1 + 52 + 18]
    assert not image_mask[0, newline_pos].any() and (b["input_ids"][0, newline_pos] == IMG).all()
    assert torch.equal(embeds[0, 1 + 24], model.model.image_newline.detach())


@pytest.mark.parametrize("cfg", [AnchorConfig(strategy="none"), AnchorConfig(threshold=1.5)])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_inactive_forward_equals_hf_exactly(model, cfg, padding):
    b = batch(padding)
    ref = model(**hf_inputs(b), labels=b["labels"])
    out = AnchoredVLM(model, cfg)(**b)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)


def test_active_without_copies_keeps_hf_logits_right_padded(model):
    """threshold 1.0: anchoring on, nothing selected: the regroup's own positions and
    embeddings give HF's logits on every real token."""
    b = batch("right")
    ref = model(**hf_inputs(b), labels=b["labels"])
    wrapped = AnchoredVLM(model, AnchorConfig(threshold=1.0))
    out = wrapped(**b)
    real = b["attention_mask"].bool()
    assert wrapped.last_anchor_counts.tolist() == [0, 0]
    assert torch.equal(out.logits[real], ref.logits[real])
    assert torch.equal(out.loss, ref.loss)


def test_generate_inactive_equals_hf_greedy(model):
    b = batch("left", answers=False)
    kw = dict(max_new_tokens=6, do_sample=False)
    ref = model.generate(**hf_inputs(b), **kw)
    got = AnchoredVLM(model, AnchorConfig(strategy="none")).generate(
        b["input_ids"], b["pixel_values"], b["attention_mask"], image_sizes=b["image_sizes"],
        **kw)
    assert torch.equal(got, ref[:, b["input_ids"].shape[1]:])


def test_golden_hosts_two_images_and_a_tile_row_end():
    """Word 10 in row 0 is set to image 2's slot 17 (the last tile feature of grid row 0,
    right before the newline slot 18), word 12 to the newline embedding itself (which may
    never host: it gets no copy), word 11 in row 1 absent; row 1's word 10 is unrelated.
    Expected with tau 0.999: row 0 one copy of its word 10 (position 1 + 52 + 40 = 93) after
    host 1 + 52 + 17 = 70, so the copy sits between slot 70 and the newline slot 71."""
    model = tiny_next(seed=2)
    b = batch("right")
    wrapped = AnchoredVLM(model, AnchorConfig(threshold=0.999))
    embeds, _ = wrapped.baseline_embeds(b["input_ids"], b["pixel_values"],
                                        image_sizes=b["image_sizes"])
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        table[10] = embeds[0, 70]
        table[12] = model.model.image_newline
    # Row 1 also holds word 10 but row 1's own image does not contain that feature.
    cos = torch.nn.functional.cosine_similarity(embeds[1, 1:37], table[10][None], dim=-1)
    assert cos.max() < 0.999
    wrapped(**b)
    r = wrapped.last_regrouped
    assert r.num_anchors.tolist() == [1, 0]
    at = int(r.inserted[0].nonzero())
    assert at == 71 and int(r.origin[0, at]) == 93 and int(r.host[0, at]) == 70
    assert r.origin[0, at - 1] == 70 and r.origin[0, at + 1] == 71  # 71: the newline slot
    assert r.position_ids[0, :at + 2].tolist() == list(range(at + 2))


def manual_greedy(model, r, steps: int) -> torch.Tensor:
    """Greedy decode by re-running the full regrouped prompt each step, no cache."""
    embeds, mask, pos = r.inputs_embeds, r.attention_mask, r.position_ids
    table = model.get_input_embeddings()
    tokens = []
    for _ in range(steps):
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                       use_cache=False).logits
        nxt = logits[:, -1].argmax(-1)
        tokens.append(nxt)
        embeds = torch.cat([embeds, table(nxt)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("cfg", [
    AnchorConfig(threshold=None, top_fraction=0.5),
    AnchorConfig(strategy="image_into_text", threshold=None, top_fraction=0.05),
])
def test_anchored_generate_equals_manual_greedy(model, cfg):
    b = batch("left", answers=False)
    wrapped = AnchoredVLM(model, cfg)
    with torch.no_grad():
        got = wrapped.generate(b["input_ids"], b["pixel_values"], b["attention_mask"],
                               candidate_mask=b["candidate_mask"], image_sizes=b["image_sizes"],
                               max_new_tokens=5, do_sample=False, eos_token_id=None)
        r = wrapped.last_regrouped
        assert int(r.inserted.sum()) > 0
        # No copy of or after a newline slot: every host is a non-newline image slot.
        newline = ~wrapped.baseline_embeds(b["input_ids"], b["pixel_values"],
                                           image_sizes=b["image_sizes"])[1] \
            & (b["input_ids"] == IMG)
        for row in range(2):
            copied = r.origin[row][r.inserted[row]]
            hosts = r.host[row][r.inserted[row]]
            assert not newline[row, copied].any() and not newline[row, hosts].any()
        want = manual_greedy(model, r, 5)
    assert torch.equal(got, want)


def test_missing_image_sizes_is_an_error(model):
    b = batch()
    b.pop("image_sizes")
    with pytest.raises(ValueError, match="image_sizes"):
        AnchoredVLM(model, AnchorConfig())(**b)


def test_text_only_batch_runs_the_tower_and_equals_hf(model):
    ids = torch.tensor([[BOS, 10, 11, 12], [BOS, 10, 0, 0]])
    mask = (torch.arange(4) < torch.tensor([[4], [2]])).long()
    ref = model(input_ids=ids, attention_mask=mask)
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    out = AnchoredVLM(model, AnchorConfig(strategy="none"))(ids, None, mask)
    hook.remove()
    assert calls and torch.equal(out.logits, ref.logits)
