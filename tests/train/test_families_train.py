"""Every family through the training side: load by model_type, LoRA trains, export, reload.

Each tiny checkpoint is built locally (``attanchor.data.tiny*``); the batch comes from the
checkpoint's own processor (so the image-token counts and size tensors are the family's).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.train.build import load_model
from attanchor.train.export import export_model, load_exported, load_processor
from attanchor.train.module import AnchorModule, LoraSettings, ModelSettings, OptimSettings

VOCAB = ["user", ":", "assistant", "what", "color", "is", "the", "shape", "?", "red", "blue"]
ANCHOR = AnchorConfig(threshold=None, top_fraction=0.5)


def build(family: str, out):
    if family == "llava":
        from attanchor.data.tiny import build_tiny_llava
        return build_tiny_llava(out, vocab=VOCAB, image_size=32)
    if family == "llava_next":
        from attanchor.data.tiny_next import build_tiny_next
        return build_tiny_next(out, vocab=VOCAB)
    from attanchor.data.tiny_qwen import build_tiny_qwen
    return build_tiny_qwen(out, vocab=VOCAB)


def make_batch(processor) -> dict[str, torch.Tensor]:
    """Two rows '<image> what color is the shape ? <answer>' with images of different sizes
    (NeXT: different tile grids; Qwen: different patch grids), right-padded; the answer word
    is supervised, the prompt words are candidates."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for h, w in ((40, 80), (32, 32))]
    texts = [f"{processor.image_token} what color is the shape ? {a}" for a in ("red", "blue")]
    out = processor(images=images, text=texts, return_tensors="pt", padding=True)
    tok = processor.tokenizer
    ids = out["input_ids"]
    answer = torch.isin(ids, torch.tensor(tok.convert_tokens_to_ids(["red", "blue"])))
    prompt = torch.isin(ids, torch.tensor(tok.convert_tokens_to_ids(
        ["what", "color", "is", "the", "shape"])))
    batch = {k: v for k, v in out.items()}
    batch["labels"] = ids.masked_fill(~answer, -100)
    batch["candidate_mask"] = prompt
    return batch


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_5_vl"])
def trained(request, tmp_path_factory):
    """(family, model dir, AnchorModule after 10 LoRA steps, batch, losses)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    path = build(family, root / "base")
    module = AnchorModule(str(path), anchor=ANCHOR, model=ModelSettings(
        attn_implementation="eager", mode="lora",
        lora=LoraSettings(r=8, alpha=16, dropout=0.0)), optim=OptimSettings(lr=3e-3))
    module.configure_model()
    batch = make_batch(load_processor(path))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    module.train()
    for _ in range(10):
        loss = module(batch).loss
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    return family, path, module, batch, losses


def test_load_model_picks_the_class_by_model_type(trained):
    family, path, *_ = trained
    want = {"llava": "LlavaForConditionalGeneration",
            "llava_next": "LlavaNextForConditionalGeneration",
            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[family]
    assert type(load_model(str(path))).__name__ == want


def test_lora_trains_the_family_parts_and_the_loss_falls(trained):
    family, _, module, _, losses = trained
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    projector = {"llava": "multi_modal_projector", "llava_next": "multi_modal_projector",
                 "qwen2_5_vl": "visual.merger"}[family]
    assert any(projector in n and "lora_" in n for n in names)
    assert any("language_model" in n and "lora_" in n for n in names)
    assert not any("vision_tower" in n or "visual.blocks" in n for n in names)
    assert (any(n.endswith("model.image_newline") for n in names)) == (family == "llava_next")
    assert module.anchored.last_anchor_counts.sum() > 0  # anchoring really ran
    # Measured (lr 3e-3, 10 steps): llava 2.64 -> 0.78, llava_next 2.75 -> 1.77,
    # qwen2_5_vl 3.06 -> 2.18.
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("merge", [False, True])
def test_export_then_reload_gives_the_same_logits(trained, merge, tmp_path):
    family, path, module, batch, _ = trained
    out = export_model(module.anchored, tmp_path / "export", merge=merge, anchor_config=None,
                       processor=load_processor(path))
    assert (out / "base_parameters.safetensors").is_file() == (family == "llava_next"
                                                               and not merge)
    model, processor, anchor = load_exported(out)
    assert AnchorConfig.from_dict(anchor) == ANCHOR
    assert type(processor).__name__ == type(load_processor(path)).__name__
    with torch.no_grad():
        want = module(batch).logits
        got = AnchoredVLM(model, AnchorConfig.from_dict(anchor))(
            **{k: v for k, v in batch.items()}).logits
    if merge:  # merging re-rounds W + BA once
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_lightning_fit_through_the_data_module(family, tmp_path):
    """The real pipeline: VLMDataModule renders and collates the family's batches (image_sizes
    / image_grid_thw), AnchorModule trains two anchored steps under a Lightning Trainer."""
    import json

    import lightning as L

    from attanchor.data.datamodule import VLMDataModule

    path = build(family, tmp_path / "base")
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i, (size, color) in enumerate([((80, 40), "red"), ((32, 32), "blue")]):
        Image.new("RGB", size, color).save(images / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"},
            {"from": "gpt", "value": color}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    dm = VLMDataModule(model_path=str(path), train_file=str(tmp_path / "train.json"),
                       image_root=str(images), batch_size=2, image_cache_mb=0)
    module = AnchorModule(str(path), anchor=AnchorConfig(threshold=-1.0), model=ModelSettings(
        attn_implementation="eager", mode="lora", lora=LoraSettings(r=4, alpha=8)))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert module.anchored.last_anchor_counts.tolist() == [6, 6]  # tau -1: every candidate
    # The reload path: a Lightning checkpoint (trainable weights only; NeXT's image_newline
    # among them) rebuilt by load_module gives the trained module's logits.
    from attanchor.train.checkpoint import load_module

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    batch = next(iter(dm.train_dataloader()))
    module.eval()
    with torch.no_grad():
        want = module(batch).logits
        got = load_module(tmp_path / "last.ckpt")(batch).logits
    assert torch.equal(got, want)
