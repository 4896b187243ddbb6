"""FSDP from the meta device: in a 2-process FSDP fit only rank zero reads the checkpoint; rank
one builds the model on the meta device (no weight in host memory) and FSDP broadcasts rank
zero's weights into each unit as it wraps (``sync_module_states``). After wrapping every full
weight, gathered on every rank, equals the file's. Each rank's host-memory growth while
building is printed. Run as a script by the slow test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from tests.train.test_zero3_memory import (
    _file_key,
    _status,
    build_model_dir,
    fit_measured,
    run_two_ranks,
)


def _worker(model_dir: str, out: Path) -> None:
    import lightning as L
    from safetensors import safe_open
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from attanchor.train.sharding import clean_param_name
    from attanchor.train.strategies import build_strategy

    class Check(L.Callback):
        def on_train_start(self, trainer, module) -> None:
            rank = trainer.global_rank
            files = sorted(Path(model_dir).glob("*.safetensors"))
            handles = [safe_open(str(f), framework="pt") for f in files]
            keys = {k: h for h in handles for k in h.keys()}
            checked, wrong = 0, []
            with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
                for name, p in module.hf_model.named_parameters():
                    name = clean_param_name(name)
                    if "lora_" in name:
                        continue
                    key = _file_key(name)
                    checked += 1
                    if not torch.equal(p.detach(), keys[key].get_tensor(key)):
                        wrong.append(key)
            result = {"rank": rank, "built_empty": module.built_empty,
                      "meta_after_build": module.meta_after_build, "reset_ok": module.reset_ok,
                      "before": module.before, "after": module.after,
                      "at_train_start": _status(), "checked": checked, "file_keys": len(keys),
                      "wrong": wrong[:5]}
            (out / f"rank{rank}.json").write_text(json.dumps(result))

    fit_measured(model_dir, build_strategy("fsdp", accelerator="cpu"), Check())


@pytest.mark.slow
def test_fsdp_other_ranks_build_on_meta_and_receive_rank_zeros_weights(tmp_path):
    model_dir, n_params = build_model_dir(tmp_path / "model")
    full_copy = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    ranks = run_two_ranks("tests.train.test_fsdp_meta", model_dir, tmp_path / "out")
    mb = 1 << 20
    print(f"\nFSDP load, 2 CPU processes: {n_params / 1e6:.1f}M parameters, one full copy "
          f"{full_copy / mb:.0f} MiB")
    for r in ranks:
        r["growth"] = r["after"]["VmHWM"] - r["before"]["VmRSS"]
        print(f"  rank {r['rank']}: built on meta {r['built_empty']}; peak growth while "
              f"building {r['growth'] / mb:.0f} MiB = {r['growth'] / full_copy:.2f} x one copy; "
              f"RSS at train start {r['at_train_start']['VmRSS'] / mb:.0f} MiB")
    assert all(r["reset_ok"] for r in ranks)
    assert [r["built_empty"] for r in ranks] == [False, True]
    assert [r["meta_after_build"] for r in ranks] == [False, True]
    for r in ranks:  # after wrapping, every rank holds the file's weights (LoRA aside)
        assert r["checked"] == r["file_keys"] and r["wrong"] == [], r
    # Figures only, no memory target: rank zero's from_pretrained maps the safetensors lazily,
    # so its growth here is not a copy either; what the test proves is that rank one reads no
    # weight and still ends with rank zero's (the broadcast), as on 8 GPUs.


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    _worker(args.model, args.out)
