"""family_for and the family seam: picked by class, peft-unwrapped, loud on anything else."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from attanchor.anchoring import AnchorConfig, regroup
from attanchor.anchoring.family import (
    Baseline,
    LlavaFamily,
    LlavaNextFamily,
    family_for,
    unwrap,
)
from attanchor.data.tiny import tiny_llava_config
from attanchor.data.tiny_next import tiny_next_config


def test_family_for_picks_by_class_through_peft():
    llava = LlavaForConditionalGeneration(tiny_llava_config(40, image_size=16))
    nxt = LlavaNextForConditionalGeneration(tiny_next_config(40))
    assert type(family_for(llava)) is LlavaFamily and family_for(llava).name == "llava"
    assert type(family_for(nxt)) is LlavaNextFamily and family_for(nxt).name == "llava_next"
    peft = get_peft_model(nxt, LoraConfig(r=2, target_modules=r".*language_model.*q_proj"))
    assert unwrap(peft) is nxt and type(family_for(peft)) is LlavaNextFamily
    assert family_for(llava).image_keys == ("pixel_values",)
    assert family_for(nxt).image_keys == ("pixel_values", "image_sizes")


def test_unsupported_class_names_the_supported_ones():
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM") as err:
        family_for(lm)
    for name in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                 "Qwen2_5_VLForConditionalGeneration"):
        assert name in str(err.value)


def test_one_d_positions_are_the_regroups_own():
    """LLaVA and NeXT: positions(base, out) is out.position_ids, the same tensor."""
    embeds = torch.randn(1, 4, 8)
    mask = torch.ones(1, 4, dtype=torch.long)
    image = torch.tensor([[False, True, True, False]])
    base = Baseline(embeds, image, None)
    out = regroup(embeds, mask, image, torch.tensor([[False, False, False, True]]), None,
                  AnchorConfig(threshold=-1.0))
    assert out.position_ids.tolist() == [[0, 1, 2, 3, 4]]
    for fam in (LlavaFamily(), LlavaNextFamily()):
        assert fam.positions(base, out) is out.position_ids


def test_llava_host_mask_is_every_image_token():
    llava = LlavaForConditionalGeneration(tiny_llava_config(40, image_size=16))
    ids = torch.tensor([[1, 4, 4, 4, 4, 9]])  # image token id 4
    assert LlavaFamily().host_mask(llava, ids, None).tolist() == [[False] + [True] * 4 + [False]]
