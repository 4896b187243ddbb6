"""AnchoredVLM against Hugging Face's own LLaVA: exactness, anchored forward and generate."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from tests.anchoring import padded_batch

IMG = 5  # image token id
PAD = 0
M = 16  # 32x32 image, patch 8 -> 16 patches


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
    text = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, pad_token_id=PAD,
                       bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


def batch(padding: str = "right", answers: bool = True) -> dict[str, torch.Tensor]:
    """Two rows: [bos, <image>*16, prompt..., (answer...)], the second one shorter."""
    g = torch.Generator().manual_seed(1)
    rows, labels, cands = [], [], []
    for n_prompt, n_ans in ((6, 3), (3, 2)):
        prompt = torch.randint(10, 64, (n_prompt,), generator=g).tolist()
        ans = torch.randint(10, 64, (n_ans,), generator=g).tolist() if answers else []
        ids = [1] + [IMG] * M + prompt + ans
        rows.append(ids)
        labels.append([-100] * (1 + M + n_prompt) + ans)
        cands.append([False] * (1 + M) + [True] * n_prompt + [False] * len(ans))
    t = padded_batch(rows, labels, cands, padding=padding, pad_id=PAD)
    t["pixel_values"] = torch.randn(2, 3, 32, 32, generator=g)
    return t


@pytest.fixture(scope="module")
def model() -> LlavaForConditionalGeneration:
    return tiny_llava()


@pytest.mark.parametrize("cfg", [AnchorConfig(strategy="none"), AnchorConfig(threshold=1.5)])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_inactive_forward_equals_hf_exactly(model, cfg, padding):
    b = batch(padding)
    ref = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                attention_mask=b["attention_mask"], labels=b["labels"])
    out = AnchoredVLM(model, cfg)(**b)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)


def test_baseline_embeds_match_hf_internals(model):
    """Our public-API baseline sequence equals what HF's LlavaModel feeds its LM."""
    b = batch()
    captured = {}
    def grab(module, args, kwargs, output):
        captured["e"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_hook(grab, with_kwargs=True)
    model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
          attention_mask=b["attention_mask"])
    hook.remove()
    embeds, image_mask = AnchoredVLM(model, AnchorConfig()).baseline_embeds(
        b["input_ids"], b["pixel_values"])
    assert torch.equal(embeds, captured["e"])
    assert image_mask.sum(dim=1).tolist() == [M, M]


def test_active_with_no_anchor_keeps_hf_logits_on_real_tokens(model):
    """threshold 1.0 keeps anchoring on but selects nothing: same sequence, same logits."""
    b = batch("right")
    ref = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                attention_mask=b["attention_mask"], labels=b["labels"])
    wrapped = AnchoredVLM(model, AnchorConfig(threshold=1.0))
    out = wrapped(**b)
    real = b["attention_mask"].bool()
    assert wrapped.last_anchor_counts.tolist() == [0, 0]
    assert torch.equal(out.logits[real], ref.logits[real])
    assert torch.equal(out.loss, ref.loss)


def test_anchored_forward_lengthens_and_trains_only_real_labels(model):
    b = batch("right")
    wrapped = AnchoredVLM(model, AnchorConfig(threshold=None, top_fraction=0.5))
    out = wrapped(**b)
    r = wrapped.last_regrouped
    # ceil(0.5 * 6) = 3 and ceil(0.5 * 3) = 2 copies.
    assert r.num_anchors.tolist() == [3, 2]
    assert out.logits.shape == (2, b["input_ids"].shape[1] + 3, 64)
    assert (r.labels[r.inserted] == -100).all()
    # The same supervised tokens, in order, per row.
    for row in range(2):
        got = r.labels[row][r.labels[row] != -100].tolist()
        want = b["labels"][row][b["labels"][row] != -100].tolist()
        assert got == want
    assert wrapped.last_stats["anchors_max"] == 3.0
    assert wrapped.last_stats["growth_pct"] == pytest.approx(100 * 5 / (26 + 22))
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    model.zero_grad()


def test_missing_candidate_mask_and_mismatched_image_tokens(model):
    b = batch()
    wrapped = AnchoredVLM(model, AnchorConfig())
    with pytest.raises(ValueError, match="candidate_mask"):
        wrapped(b["input_ids"], b["pixel_values"], b["attention_mask"])
    with pytest.raises(ValueError, match="image features"):
        wrapped(**{**b, "pixel_values": b["pixel_values"][:1]})
    with pytest.raises(ValueError, match="pixel_values is None"):
        wrapped(**{**b, "pixel_values": None})


def test_generate_inactive_equals_hf_greedy(model):
    b = batch("left", answers=False)
    kw = dict(max_new_tokens=6, do_sample=False)
    ref = model.generate(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                         attention_mask=b["attention_mask"], **kw)
    got = AnchoredVLM(model, AnchorConfig(strategy="none")).generate(
        b["input_ids"], b["pixel_values"], b["attention_mask"], **kw)
    assert torch.equal(got, ref[:, b["input_ids"].shape[1]:])


def manual_greedy(model, r, steps: int) -> torch.Tensor:
    """Greedy decode by re-running the full regrouped prompt each step, no cache."""
    embeds, mask, pos = r.inputs_embeds, r.attention_mask, r.position_ids
    table = model.get_input_embeddings()
    tokens = []
    for _ in range(steps):
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        nxt = logits[:, -1].argmax(-1)
        tokens.append(nxt)
        embeds = torch.cat([embeds, table(nxt)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("cfg", [
    AnchorConfig(threshold=None, top_fraction=0.5),
    AnchorConfig(strategy="image_into_text", threshold=None, top_fraction=0.25, pause_tokens=2),
])
def test_anchored_generate_equals_manual_greedy(model, cfg):
    b = batch("left", answers=False)
    wrapped = AnchoredVLM(model, cfg)
    with torch.no_grad():
        got = wrapped.generate(b["input_ids"], b["pixel_values"], b["attention_mask"],
                               candidate_mask=b["candidate_mask"], max_new_tokens=5,
                               do_sample=False, eos_token_id=None)
        r = wrapped.last_regrouped
        assert int(r.inserted.sum()) > 0
        want = manual_greedy(model, r, 5)
    assert torch.equal(got, want)


def test_generate_rejects_right_padding(model):
    b = batch("right", answers=False)
    with pytest.raises(ValueError, match="left"):
        AnchoredVLM(model, AnchorConfig()).generate(b["input_ids"], b["pixel_values"],
                                                     b["attention_mask"], b["candidate_mask"])


def test_peft_wrapped_frozen_tower_gets_lora_gradients():
    model = tiny_llava(seed=3)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    b = batch("right")
    none = AnchoredVLM(peft_model, AnchorConfig(strategy="none"))(**b)
    ref = peft_model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                     attention_mask=b["attention_mask"], labels=b["labels"])
    assert torch.equal(none.logits, ref.logits)
    out = AnchoredVLM(peft_model, AnchorConfig(threshold=None, top_fraction=0.5))(**b)
    out.loss.backward()
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_anchored_generate_on_an_unpadded_batch_pads_left(model):
    """Equal-length prompts gain different numbers of copies: the output is left-padded."""
    b = batch("left", answers=False)
    keep = b["attention_mask"][1].bool()
    one = {k: v[1:2, keep] if v.dim() == 2 else v[1:2] for k, v in b.items()}
    two = {k: torch.cat([v, v]) for k, v in one.items()}
    two["candidate_mask"][1] = False  # row 1: no candidates, no copies
    wrapped = AnchoredVLM(model, AnchorConfig(threshold=None, top_fraction=0.5))
    got = wrapped.generate(two["input_ids"], two["pixel_values"], two["attention_mask"],
                           candidate_mask=two["candidate_mask"], max_new_tokens=3,
                           do_sample=False, eos_token_id=None)
    r = wrapped.last_regrouped
    assert r.num_anchors.tolist() == [2, 0]
    assert r.attention_mask[1, :2].tolist() == [0, 0] and r.attention_mask[:, -1].all()
    assert got.shape == (2, 3)
