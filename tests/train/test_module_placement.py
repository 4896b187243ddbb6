"""AnchorModule feeds the random control (seed, sample index, epoch): training placements move
with the epoch, evaluation always uses epoch 0, and no generator state is checkpointed."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from attanchor.anchoring import AnchorConfig
from attanchor.data.datamodule import VLMDataModule
from attanchor.train.module import AnchorModule, LoraSettings, ModelSettings


@pytest.fixture(scope="module")
def batch(tiny_world):
    dm = VLMDataModule(model_path=str(tiny_world["model"]),
                       train_file=str(tiny_world["data"] / "train.json"),
                       image_root=str(tiny_world["images"]), batch_size=4, max_length=128)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_epoch_and_sample_index_reach_the_random_control(tiny_world, batch):
    torch.manual_seed(0)
    module = AnchorModule(
        str(tiny_world["model"]),
        anchor=AnchorConfig(strategy="random", threshold=None, top_fraction=1.0),
        model=ModelSettings(mode="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    module.configure_model()
    assert batch["sample_index"].shape == (4,)

    def hosts(train: bool) -> torch.Tensor:
        module.train(train)
        with torch.no_grad():
            module(batch)
        return module.anchored.last_regrouped.host.clone()

    epoch0, evaluation = hosts(True), hosts(False)
    assert (epoch0 >= 0).any() and torch.equal(epoch0, evaluation)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    trainer.fit_loop.epoch_progress.current.completed = 3  # as after 3 epochs
    assert module.current_epoch == 3
    epoch3 = hosts(True)
    assert not torch.equal(epoch3, epoch0)
    with torch.no_grad():  # the same as asking the model for epoch 3 with these samples
        module.anchored(**{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                                 "labels", "candidate_mask", "sample_index")},
                        epoch=3)
    assert torch.equal(module.anchored.last_regrouped.host, epoch3)
    assert torch.equal(hosts(False), epoch0)  # evaluation: epoch 0 whatever the epoch
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    assert "anchor_generator_state" not in checkpoint
