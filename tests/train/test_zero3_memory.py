"""ZeRO-3 builds the model sharded from the first byte: 2 CPU processes load a random LLaVA
of about 125M parameters from disk through ``AnchorModule.configure_model`` and each records
its peak host-memory growth while loading (``VmHWM`` after minus ``VmRSS`` before, the peak
reset through ``/proc/self/clear_refs``), its partition size, and whether every gathered
weight equals the file's. Run as a script by the slow test (``python -m
tests.train.test_zero3_memory``), which prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# A wide, shallow Llama: 10 layers of 12.8M + an 8000 x 1024 embedding and LM head (16.4M).
# A rank's peak is its partition (1/2 here, 1/8 on 8 GPUs) plus about twice the largest
# module being gathered: with a 32000-word vocabulary the embedding alone is 1/4 of this small
# model (measured peak 1.05 x one copy), against 1/50 of LLaVA-1.5-7B.
TEXT = {"hidden_size": 1024, "num_hidden_layers": 10, "num_attention_heads": 16,
        "num_key_value_heads": 16, "intermediate_size": 2816, "vocab_size": 8000}
TARGET = 0.75  # each rank's peak growth, as a fraction of one full copy of the weights


def _status() -> dict[str, int]:
    """This process's memory figures from /proc (kB -> bytes)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_model_dir(out: Path) -> tuple[Path, int]:
    """Save a random LLaVA (float32 safetensors) with the tiny CLIP tower of the train tests
    and the wide Llama above; return the directory and its parameter count."""
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    from tests.train import tiny_llava_config, tiny_processor

    config = tiny_llava_config()
    config.text_config = LlamaConfig(**{**config.text_config.to_dict(), **TEXT})
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(out)
    tiny_processor().save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


# transformers 5 writes LLaVA checkpoints in the original layout: module name -> file key.
_LEGACY = (("model.language_model.", "language_model.model."), ("model.vision_tower.",
           "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
           ("lm_head.", "language_model.lm_head."))


def _file_key(name: str) -> str:
    """``base_model.model.model.vision_tower.x`` (peft-wrapped) -> ``vision_tower.x``."""
    name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
    for new, old in _LEGACY:
        if name.startswith(new):
            return old + name[len(new):]
    raise KeyError(f"{name}: no checkpoint layout rule")


def _worker(model_dir: str, out: Path) -> None:
    import lightning as L
    from safetensors import safe_open

    from attanchor.train.strategies import build_strategy

    class Check(L.Callback):
        def on_train_start(self, trainer, module) -> None:
            import deepspeed

            rank = trainer.global_rank
            files = sorted(Path(model_dir).glob("*.safetensors"))
            equal, checked, local = True, 0, 0
            handles = [safe_open(str(f), framework="pt") for f in files] if rank == 0 else []
            keys = {k: h for h in handles for k in h.keys()}
            for name, p in module.hf_model.named_parameters():
                if "lora_" in name:
                    continue
                local += p.ds_tensor.numel()
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if rank == 0:
                        key = _file_key(name)
                        equal &= torch.equal(p.detach(), keys[key].get_tensor(key))
                        checked += 1
            result = {"rank": rank, "world_size": trainer.world_size,
                      "reset_ok": module.reset_ok, "before": module.before,
                      "after": module.after, "partition_numel": local}
            if rank == 0:
                result.update(equal=bool(equal), checked=checked, file_keys=len(keys))
            (out / f"rank{rank}.json").write_text(json.dumps(result))

    fit_measured(model_dir, build_strategy("deepspeed_stage_3", accelerator="cpu",
                                           exclude_frozen_parameters=True), Check())


def fit_measured(model_dir: str, strategy, callback) -> None:
    """One LoRA step of an AnchorModule on 2 CPU processes, each rank recording its memory
    around ``configure_model`` (``before``, ``after``, ``reset_ok``) for ``callback``."""
    import lightning as L
    from torch.utils.data import DataLoader

    from attanchor.anchoring import AnchorConfig
    from attanchor.train.module import AnchorModule, LoraSettings, ModelSettings
    from tests.train import random_batch

    class Measured(AnchorModule):
        def configure_model(self) -> None:
            if self.anchored is not None:
                return
            self.reset_ok = _reset_peak()
            self.before = _status()
            super().configure_model()
            self.after = _status()
            self.meta_after_build = all(p.is_meta for p in self.hf_model.parameters())

    module = Measured(model_dir, anchor=AnchorConfig(strategy="none"),
                      model=ModelSettings(dtype="float32", mode="lora",
                                          lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    samples = [{k: v[0] for k, v in random_batch(1, text_len=8, seed=i).items()}
               for i in range(2)]
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=1, logger=False,
                        strategy=strategy, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, DataLoader(samples, batch_size=1))


def run_two_ranks(module: str, model_dir: Path, out: Path) -> list[dict]:
    """Run ``python -m module --model model_dir --out out`` (a 2-process Lightning fit whose
    ranks each write ``out/rank<r>.json``) and return the two ranks' records."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", module, "--model", str(model_dir), "--out",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_zero3_load_peak_memory_per_rank(tmp_path):
    model_dir, n_params = build_model_dir(tmp_path / "model")
    full_copy = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    assert n_params >= 100_000_000 and full_copy >= 4 * 100_000_000  # float32
    ranks = run_two_ranks("tests.train.test_zero3_memory", model_dir, tmp_path / "out")
    mb = 1 << 20
    print(f"\nZeRO-3 load, 2 CPU processes: {n_params / 1e6:.1f}M parameters, one full copy "
          f"{full_copy / mb:.0f} MiB (float32 safetensors)")
    for r in ranks:
        growth = r["after"]["VmHWM"] - r["before"]["VmRSS"]
        r["growth"] = growth
        print(f"  rank {r['rank']}: peak growth {growth / mb:.0f} MiB = "
              f"{growth / full_copy:.2f} x one copy; RSS after {r['after']['VmRSS'] / mb:.0f} "
              f"MiB (anon {r['after']['RssAnon'] / mb:.0f}, file {r['after']['RssFile'] / mb:.0f}"
              f"); partition {r['partition_numel'] / 1e6:.1f}M parameters")
    assert all(r["reset_ok"] for r in ranks), "could not reset VmHWM (/proc/self/clear_refs)"
    assert ranks[0]["equal"] and ranks[0]["checked"] == ranks[0]["file_keys"]
    # each rank holds half of every base weight (ZeRO-3 pads partitions to equal sizes)
    for r in ranks:
        assert abs(r["partition_numel"] - n_params / 2) < 0.01 * n_params
    for r in ranks:
        assert r["growth"] < TARGET * full_copy, (r["rank"], r["growth"] / full_copy)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    _worker(args.model, args.out)
