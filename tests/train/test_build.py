"""load_model / configure_trainable / trainable_state_dict / count_parameters on a tiny LLaVA.

Hand-checked parameter counts (tiny LLaVA: CLIP 64 wide, Llama 128 wide, MLP 256, 2 layers):
LoRA r=8 on the LLM per layer: q,k,v,o 4 * (8*128 + 128*8) = 8192; gate,up 2 * (8*128 + 256*8)
= 6144; down 8*256 + 128*8 = 3072 -> 17408 per layer, 34816 for 2. Projector linear_1 (64->128)
and linear_2 (128->128): LoRA 1536 + 2048 = 3584; full weights 8320 + 16512 = 24832.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from attanchor.train.build import (
    DEFAULT_LORA_TARGETS,
    configure_trainable,
    count_parameters,
    load_model,
    projector_linear_names,
    trainable_state_dict,
)
from tests.train import build_tiny_llava_dir, random_batch

TOTAL = 513_664  # every parameter of the tiny LLaVA
LLM_LORA = 34_816
PROJ_LORA = 3_584
PROJ_FULL = 24_832


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_llava_dir(tmp_path_factory.mktemp("tiny-llava-build"))


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _train(model, steps: int = 4, lr: float = 1e-3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = random_batch(2, seed=1)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- load_model


def test_load_model_defaults(tiny_dir):
    model = load_model(str(tiny_dir))
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    assert count_parameters(model) == (TOTAL, TOTAL)


def test_load_model_dtype_attention_checkpointing(tiny_dir):
    model = load_model(str(tiny_dir), dtype="bfloat16", attn_implementation="sdpa",
                       gradient_checkpointing=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "sdpa"
    assert model.model.language_model.gradient_checkpointing
    assert model.config.use_cache is False


def test_load_model_rejects_bad_options(tiny_dir):
    with pytest.raises(ValueError, match="dtype='fp8'"):
        load_model(str(tiny_dir), dtype="fp8")
    with pytest.raises(ValueError, match="quantization='int3'"):
        load_model(str(tiny_dir), quantization="int3")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        model = configure_trainable(load_model(str(tiny_dir), gradient_checkpointing=gc),
                                    mode="lora", lora_dropout=0.0)
        model(**random_batch(2, seed=3)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_load_nf4_quantizes_the_llm_only(tiny_dir):
    import bitsandbytes as bnb

    model = load_model(str(tiny_dir), quantization="nf4")
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # 7 projections x 2 layers, nothing in the vision tower, projector or LM head
    assert len(four_bit) == 14
    assert all(n.startswith("model.language_model.layers.") for n in four_bit)
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules()
               if isinstance(m, bnb.nn.Linear4bit))
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert count_parameters(model)[0] == 0  # prepared for k-bit training: all frozen
    assert count_parameters(model)[1] == TOTAL  # 4-bit weights counted unpacked


# --------------------------------------------------------------------------- full mode


def test_full_pretrain_trains_the_projector_only(tiny_dir):
    model = configure_trainable(load_model(str(tiny_dir)), stage="pretrain", mode="full")
    assert _trainable_names(model) == {
        "model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
        "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias",
    }
    assert count_parameters(model) == (PROJ_FULL, TOTAL)
    losses = _train(model)
    assert losses[-1] < losses[0]


def test_full_finetune_trains_llm_and_projector(tiny_dir):
    model = configure_trainable(load_model(str(tiny_dir)), stage="finetune", mode="full")
    names = _trainable_names(model)
    assert not any(n.startswith("model.vision_tower.") for n in names)
    assert "lm_head.weight" in names and "model.language_model.embed_tokens.weight" in names
    assert "model.multi_modal_projector.linear_1.weight" in names
    frozen_vision = sum(p.numel() for n, p in model.named_parameters()
                        if n.startswith("model.vision_tower."))
    assert count_parameters(model) == (TOTAL - frozen_vision, TOTAL)
    losses = _train(model)
    assert losses[-1] < losses[0]


def test_full_finetune_with_vision_tower(tiny_dir):
    model = configure_trainable(load_model(str(tiny_dir)), mode="full", freeze_vision_tower=False)
    assert count_parameters(model) == (TOTAL, TOTAL)
    no_projector = configure_trainable(load_model(str(tiny_dir)), mode="full",
                                       train_projector=False)
    assert not any("multi_modal_projector" in n for n in _trainable_names(no_projector))


# --------------------------------------------------------------------------- lora / qlora


def _lora_modules(model) -> set[str]:
    return {n.split(".lora_")[0].removeprefix("base_model.model.")
            for n in _trainable_names(model) if ".lora_" in n}


def test_lora_finetune_targets_llm_and_projector(tiny_dir):
    base = load_model(str(tiny_dir))
    model = configure_trainable(base, mode="lora", lora_r=8, lora_alpha=16)
    adapted = _lora_modules(model)
    llm = {f"model.language_model.layers.{i}.{kind}"
           for i in range(2)
           for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    projector = {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
    assert adapted == llm | projector  # nothing in CLIP, whose attention also has q/k/v_proj
    assert all(".lora_A." in n or ".lora_B." in n for n in _trainable_names(model))
    assert count_parameters(model) == (LLM_LORA + PROJ_LORA, TOTAL + LLM_LORA + PROJ_LORA)
    losses = _train(model)
    assert losses[-1] < losses[0]


def test_lora_projector_full_uses_modules_to_save(tiny_dir):
    model = configure_trainable(load_model(str(tiny_dir)), mode="lora", projector_mode="full")
    names = _trainable_names(model)
    assert {n for n in names if "multi_modal_projector" in n} == {
        f"base_model.model.model.multi_modal_projector.modules_to_save.default.linear_{i}.{w}"
        for i in (1, 2) for w in ("weight", "bias")
    }
    assert count_parameters(model)[0] == LLM_LORA + PROJ_FULL


def test_lora_without_projector_and_custom_regex(tiny_dir):
    model = configure_trainable(load_model(str(tiny_dir)), mode="lora", train_projector=False,
                                lora_target_modules=r".*language_model.*\.q_proj")
    assert _lora_modules(model) == {f"model.language_model.layers.{i}.self_attn.q_proj"
                                    for i in range(2)}
    listed = configure_trainable(load_model(str(tiny_dir)), mode="lora",
                                 lora_target_modules=["language_model.layers.0.mlp.down_proj"])
    assert _lora_modules(listed) == {"model.language_model.layers.0.mlp.down_proj",
                                     *projector_linear_names(load_model(str(tiny_dir)))}


def test_lora_pretrain_adapts_the_projector_only(tiny_dir):
    model = configure_trainable(load_model(str(tiny_dir)), stage="pretrain", mode="lora")
    assert _lora_modules(model) == {"model.multi_modal_projector.linear_1",
                                    "model.multi_modal_projector.linear_2"}
    assert count_parameters(model)[0] == PROJ_LORA


def test_lora_with_trainable_vision_tower(tiny_dir):
    model = configure_trainable(load_model(str(tiny_dir)), mode="lora", freeze_vision_tower=False)
    vision = [n for n in _trainable_names(model) if ".vision_tower.modules_to_save." in n]
    assert vision and not any("lora_" in n for n in vision)


def test_default_regex_is_documented():
    assert "language_model" in DEFAULT_LORA_TARGETS and "q_proj" in DEFAULT_LORA_TARGETS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "qlora"}, "needs a 4-bit model"),
        ({"stage": "pretrain", "train_projector": False}, "projector only"),
        ({"stage": "pretrain", "mode": "lora", "projector_mode": "full"}, "no adapter"),
        ({"stage": "pretrain", "freeze_vision_tower": False}, "freeze_vision_tower=True"),
        ({"stage": "align"}, "stage='align'"),
        ({"mode": "dora"}, "mode='dora'"),
        ({"projector_mode": "half"}, "projector_mode='half'"),
    ],
)
def test_configure_trainable_rejects(tiny_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        configure_trainable(load_model(str(tiny_dir)), **kwargs)


def test_configure_trainable_needs_the_unwrapped_model(tiny_dir):
    model = configure_trainable(load_model(str(tiny_dir)), mode="lora")
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        configure_trainable(model, mode="lora")


def test_quantized_model_needs_qlora(tiny_dir):
    with pytest.raises(ValueError, match="use mode='qlora'"):
        configure_trainable(load_model(str(tiny_dir), quantization="nf4"), mode="lora")


def test_qlora_trains_after_an_eval_forward(tiny_dir):
    """The avx512_bf16 trap: a no-grad eval forward must not stop later gradients."""
    model = configure_trainable(load_model(str(tiny_dir), quantization="nf4"), mode="qlora",
                                lora_dropout=0.0)
    assert count_parameters(model) == (LLM_LORA + PROJ_LORA, TOTAL + LLM_LORA + PROJ_LORA)
    model.eval()
    with torch.no_grad():
        model(**random_batch(2, seed=5))
    model.train()
    losses = _train(model)
    assert losses[-1] < losses[0]
    model(**random_batch(2, seed=6)).loss.backward()
    lora_a = [p.grad for n, p in model.named_parameters()
              if "language_model" in n and "lora_A" in n]
    assert len(lora_a) == 14 and all(g is not None and g.abs().sum() > 0 for g in lora_a)


# --------------------------------------------------------------------------- state dicts


def test_trainable_state_dict_round_trip(tiny_dir):
    torch.manual_seed(0)
    trained = configure_trainable(load_model(str(tiny_dir)), mode="lora", lora_dropout=0.0)
    _train(trained, steps=2)
    sd = trainable_state_dict(trained)
    assert set(sd) == _trainable_names(trained)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in sd.values())
    # a copy: changing the model afterwards leaves the snapshot alone
    key = next(iter(sd))
    before = sd[key].clone()
    with torch.no_grad():
        dict(trained.named_parameters())[key].add_(1.0)
    assert torch.equal(sd[key], before)

    fresh = configure_trainable(load_model(str(tiny_dir)), mode="lora", lora_dropout=0.0)
    result = fresh.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        dict(trained.named_parameters())[key].sub_(1.0)
        batch = random_batch(2, seed=9)
        torch.testing.assert_close(fresh(**batch).logits, trained(**batch).logits)
