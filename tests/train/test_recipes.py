"""Every recipe builds up to its strategy and optimizer: parsed with a tiny model in place of
``model_path``, its strategy built as ``attanchor fit`` builds it, the model configured and
``configure_optimizers`` run (DeepSpeed's CPU Adam is checked by class and by DeepSpeed's own
offload rule; constructing it compiles a C++ op, set ATTANCHOR_TEST_OFFLOAD=1 to build it)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from attanchor.train.cli import recipe_strategy, validate_recipe
from attanchor.train.optim import check_optimizer_for_deepspeed, optimizer_class
from attanchor.train.runinfo import plan_batch
from attanchor.train.sharding import DecoderLayerWrapPolicy
from attanchor.train.strategies import CPUDeepSpeedStrategy, CPUFSDPStrategy

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))

# recipe (relative to recipes/, minus -anchored/-baseline) -> (strategy, optimizer class)
EXPECTED = {
    "demo/anchored": ("auto", "AdamW"), "demo/baseline": ("auto", "AdamW"),
    "demo/base": ("auto", "AdamW"), "demo/pretrain": ("auto", "AdamW"),
    "demo/image-into-text": ("auto", "AdamW"),
    "tinyllava-1b/lora-image-into-text": ("auto", "AdamW"),
    "tinyllava-1b/base": ("auto", "AdamW"), "tinyllava-1b/lora": ("auto", "AdamW"),
    "tinyllava-1b/qlora": ("auto", "AdamW"),
    "llava-1.5-7b/base": ("auto", "PagedAdamW8bit"), "llava-1.5-7b/lora": ("auto", "PagedAdamW8bit"),
    "llava-1.5-7b/qlora": ("auto", "PagedAdamW8bit"),
    "llava-1.5-7b/zero2-lora": ("deepspeed_stage_2", "PagedAdamW8bit"),
    "llava-1.5-7b/zero3-lora": ("deepspeed_stage_3", "PagedAdamW8bit"),
    "llava-1.5-7b/zero3-offload-lora": ("deepspeed_stage_3_offload", "DeepSpeedCPUAdam"),
    "llava-1.5-7b/fsdp-lora": ("fsdp", "AdamW"),
    "llava-next/base": ("auto", "PagedAdamW8bit"), "llava-next/lora": ("auto", "PagedAdamW8bit"),
    "llava-next/qlora": ("auto", "PagedAdamW8bit"),
    "qwen2.5-vl-3b/base": ("auto", "AdamW"), "qwen2.5-vl-3b/lora": ("auto", "AdamW"),
}


def _key(recipe: Path) -> str:
    rel = str(recipe.relative_to(ROOT / "recipes").with_suffix(""))
    return rel.removesuffix("-anchored").removesuffix("-baseline")


def test_every_recipe_has_an_expectation():
    assert sorted({_key(r) for r in RECIPES}) == sorted(EXPECTED)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_builds_its_strategy_and_optimizer(recipe, tiny_world):
    d = tiny_world["data"]
    cfg = validate_recipe(str(recipe), ["--model.model_path", str(tiny_world["model"]),
                                        "--data.train_file", str(d / "train.json"),
                                        "--data.image_root", str(d / "images")])
    want_strategy, want_optimizer = EXPECTED[_key(recipe)]
    assert cfg.trainer.strategy == want_strategy
    module = cfg.model
    strategy = recipe_strategy(cfg.trainer.strategy, module.settings, accelerator="cpu")
    if want_strategy.startswith("deepspeed"):
        assert isinstance(strategy, CPUDeepSpeedStrategy)
        assert strategy.config["zero_optimization"]["stage"] == int(want_strategy.split("_")[2])
        assert strategy.exclude_frozen_parameters is (module.settings.mode != "full")
    elif want_strategy == "fsdp":
        assert isinstance(strategy, CPUFSDPStrategy)
        assert isinstance(strategy.kwargs["auto_wrap_policy"], DecoderLayerWrapPolicy)
    else:
        assert strategy == "auto"

    module.configure_model()  # the tiny model, with the recipe's dtype, mode and LoRA settings
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=10,
                        max_epochs=-1, logger=False, enable_checkpointing=False)
    module.trainer = trainer
    name = module.optim_settings.name
    assert optimizer_class(name).__name__ == want_optimizer
    if name == "deepspeed_cpu_adam" and os.environ.get("ATTANCHOR_TEST_OFFLOAD") != "1":
        # DeepSpeed's own offload rule accepts its CPU Adam and refuses torch's AdamW
        check_optimizer_for_deepspeed(name, strategy.config)
        with pytest.raises(ValueError, match="deepspeed_cpu_adam"):
            check_optimizer_for_deepspeed("adamw", strategy.config)
        return
    built = module.configure_optimizers()
    optimizer = built["optimizer"]
    assert type(optimizer).__name__ == want_optimizer
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert built["lr_scheduler"]["scheduler"].last_epoch == 0
    if module.settings.mode == "lora" and "demo" not in str(recipe):
        # GPU recipes: bf16 base weights (QLoRA's are 4-bit, its other frozen ones upcast by
        # peft's prepare_model_for_kbit_training; LoRA adapters may be kept in float32)
        frozen = [p for p in module.parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen), \
            "GPU recipe weights are not bf16"


def test_llava_next_twins_differ_only_in_the_anchor():
    anchored = validate_recipe(str(ROOT / "recipes" / "llava-next" / "lora-anchored.yaml"))
    baseline = validate_recipe(str(ROOT / "recipes" / "llava-next" / "lora-baseline.yaml"))
    assert anchored.model.model_path == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert anchored.model.anchor_config.strategy == "text_into_image"
    assert anchored.model.anchor_config.threshold == 0.12
    assert baseline.model.anchor_config.strategy == "none"
    assert anchored.model.settings == baseline.model.settings
    assert (anchored.model.settings.lora.r, anchored.model.settings.lora.alpha) == (8, 16)
    assert anchored.data.max_length == baseline.data.max_length == 4096
    assert anchored.data.global_batch_size == 32 and anchored.data.template == "llava-1.5"


def test_gpu_recipes_state_the_papers_global_batch_and_template(tiny_world):
    tiny = validate_recipe(str(ROOT / "recipes" / "tinyllava-1b" / "lora-anchored.yaml"))
    assert tiny.data.template == "tiny-llava-v1" and tiny.data.global_batch_size == 16
    llava = validate_recipe(str(ROOT / "recipes" / "llava-1.5-7b" / "lora-anchored.yaml"))
    assert llava.data.template == "llava-1.5" and llava.data.global_batch_size == 32
    for cfg in (tiny, llava):
        assert cfg.trainer.precision.startswith("bf16") and cfg.model.settings.dtype == "bfloat16"
        assert cfg.data.val_fraction == 0.01 and cfg.data.files["val"] is None
    # 1 GPU, 8 GPUs, 2 nodes x 8 GPUs (that one needs a smaller per-device batch: it errors)
    assert plan_batch(world_size=1, per_device_batch_size=2,
                      global_batch_size=16).accumulate_grad_batches == 8
    assert plan_batch(world_size=8, per_device_batch_size=2,
                      global_batch_size=16).accumulate_grad_batches == 1
    assert plan_batch(world_size=8, per_device_batch_size=4,
                      global_batch_size=32).accumulate_grad_batches == 1
    assert plan_batch(world_size=16, per_device_batch_size=2,
                      global_batch_size=32).accumulate_grad_batches == 1
    with pytest.raises(ValueError, match="world_size 16 x data.batch_size 2 = 32"):
        plan_batch(world_size=16, per_device_batch_size=2, global_batch_size=16)


@pytest.mark.slow
def test_fsdp_fit_with_clipping_saves_every_lora_weight(tiny_world, tmp_path):
    """2 CPU processes, FSDP with the per-layer policy, the recipe's gradient clipping (which
    Lightning's FSDP precision refuses; the module clips through FSDP): the LoRA checkpoint
    holds all 32 adapter tensors of the tiny model (2 per adapted Linear), not the FSDP
    wrapper-named ones."""
    import subprocess
    import sys

    from tests.conftest import world_overrides

    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(ROOT / "launch.sh"), str(ROOT / "recipes" / "demo" / "anchored.yaml"),
           *world_overrides(tiny_world, tmp_path), "--trainer.strategy", "fsdp",
           "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
           "--trainer.limit_val_batches", "1", "--data.batch_size", "2", "--run.wandb", "false",
           "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "demo" / "text_into_image-seed0" / "checkpoints" / "last.ckpt",
                      weights_only=True)
    keys = list(ckpt["state_dict"])
    assert len(keys) == 32 and all("lora_" in k and "_fsdp_wrapped_module" not in k
                                   for k in keys)
