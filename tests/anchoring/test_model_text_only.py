"""Batches without images: the vision tower and projector still run (a dummy image whose
features enter multiplied by zero), values stay Hugging Face's own, gradients exist (zero).
Also: the pause embedding goes through the embedding module's forward, and the random
control's placements follow the sample, not its batch."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from tests.anchoring.test_model import IMG, PAD, batch, tiny_llava

INACTIVE = [AnchorConfig(strategy="none"), AnchorConfig(threshold=1.5)]
ACTIVE = [AnchorConfig(threshold=None, top_fraction=0.5),
          AnchorConfig(strategy="image_into_text", threshold=None, top_fraction=0.5,
                       pause_tokens=2),
          AnchorConfig(strategy="random", threshold=None, top_fraction=0.5)]


def text_only(padding: str = "right") -> dict[str, torch.Tensor]:
    """The test_model batch without its image tokens and pixels: rows of 10 and 6 tokens
    (bos, prompt, answer), the second padded on ``padding``'s side."""
    b = batch("right")
    keep = b["input_ids"][0] != IMG  # right-padded: the image span is columns 1..16 in both
    out = {k: b[k][:, keep] for k in ("input_ids", "attention_mask", "labels", "candidate_mask")}
    if padding == "left":  # move each row's padding to its front
        shift = (out["attention_mask"] == 0).sum(dim=1).tolist()
        out = {k: torch.stack([v[i].roll(n) for i, n in enumerate(shift)]) for k, v in out.items()}
    assert not (out["input_ids"] == IMG).any()
    assert out["attention_mask"].sum(dim=1).tolist() == [10, 6]
    out["pixel_values"] = None
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


class Calls:
    """Counts forward calls of a module and records the inputs of each."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(
            lambda mod, args, out: self.inputs.append(args[0].detach().clone()))

    def __enter__(self) -> Calls:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize("cfg", INACTIVE)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_text_only_equals_hf_text_only_forward_exactly(model, cfg, padding):
    b = text_only(padding)
    ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    with Calls(model.model.vision_tower) as tower, Calls(model.model.multi_modal_projector) as proj:
        out = AnchoredVLM(model, cfg)(**b)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    # The tower ran once, on one zero image of its own input shape: (1, 3, 32, 32).
    assert len(tower.inputs) == len(proj.inputs) == 1
    assert tower.inputs[0].shape == (1, 3, 32, 32) and not tower.inputs[0].any()


@pytest.mark.parametrize("cfg", ACTIVE)
def test_text_only_anchored_is_the_text_only_forward(model, cfg):
    """No image: nothing to copy (pause tokens aside), the tower still runs once."""
    b = text_only("right")
    with Calls(model.model.vision_tower) as tower:
        wrapped = AnchoredVLM(model, cfg)
        out = wrapped(**b)
    assert len(tower.inputs) == 1
    assert wrapped.last_anchor_counts.tolist() == [0, 0]
    if not cfg.pause_tokens:
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    labels=b["labels"])
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("cfg", [INACTIVE[0], ACTIVE[0]])
def test_text_only_projector_gets_zero_gradients_tower_none(cfg):
    """LoRA with the projector adapted and the tower frozen (the demo recipe): every trainable
    weight gets a gradient (zero for the projector), so DDP's reducer sees all of them."""
    model = tiny_llava(seed=3)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,  # B != 0: the projector path is live
        target_modules=r".*(language_model.*\.(q_proj|v_proj)|multi_modal_projector\.linear_\d)"))
    AnchoredVLM(peft_model, cfg)(**text_only()).loss.backward()
    named = dict(peft_model.named_parameters())
    projector = [p for n, p in named.items() if "multi_modal_projector" in n and "lora_" in n]
    llm = [p for n, p in named.items() if "language_model" in n and "lora_" in n]
    assert len(projector) == 4 and llm
    assert all(p.grad is not None and not p.grad.any() for p in projector)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in llm)
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_generate_text_only_equals_hf_and_runs_the_tower(model):
    b = text_only("left")
    kw = dict(max_new_tokens=4, do_sample=False)
    ref = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kw)
    for cfg in (INACTIVE[0], ACTIVE[0]):
        with Calls(model.model.vision_tower) as tower:
            got = AnchoredVLM(model, cfg).generate(
                b["input_ids"], None, b["attention_mask"], candidate_mask=b["candidate_mask"],
                eos_token_id=None, **kw)
        assert len(tower.inputs) == 1
        assert torch.equal(got, ref[:, b["input_ids"].shape[1]:]), cfg.strategy


def test_pause_embedding_is_looked_up_through_the_embedding_forward(model):
    """ZeRO-3 empties ``weight`` outside a forward: the pad row must come from forward()."""
    cfg = AnchorConfig(strategy="image_into_text", threshold=None, top_fraction=0.5,
                       pause_tokens=2)
    wrapped = AnchoredVLM(model, cfg)
    with Calls(model.get_input_embeddings()) as table:
        wrapped(**batch("right"))
    assert [t.tolist() for t in table.inputs[1:]] == [[PAD]]  # after the (B, L) lookup
    r = wrapped.last_regrouped
    pauses = r.inputs_embeds[r.inserted & (r.origin < 0)]
    assert pauses.shape == (4, 64)
    assert torch.equal(pauses, model.get_input_embeddings().weight[PAD].detach().expand(4, 64))


def test_random_placement_follows_the_sample_through_the_model(model):
    """Batch [s0, s1] and batch [s1, s0] (left-padded, reordered): each sample's copies land
    on the same image tokens (offsets from its first token); another epoch moves them."""
    cfg = AnchorConfig(strategy="random", threshold=None, top_fraction=1.0)
    wrapped = AnchoredVLM(model, cfg)
    b = batch("right")
    ids = torch.tensor([101, 202])

    def placements(r, row):
        real = r.attention_mask[row].bool() & ~r.inserted[row]
        first = int(r.origin[row][real].min())  # the sample's first token, as an input column
        copies = r.inserted[row] & (r.origin[row] >= 0)
        return sorted(zip((r.origin[row][copies] - first).tolist(),
                          (r.host[row][copies] - first).tolist()))

    wrapped(**b, sample_index=ids)
    one = [placements(wrapped.last_regrouped, i) for i in range(2)]
    flipped = batch("left")
    flipped = {k: v.flip(0) for k, v in flipped.items()}  # rows swapped; pixels follow
    wrapped(**flipped, sample_index=ids.flip(0))
    two = [placements(wrapped.last_regrouped, i) for i in range(2)][::-1]
    assert one == two and all(one)
    wrapped(**b, sample_index=ids, epoch=1)
    assert [placements(wrapped.last_regrouped, i) for i in range(2)] != one
