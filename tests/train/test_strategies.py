"""Strategies: name mapping (fast) and 2-process CPU runs: DDP, ZeRO-2/3 (+offload), FSDP (slow).

The slow tests run this file as a script (``python -m tests.train.test_strategies``): a small
LightningModule around the tiny LLaVA with LoRA trains 2 steps on random token batches, saves a
checkpoint, resumes in a fresh Trainer to step 4, and writes what it saw to JSON; the test then
checks finite losses, the restored schedule, and that the checkpoint consolidates into a state
dict holding the LoRA weights equal to the live (gathered) ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from attanchor.train.strategies import (
    STRATEGY_NAMES,
    CPUDeepSpeedStrategy,
    CPUFSDPStrategy,
    build_strategy,
    consolidate_checkpoint,
    is_zero_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
LR = 1e-3


# --------------------------------------------------------------------------- name mapping


def test_auto_is_auto():
    assert build_strategy("auto", accelerator="cpu") == "auto"
    assert build_strategy("auto", accelerator="gpu") == "auto"


def test_cpu_variants():
    ddp = build_strategy("ddp", accelerator="cpu")
    assert type(ddp) is DDPStrategy and ddp._process_group_backend == "gloo"
    z2 = build_strategy("deepspeed_stage_2", accelerator="cpu")
    assert type(z2) is CPUDeepSpeedStrategy
    assert z2.config["zero_optimization"]["stage"] == 2
    z3 = build_strategy("deepspeed_stage_3", accelerator="cpu")
    assert z3.config["zero_optimization"]["stage"] == 3
    assert "offload_optimizer" not in z3.config["zero_optimization"]
    z3o = build_strategy("deepspeed_stage_3_offload", accelerator="cpu")
    assert z3o.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert z3o.config["zero_optimization"]["offload_param"]["device"] == "cpu"
    fsdp = build_strategy("fsdp", accelerator="cpu")
    assert type(fsdp) is CPUFSDPStrategy and fsdp.process_group_backend == "gloo"


def test_gpu_variants_are_lightnings_own():
    ddp = build_strategy("ddp", accelerator="gpu", find_unused_parameters=True)
    assert type(ddp) is DDPStrategy and ddp._ddp_kwargs["find_unused_parameters"] is True
    assert ddp._process_group_backend is None  # nccl chosen by Lightning on CUDA
    z3 = build_strategy("deepspeed_stage_3", accelerator="cuda", exclude_frozen_parameters=True)
    assert type(z3) is DeepSpeedStrategy and z3.exclude_frozen_parameters is True
    assert type(build_strategy("fsdp", accelerator="gpu")) is FSDPStrategy


def test_unknown_names_fail():
    with pytest.raises(ValueError, match="allowed are"):
        build_strategy("deepspeed_stage_4", accelerator="cpu")
    with pytest.raises(ValueError, match="accelerator='tpu'"):
        build_strategy("ddp", accelerator="tpu")
    assert "deepspeed_stage_3_offload" in STRATEGY_NAMES


def test_cpu_deepspeed_root_device_is_per_rank(monkeypatch):
    from lightning.fabric.plugins.environments import LightningEnvironment

    monkeypatch.setenv("LOCAL_RANK", "1")
    s = build_strategy("deepspeed_stage_2", accelerator="cpu")
    s.cluster_environment = LightningEnvironment()
    assert s.local_rank == 1
    assert s.root_device == torch.device("cpu", 1)


def test_consolidate_rejects_a_plain_file(tmp_path):
    f = tmp_path / "last.ckpt"
    f.write_bytes(b"x")
    assert not is_zero_checkpoint(f)
    with pytest.raises(ValueError, match="not a DeepSpeed ZeRO checkpoint"):
        consolidate_checkpoint(f, tmp_path / "out.ckpt")


# --------------------------------------------------------------------------- 2-process runs


def _run_worker(strategy: str, tmp_path: Path, model_dir: Path, exclude_frozen: bool) -> list[dict]:
    out = tmp_path / strategy
    out.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MASTER_PORT", None)
    cmd = [
        sys.executable, "-m", "tests.train.test_strategies",
        "--strategy", strategy, "--model", str(model_dir), "--out", str(out),
    ] + (["--exclude-frozen"] if exclude_frozen else [])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    results = [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(2)]
    return results


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.train import build_tiny_llava_dir

    return build_tiny_llava_dir(tmp_path_factory.mktemp("tiny-llava"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "exclude_frozen"),
    [
        ("ddp", False),
        ("deepspeed_stage_2", False),
        ("deepspeed_stage_3", True),
        # Offload needs DeepSpeedCPUAdam, whose C++ op compiles on first use: about 2 minutes
        # on a 2-core machine (then cached), so this case is opt-in.
        pytest.param(
            "deepspeed_stage_3_offload", True,
            marks=pytest.mark.skipif(
                os.environ.get("ATTANCHOR_TEST_OFFLOAD") != "1",
                reason="set ATTANCHOR_TEST_OFFLOAD=1 (compiles DeepSpeed's cpu_adam op once)",
            ),
        ),
        ("fsdp", False),
    ],
)
def test_two_process_lora_checkpoint_resume(strategy, exclude_frozen, tmp_path, tiny_dir):
    results = _run_worker(strategy, tmp_path, tiny_dir, exclude_frozen)
    for res in results:
        assert res["world_size"] == 2
        assert res["global_step"] == 4
        # phase 1 trained steps 0-1, the resumed phase steps 2-3
        assert sorted(res["losses"]) == ["0", "1", "2", "3"]
        assert all(math.isfinite(v) for v in res["losses"].values())
        # cosine, 4 steps, warmup ceil(4 * 0.25) = 1: factors 0, 1, 0.75, 0.25; the resumed
        # phase continues the schedule instead of restarting it
        expected = {"0": 0.0, "1": LR, "2": 0.75 * LR, "3": 0.25 * LR}
        assert res["lrs"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert res["n_trainable"] > 0 and res["trainable_numel_zero"] == 0
        assert res["nested_equal"]
        # built in configure_model (inside zero.Init under ZeRO-3): the pretrained weights
        # arrived whole and LoRA B starts at zero
        assert res["start"] == {"lora_b_zero": True, "base_equals_pretrained": True}
    # Steps 0 and 1 run the untrained model (LoRA B = 0, lr 0 at step 0): each rank's loss is
    # the in-process loss on its share of Lightning's shuffling DistributedSampler (seed 0).
    from torch.utils.data.distributed import DistributedSampler

    for rank, res in enumerate(results):
        order = list(DistributedSampler(range(16), num_replicas=2, rank=rank, shuffle=True, seed=0))
        for step in (0, 1):
            expected = _reference_loss(tiny_dir, order[2 * step: 2 * step + 2])
            assert res["losses"][str(step)] == pytest.approx(expected, abs=1e-5)
    rank0 = results[0]
    # FSDP: the root plus one unit per layer (2 Llama decoder + 2 CLIP encoder layers)
    assert rank0["fsdp_units"] == (5 if strategy == "fsdp" else 0)
    assert rank0["lora_keys_in_checkpoint"] == rank0["n_trainable"]
    # tiny LLaVA: 64 pretrained tensors + 32 LoRA tensors (2 per adapted Linear)
    assert rank0["n_keys_in_checkpoint"] == (32 if exclude_frozen else 96)
    assert rank0["max_abs_diff_checkpoint_vs_live"] == 0.0
    assert rank0["lora_b_nonzero"]  # LoRA B starts at 0: it trained
    assert rank0["zero_checkpoint"] == strategy.startswith("deepspeed")
    if rank0["zero_checkpoint"]:  # Lightning's state only, DeepSpeed's bookkeeping dropped
        assert rank0["consolidated_keys"] == ["callbacks", "epoch", "global_step", "loops",
                                              "lr_schedulers", "pytorch-lightning_version",
                                              "state_dict"]


# --------------------------------------------------------------------------- the worker


def _sample(i: int) -> dict:
    from tests.train import random_batch

    return {k: v[0] for k, v in random_batch(1, text_len=8, seed=i).items()}


def _full_parameters(trainer, zero3: bool = True):
    """Collective: every rank sees whole parameters (ZeRO-3 partitions, FSDP shards them)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(trainer.strategy.model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
    partitioned = [p for p in trainer.lightning_module.parameters() if hasattr(p, "ds_id")]
    if partitioned and zero3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    return contextlib.nullcontext()


def _reference_loss(model_dir: Path, indices: list[int]) -> float:
    """The untrained model's loss on these samples, computed in this process."""
    from attanchor.train.build import configure_trainable, load_model

    model = configure_trainable(load_model(str(model_dir)), mode="lora", lora_r=4, lora_alpha=8,
                                lora_dropout=0.0)
    samples = [_sample(i) for i in indices]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    with torch.no_grad():
        return float(model(**batch).loss)


def _worker(strategy_name: str, model_dir: str, out: Path, exclude_frozen: bool) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from attanchor.train.build import configure_trainable, load_model, trainable_state_dict
    from attanchor.train.optim import build_optimizer, build_scheduler
    class RandomVQA(Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict:
            return _sample(i)

    class LoRAModule(L.LightningModule):
        # Built in configure_model, as the product's module does: under ZeRO-3 Lightning runs
        # it inside deepspeed.zero.Init, the trap build.outside_zero_init() handles.
        def __init__(self) -> None:
            super().__init__()
            self.model = None
            # Checkpoints without the frozen weights restore non-strictly.
            self.strict_loading = not exclude_frozen

        def configure_model(self) -> None:
            if self.model is not None:
                return
            torch.manual_seed(0)
            self.model = configure_trainable(
                load_model(model_dir), stage="finetune", mode="lora", lora_r=4, lora_alpha=8,
                lora_dropout=0.0,
            )

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            # ZeRO offload needs DeepSpeed's CPU Adam; everything else plain AdamW.
            name = "deepspeed_cpu_adam" if strategy_name.endswith("offload") else "adamw"
            opt = build_optimizer(self.model.named_parameters(), name, lr=LR, weight_decay=0.01)
            return {"optimizer": opt, "lr_scheduler": build_scheduler(opt, 4, warmup_ratio=0.25)}

    class Record(L.Callback):
        def __init__(self) -> None:
            self.losses: dict[str, float] = {}
            self.lrs: dict[str, float] = {}

            self.start: dict[str, bool] = {}

        def on_train_start(self, trainer, module):
            if self.start:  # the resumed phase starts from trained weights
                return
            from transformers import LlavaForConditionalGeneration

            ref = LlavaForConditionalGeneration.from_pretrained(model_dir).state_dict()
            with _full_parameters(trainer):
                params = dict(module.model.named_parameters())
                self.start["lora_b_zero"] = all(
                    float(p.detach().abs().sum()) == 0.0 for n, p in params.items()
                    if "lora_B" in n
                )
                base = {  # FSDP's per-layer units add a wrapper name
                    n.replace("base_model.model.", "").replace(".base_layer", "")
                    .replace("_fsdp_wrapped_module.", ""): p
                    for n, p in params.items() if "lora_" not in n
                }
                self.start["base_equals_pretrained"] = len(base) == len(ref) and all(
                    torch.equal(p.detach(), ref[n]) for n, p in base.items()
                )

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.lrs[str(trainer.global_step)] = trainer.optimizers[0].param_groups[0]["lr"]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses[str(trainer.global_step - 1)] = float(outputs["loss"])

    def strategy():
        if strategy_name.startswith("deepspeed"):
            return build_strategy(strategy_name, accelerator="cpu",
                                  exclude_frozen_parameters=exclude_frozen)
        return build_strategy(strategy_name, accelerator="cpu")

    def trainer(max_steps: int, record: Record) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", devices=2, strategy=strategy(),
            max_steps=max_steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
            default_root_dir=str(out),
        )

    loader = DataLoader(RandomVQA(), batch_size=2)
    record = Record()
    t1 = trainer(2, record)
    t1.fit(LoRAModule(), loader)
    t1.save_checkpoint(out / "step2.ckpt")

    t2 = trainer(4, record)
    t2.fit(LoRAModule(), loader, ckpt_path=out / "step2.ckpt")
    t2.save_checkpoint(out / "final.ckpt")
    # ZeRO-3: trainable_state_dict gathers by itself (collective); FSDP: inside summon.
    with _full_parameters(t2, zero3=False):
        live = trainable_state_dict(t2.lightning_module.model)
    with _full_parameters(t2):  # inside an enclosing gather it must not gather again
        nested = trainable_state_dict(t2.lightning_module.model)

    result = {
        "world_size": t2.world_size,
        "global_step": t2.global_step,
        "losses": record.losses,
        "start": record.start,
        "lrs": record.lrs,
        "n_trainable": len(live),
        "fsdp_units": sum(type(m).__name__ == "FullyShardedDataParallel"
                          for m in t2.strategy.model.modules()),
        "trainable_numel_zero": sum(v.numel() == 0 for v in live.values()),
        "nested_equal": nested.keys() == live.keys()
        and all(torch.equal(nested[k], v) for k, v in live.items()),
    }
    t2.strategy.barrier()
    if t2.global_rank == 0:
        final = out / "final.ckpt"
        result["zero_checkpoint"] = is_zero_checkpoint(final)
        if result["zero_checkpoint"]:
            consolidate_checkpoint(final, out / "final-consolidated.ckpt")
            checkpoint = torch.load(out / "final-consolidated.ckpt", weights_only=True)
            result["consolidated_keys"] = sorted(checkpoint)
            state = checkpoint["state_dict"]
        else:
            state = torch.load(final, weights_only=True)["state_dict"]
        result["n_keys_in_checkpoint"] = len(state)
        prefixed = {f"model.{k}": v for k, v in live.items()}
        result["lora_keys_in_checkpoint"] = sum(k in state for k in prefixed)
        result["max_abs_diff_checkpoint_vs_live"] = max(
            (state[k].float() - v.float()).abs().max().item() for k, v in prefixed.items()
        )
        result["lora_b_nonzero"] = any(
            v.abs().sum().item() > 0 for k, v in live.items() if "lora_B" in k
        )
    (out / f"result-rank{t2.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", required=True, choices=STRATEGY_NAMES)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--exclude-frozen", action="store_true")
    args = parser.parse_args()
    _worker(args.strategy, args.model, args.out, args.exclude_frozen)
