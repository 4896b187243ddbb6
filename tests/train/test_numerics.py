"""A NaN loss in a real tiny fit: the run stops naming the step and the records and keeps the
last good checkpoint, or (``on_nonfinite_loss: skip``) skips the batch without an update and
counts it. The fault is injected for real: the batch's pixel values are set to NaN."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from attanchor.anchoring import AnchorConfig
from attanchor.data.datamodule import VLMDataModule
from attanchor.train.module import AnchorModule, LoraSettings, ModelSettings, OptimSettings
from attanchor.train.numerics import (
    NonFiniteLossError,
    NumericsSettings,
    decide,
    describe_batch,
    loss_kind,
)


def test_policy_and_settings():
    stop, skip = NumericsSettings(), NumericsSettings(on_nonfinite_loss="skip",
                                                      max_nonfinite_skips=2)
    assert [decide(stop, nonfinite=b, skipped_before=0) for b in (False, True)] == \
        ["train", "stop"]
    assert [decide(skip, nonfinite=True, skipped_before=k) for k in range(4)] == \
        ["skip", "skip", "stop", "stop"]
    assert [loss_kind(torch.tensor(v)) for v in (1.5, math.nan, math.inf, -math.inf)] == \
        [None, "nan", "inf", "-inf"]
    assert describe_batch("nan", global_step=3, epoch=0, batch_idx=3, ids=["a", "b"]) == \
        "loss nan at global step 3 (epoch 0, batch 3), record ids ['a', 'b']"
    with pytest.raises(ValueError, match="on_nonfinite_loss='ignore'"):
        NumericsSettings(on_nonfinite_loss="ignore")
    with pytest.raises(ValueError, match="max_nonfinite_skips=-1"):
        NumericsSettings(max_nonfinite_skips=-1)


class PoisonPixels(Callback):
    """Sets the pixel values of the batches at ``at`` to NaN; records their ids and the
    trainable weights before and after each batch."""

    def __init__(self, at: set[int]) -> None:
        self.at, self.ids, self.before, self.after = at, {}, {}, {}

    @staticmethod
    def weights(module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[batch_idx] = self.weights(pl_module)
        if batch_idx in self.at:
            batch["pixel_values"].fill_(float("nan"))
            self.ids[batch_idx] = list(batch["ids"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[batch_idx] = self.weights(pl_module)


def fit(world, tmp_path: Path, numerics: NumericsSettings, poison: set[int], steps: int):
    torch.manual_seed(0)
    dm = VLMDataModule(model_path=str(world["model"]),
                       train_file=str(world["data"] / "train.json"),
                       image_root=str(world["images"]), batch_size=4, max_length=128)
    module = AnchorModule(str(world["model"]), anchor=AnchorConfig(threshold=None,
                                                                   top_fraction=0.5),
                          model=ModelSettings(mode="lora", lora=LoraSettings(r=4, alpha=8,
                                                                             dropout=0.0)),
                          optim=OptimSettings(lr=1e-2, warmup_ratio=0.0), numerics=numerics)
    cb = PoisonPixels(poison)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=CSVLogger(
        tmp_path, name="", version=""), log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[cb, ckpt], num_sanity_val_steps=0,
        limit_val_batches=0, gradient_clip_val=1.0)
    return trainer, module, dm, cb


def test_nan_loss_stops_naming_step_and_records_and_keeps_the_last_good_checkpoint(
        tiny_world, tmp_path):
    trainer, module, dm, cb = fit(tiny_world, tmp_path, NumericsSettings(), {3}, steps=6)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, datamodule=dm)
    msg = str(info.value)
    assert f"loss nan at global step 3 (epoch 0, batch 3), record ids {cb.ids[3]}" in msg
    assert len(cb.ids[3]) == 4 and str(tmp_path / "ckpt" / "last.ckpt") in msg
    assert "model.numerics.on_nonfinite_loss=stop" in msg
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # written after step 3, before the poisoned batch
    now = PoisonPixels.weights(module)
    assert set(last["state_dict"]) == set(now)
    for name, value in last["state_dict"].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, now[name]), name  # no update came from the NaN batch
    assert now.keys() == cb.before[3].keys()
    assert all(torch.equal(now[n], cb.before[3][n]) for n in now)


def test_skip_policy_skips_without_an_update_and_counts(tiny_world, tmp_path):
    numerics = NumericsSettings(on_nonfinite_loss="skip", max_nonfinite_skips=2)
    trainer, module, dm, cb = fit(tiny_world, tmp_path, numerics, {1, 3}, steps=5)
    trainer.fit(module, datamodule=dm)
    assert trainer.state.finished and module.nonfinite_skips == 2
    changed = {b: any(not torch.equal(cb.before[b][n], cb.after[b][n]) for n in cb.before[b])
               for b in range(5)}
    assert changed == {0: True, 1: False, 2: True, 3: False, 4: True}
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/nonfinite_skips")]
    assert [float(r["train/nonfinite_skips"]) for r in rows] == [0.0, 1.0, 1.0, 2.0, 2.0]
    # The skipped steps log their true (NaN) loss, not a repeat of the last finite one.
    losses = [float(r["train/loss"]) for r in rows]
    assert [math.isnan(x) for x in losses] == [False, True, False, True, False], losses


def test_skip_policy_stops_past_its_maximum(tiny_world, tmp_path):
    numerics = NumericsSettings(on_nonfinite_loss="skip", max_nonfinite_skips=1)
    trainer, module, dm, cb = fit(tiny_world, tmp_path, numerics, {1, 2}, steps=4)
    with pytest.raises(NonFiniteLossError, match=r"loss nan at global step 2 \(epoch 0, batch "
                                                 r"2\).*after 1 skipped batch\(es\), the "
                                                 r"maximum \(model\.numerics\.max_nonfinite_"
                                                 r"skips=1\)"):
        trainer.fit(module, datamodule=dm)
    assert module.nonfinite_skips == 1


def test_recipe_key(tiny_world):
    from attanchor.train.cli import validate_recipe

    demo = str(Path(__file__).resolve().parents[2] / "recipes" / "demo" / "anchored.yaml")
    cfg = validate_recipe(demo, ["--model.numerics.on_nonfinite_loss", "skip",
                                 "--model.numerics.max_nonfinite_skips", "3"])
    assert cfg.model.numerics == NumericsSettings(on_nonfinite_loss="skip",
                                                  max_nonfinite_skips=3)
    with pytest.raises((SystemExit, ValueError, Exception), match="on_nonfinite_loss"):
        validate_recipe(demo, ["--model.numerics.on_nonfinite_loss", "ignore"])
