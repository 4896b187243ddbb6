"""The FSDP wrap policy finds the repeated layers from the model; ZeRO-3 loading refuses
non-stage-3 configs and checkpoints it cannot read."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from attanchor.train.sharding import DecoderLayerWrapPolicy, safetensors_files, zero3_loading_config
from attanchor.train.strategies import build_strategy
from tests.train import tiny_llava_config


def _meta_llava() -> LlavaForConditionalGeneration:
    with torch.device("meta"):
        return LlavaForConditionalGeneration(tiny_llava_config())


def test_wrap_policy_finds_decoder_and_vision_layers():
    model = _meta_llava()
    # CLIPVisionEmbeddings is in _no_split_modules too, but it is not a repeated layer
    assert DecoderLayerWrapPolicy.layer_classes(model) == {"LlamaDecoderLayer",
                                                           "CLIPEncoderLayer"}
    policy = DecoderLayerWrapPolicy()
    assert policy(module=model, recurse=True, nonwrapped_numel=0)  # the root: descend
    layer = model.model.language_model.layers[0]
    assert policy(module=layer, recurse=False, nonwrapped_numel=0)
    assert not policy(module=model.lm_head, recurse=False, nonwrapped_numel=0)
    assert policy(module=model.model.vision_tower.encoder.layers[1], recurse=False,
                  nonwrapped_numel=0)


def test_fsdp_strategy_gets_the_policy_by_default():
    fsdp = build_strategy("fsdp", accelerator="cpu")
    assert isinstance(fsdp.kwargs["auto_wrap_policy"], DecoderLayerWrapPolicy)


def test_wrap_policy_refuses_a_model_without_layers():
    with pytest.raises(ValueError, match="no transformers layer class"):
        DecoderLayerWrapPolicy.layer_classes(torch.nn.Linear(2, 2))


def test_zero3_loading_needs_stage_3_and_safetensors(tmp_path):
    with pytest.raises(ValueError, match="zero_optimization.stage=2"):
        zero3_loading_config({"zero_optimization": {"stage": 2}})
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        safetensors_files(str(tmp_path))


def test_clean_param_name_drops_wrapper_parts():
    from attanchor.train.sharding import clean_param_name

    assert clean_param_name("model.layers.0._fsdp_wrapped_module.mlp.weight") == \
        "model.layers.0.mlp.weight"
    assert clean_param_name("a._fsdp_wrapped_module._checkpoint_wrapped_module.b") == "a.b"
    assert clean_param_name("lm_head.weight") == "lm_head.weight"
