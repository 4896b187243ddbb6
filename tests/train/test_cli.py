"""Recipes and `attanchor fit` end to end on the tiny world (CPU)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from attanchor.eval.compare import loss_curve
from attanchor.train.cli import build_cli, validate_recipe
from attanchor.train.recipe import deep_merge, resolve_recipe
from tests.conftest import world_overrides

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
DEMO = str(ROOT / "recipes" / "demo" / "anchored.yaml")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_loads_and_validates(recipe):
    cfg = validate_recipe(str(recipe))
    assert cfg.model.model_path
    assert cfg.data.batch_size >= 1


def test_twins_differ_only_in_the_anchor_block():
    for anchored in (ROOT / "recipes").rglob("*-anchored.yaml"):
        baseline = anchored.with_name(anchored.name.replace("-anchored", "-baseline"))
        if not baseline.exists():
            continue
        a, b = resolve_recipe(anchored), resolve_recipe(baseline)
        a["model"].pop("anchor"), b["model"].pop("anchor")
        assert a == b, f"{baseline.name} differs from {anchored.name} outside model.anchor"
        assert resolve_recipe(baseline)["model"]["anchor"]["strategy"] == "none"


def test_extends_merges_and_rejects_cycles(tmp_path):
    assert deep_merge({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}, "b": 4}) == \
        {"a": {"x": 1, "y": 3}, "b": 4}
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\ny: 2\n")
    with pytest.raises(ValueError, match="cycle"):
        resolve_recipe(tmp_path / "a.yaml")


def test_unknown_recipe_key_fails_before_any_model_loads(tmp_path, monkeypatch):
    import attanchor.train.build as build

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(build, "load_model", boom)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {DEMO}\nmodel:\n  anchor: {{stratgy: none}}\n")
    with pytest.raises((argparse.ArgumentError, SystemExit, ValueError)):
        validate_recipe(str(bad))
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(bad)])
    with pytest.raises(ValueError, match="threshold"):
        validate_recipe(DEMO, ["--model.anchor.threshold", "5.0"])


def fit(world, run_root: Path, *extra: str):
    argv = ["fit", "--config", DEMO, *world_overrides(world, run_root),
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
            "--data.batch_size", "8", "--data.eval_batch_size", "8", *extra]
    return build_cli(argv)


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_fast_dev_run_demo_recipe(tiny_world, tmp_path):
    cli = fit(tiny_world, tmp_path, "--trainer.fast_dev_run", "2", "--run.wandb", "false")
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_run_directory_checkpoints_and_offline_wandb(tiny_world, tmp_path):
    cli = fit(tiny_world, tmp_path, "--trainer.max_steps", "6", "--trainer.val_check_interval",
              "3", "--trainer.log_every_n_steps", "1")
    run = tmp_path / "demo" / "text_into_image-seed0"
    assert cli.trainer.default_root_dir == str(run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["anchor"]["strategy"] == "text_into_image"
    env = json.loads((run / "env.json").read_text())
    assert "torch" in json.dumps(env)
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "checkpoints" / "best.ckpt").exists()
    assert len(losses(run)) == 6
    with open(run / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    for key in ("train/anchors_mean", "train/growth_pct", "train/tokens_per_s", "val/loss"):
        assert key in header
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run written"
    # LoRA checkpoints hold only the trainable weights.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    assert ckpt["anchor_config"]["strategy"] == "text_into_image"


def test_same_recipe_and_seed_give_the_same_loss_curve(tiny_world, tmp_path):
    extra = ("--trainer.max_steps", "5", "--run.wandb", "false", "--trainer.log_every_n_steps",
             "1", "--trainer.val_check_interval", "5")
    fit(tiny_world, tmp_path / "a", *extra)
    fit(tiny_world, tmp_path / "b", *extra)
    a = losses(tmp_path / "a" / "demo" / "text_into_image-seed0")
    b = losses(tmp_path / "b" / "demo" / "text_into_image-seed0")
    assert len(a) == 5 and a == b


def trainable_weights(cli) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}


class CrashInSecondEpoch(Callback):
    """Simulates a killed job: dies as epoch 2 starts, after epoch 1's checkpoint."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("strategy", ["text_into_image", "random"])
def test_resume_continues_exactly(tiny_world, tmp_path, strategy):
    """A run killed after epoch 1 and resumed with --ckpt_path last ends with the same weights
    and the same loss curve as the run that was never interrupted (the random control's
    placement generator included)."""
    common = ("--model.anchor.strategy", strategy, "--run.wandb", "false", "--trainer.max_steps", "-1", "--trainer.limit_train_batches",
              "3", "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch",
              "1", "--run.early_stopping_patience", "null", "--trainer.max_epochs", "2",
              "--trainer.log_every_n_steps", "1")
    straight = fit(tiny_world, tmp_path / "straight", *common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tiny_world, tmp_path / "resumed", *common, "--trainer.callbacks",
            "tests.train.test_cli.CrashInSecondEpoch")
    resumed = fit(tiny_world, tmp_path / "resumed", *common, "--ckpt_path", "last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 6
    run = f"demo/{strategy}-seed0/metrics.csv"
    assert loss_curve(tmp_path / "resumed" / run) == loss_curve(tmp_path / "straight" / run)
    assert len(loss_curve(tmp_path / "straight" / run)) == 6
    a, b = trainable_weights(straight), trainable_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
