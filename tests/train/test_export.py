"""export_model -> reload gives the same logits: merged and adapter, LoRA and QLoRA, full."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.train.build import configure_trainable, load_model
from attanchor.train.export import export_model, load_exported
from tests.train import build_tiny_llava_dir, random_batch

ANCHOR = AnchorConfig(strategy="text_into_image", threshold=0.1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_llava_dir(tmp_path_factory.mktemp("tiny-llava-export"))


@pytest.fixture(scope="session")
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


def _inputs() -> dict:
    batch = random_batch(2, seed=11)
    batch.pop("labels")
    return batch


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**_inputs()).logits


def _trained(tiny_dir, mode="lora", **kwargs):
    """A LoRA/QLoRA/full model after 3 steps at a high lr, so every adapter is non-zero."""
    torch.manual_seed(0)
    model = configure_trainable(
        load_model(str(tiny_dir), quantization="nf4" if mode == "qlora" else None),
        mode=mode, lora_dropout=0.0, **kwargs,
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = random_batch(2, seed=1)
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def test_merged_lora_loads_as_plain_llava(tiny_dir, processor, tmp_path):
    model = _trained(tiny_dir)
    ref = _logits(model)
    out = export_model(model, tmp_path / "merged", merge=True, anchor_config=ANCHOR,
                       processor=processor)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "anchor_config.json", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    assert "adapter_config.json" not in files
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # loads as it is, with transformers alone
    plain = LlavaForConditionalGeneration.from_pretrained(out)
    torch.testing.assert_close(_logits(plain), ref, rtol=0, atol=1e-5)
    reloaded_processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 ?"}]}]
    assert reloaded_processor.apply_chat_template(messages, add_generation_prompt=True) == (
        processor.apply_chat_template(messages, add_generation_prompt=True))
    assert json.loads((out / "anchor_config.json").read_text()) == ANCHOR.to_dict()
    # the exported model is no copy of the untrained base: the merge changed weights
    base = LlavaForConditionalGeneration.from_pretrained(tiny_dir)
    assert (_logits(base) - ref).abs().max() > 1e-3
    # and the trained model is left intact (the merge works on a copy)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)


def test_adapter_export_references_the_base(tiny_dir, processor, tmp_path):
    model = _trained(tiny_dir)
    ref = _logits(model)
    out = export_model(model, tmp_path / "adapter", merge=False, anchor_config=ANCHOR.to_dict(),
                       processor=processor)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "anchor_config.json"} <= files
    assert "model.safetensors" not in files
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_dir)
    loaded, loaded_processor, anchor = load_exported(out)
    assert type(loaded).__name__ == "PeftModel" and not loaded.training
    torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=1e-6)
    assert anchor == ANCHOR.to_dict()
    assert loaded_processor.tokenizer.convert_tokens_to_ids("<image>") == 5


@pytest.mark.parametrize("merge", [True, False])
def test_projector_trained_fully_exports(tiny_dir, processor, tmp_path, merge):
    model = _trained(tiny_dir, projector_mode="full")
    ref = _logits(model)
    out = export_model(model, tmp_path / "out", merge=merge, anchor_config=None,
                       processor=processor)
    loaded, _, anchor = load_exported(out)
    torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=1e-5)
    assert anchor is None and not (out / "anchor_config.json").exists()


def test_qlora_merge_is_float_and_equal(tiny_dir, processor, tmp_path):
    model = _trained(tiny_dir, mode="qlora")
    ref = _logits(model)
    merged = export_model(model, tmp_path / "merged", merge=True, anchor_config=ANCHOR,
                          processor=processor)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    plain = LlavaForConditionalGeneration.from_pretrained(merged)
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    # merged into the dequantized 4-bit weights the adapters were trained against
    torch.testing.assert_close(_logits(plain), ref, rtol=0, atol=1e-5)
    adapter = export_model(model, tmp_path / "adapter", merge=False, anchor_config=ANCHOR,
                           processor=processor)
    loaded, _, _ = load_exported(adapter, quantization="nf4")
    torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=1e-5)


def test_full_finetune_exports_the_whole_model(tiny_dir, processor, tmp_path):
    model = _trained(tiny_dir, mode="full")
    ref = _logits(model)
    for merge in (True, False):  # nothing to merge: the same full directory
        out = export_model(model, tmp_path / f"full-{merge}", merge=merge, anchor_config=ANCHOR,
                           processor=processor)
        assert not (out / "adapter_config.json").exists()
        loaded, _, _ = load_exported(out)
        torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=0)


def test_anchored_wrapper_gives_its_anchor_config(tiny_dir, processor, tmp_path):
    wrapped = AnchoredVLM(_trained(tiny_dir), ANCHOR)
    out = export_model(wrapped, tmp_path / "w", merge=True, anchor_config=None,
                       processor=processor)
    assert json.loads((out / "anchor_config.json").read_text()) == ANCHOR.to_dict()


def test_bfloat16_export(tiny_dir, processor, tmp_path):
    out = export_model(_trained(tiny_dir), tmp_path / "bf16", merge=True, anchor_config=ANCHOR,
                       processor=processor, dtype="bfloat16")
    loaded, _, _ = load_exported(out, dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_export_errors(tiny_dir, processor, tmp_path):
    model = _trained(tiny_dir)
    with pytest.raises(ValueError, match="needs the processor"):
        export_model(model, tmp_path / "a", merge=True, anchor_config=None, processor=None)
    with pytest.raises(ValueError, match="unknown key"):
        export_model(model, tmp_path / "a", merge=True, anchor_config={"strategy": "none",
                     "tau": 0.1}, processor=processor)
    with pytest.raises(TypeError, match="AnchoredVLM"):
        export_model(torch.nn.Linear(2, 2), tmp_path / "a", merge=True, anchor_config=None,
                     processor=processor)
    assert not (tmp_path / "a").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == []

    out = export_model(model, tmp_path / "b", merge=False, anchor_config=ANCHOR,
                       processor=processor)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_model(model, out, merge=True, anchor_config=ANCHOR, processor=processor)
    export_model(model, out, merge=True, anchor_config=ANCHOR, processor=processor,
                 overwrite=True)
    assert not (out / "adapter_config.json").exists()  # the old layout is gone
    assert (out / "model.safetensors").exists()


def test_load_exported_errors(tiny_dir, processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an export"):
        load_exported(tmp_path)
    out = export_model(_trained(tiny_dir), tmp_path / "adapter", merge=False,
                       anchor_config=ANCHOR, processor=processor)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="base_model_path="):
        load_exported(out)
    loaded, _, _ = load_exported(out, base_model_path=str(tiny_dir))
    assert type(loaded).__name__ == "PeftModel"
    (out / "anchor_config.json").write_text(json.dumps({"strategy": "bogus"}))
    with pytest.raises(ValueError, match="bogus"):
        load_exported(out, base_model_path=str(tiny_dir))


def test_render_settings_round_trip(tiny_dir, processor, tmp_path):
    from attanchor.train.checkpoint import load_anchored
    from attanchor.train.export import RenderSettings, read_render_config

    render = RenderSettings(template="tiny-llava-v1", scope="all_user_turns")
    out = export_model(_trained(tiny_dir), tmp_path / "r", merge=True, anchor_config=ANCHOR,
                       processor=processor, render=render)
    assert json.loads((out / "render_config.json").read_text()) == {
        "template": "tiny-llava-v1", "scope": "all_user_turns", "format": "llava"}
    assert read_render_config(out) == render
    loaded = load_anchored(out)
    assert loaded.render == render and loaded.anchored.config.scope == "all_user_turns"
    # An export without render_config.json: the model's own template, the anchor's scope.
    bare = export_model(_trained(tiny_dir), tmp_path / "bare", merge=True, anchor_config=ANCHOR,
                        processor=processor)
    assert read_render_config(bare) is None
    assert load_anchored(bare).render == RenderSettings(template=None, scope=ANCHOR.scope)
    with pytest.raises(ValueError, match="render scope='everything'"):
        export_model(_trained(tiny_dir), tmp_path / "bad", merge=True, anchor_config=ANCHOR,
                     processor=processor, render={"scope": "everything"})


def test_bfloat16_export_loads_as_bfloat16_by_default(tiny_dir, processor, tmp_path):
    out = export_model(_trained(tiny_dir), tmp_path / "bf16", merge=True, anchor_config=ANCHOR,
                       processor=processor, dtype="bfloat16")
    loaded, _, _ = load_exported(out)  # dtype="auto": as saved, not cast up to float32
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    adapter = export_model(_trained(tiny_dir), tmp_path / "adapter", merge=False,
                           anchor_config=ANCHOR, processor=processor)
    loaded, _, _ = load_exported(adapter)  # the base was saved in float32
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
