"""AnchorModule trains in every mode: full, LoRA and QLoRA, the loss falling on a fixed batch."""

from __future__ import annotations

import pytest
import torch

from attanchor.anchoring import AnchorConfig
from attanchor.data.datamodule import VLMDataModule
from attanchor.train.module import AnchorModule, LoraSettings, ModelSettings, OptimSettings
from attanchor.train.optim import build_optimizer


@pytest.fixture(scope="module")
def batch(tiny_world):
    dm = VLMDataModule(model_path=str(tiny_world["model"]),
                       train_file=str(tiny_world["data"] / "train.json"),
                       image_root=str(tiny_world["images"]), batch_size=8, max_length=128)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_each_mode_trains_with_the_loss_falling(tiny_world, batch, mode):
    torch.manual_seed(0)
    module = AnchorModule(
        str(tiny_world["model"]), anchor=AnchorConfig(threshold=None, top_fraction=0.5),
        model=ModelSettings(mode=mode, lora=LoraSettings(r=8, alpha=16, dropout=0.0)),
        optim=OptimSettings(lr=3e-3))
    module.configure_model()
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert named, "nothing to train"
    if mode != "full":
        assert all("lora_" in n or "modules_to_save" in n for n, _ in named)
    opt = build_optimizer(named, lr=3e-3)
    losses = []
    for _ in range(8):
        loss = module(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert module.anchored.last_stats["anchors_mean"] > 0
    assert losses[-1] < 0.9 * losses[0], losses
