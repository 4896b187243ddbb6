"""Mixed image / text-only data on 2 CPU processes: DDP, ZeRO-2, ZeRO-3 and FSDP complete.

Before issue 9 a batch without an image skipped the vision tower and projector, so ranks ran
different modules: DDP hung (its reducer waits for the projector's gradients) and ZeRO-3 died
(the ranks' parameter gathers no longer matched). The worker (``python -m
tests.train.test_text_only_dist``) trains the product's ``AnchorModule`` as the demo recipe
does (LoRA on the LLM and the projector, the vision tower frozen) for 3 steps on data where
rank 0 gets only image samples and rank 1 only text-only ones, then writes what it saw. A
hang fails the test through the subprocess timeout instead of blocking it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
TIMEOUT_S = 240  # a passing run takes 15-40 s on 2 cores
# One anchoring path per strategy, so each strategy also covers a different forward:
# ZeRO-3 with pause tokens looks the pad embedding up while the table is partitioned.
CASES = {
    "ddp": {"strategy": "text_into_image", "threshold": None, "top_fraction": 0.5},
    "deepspeed_stage_2": {"strategy": "random", "threshold": None, "top_fraction": 0.5},
    "deepspeed_stage_3": {"strategy": "image_into_text", "threshold": None,
                          "top_fraction": 0.25, "pause_tokens": 2},
    "fsdp": {"strategy": "none"},
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.train import build_tiny_llava_dir

    return build_tiny_llava_dir(tmp_path_factory.mktemp("tiny-llava-text-only"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(CASES))
def test_one_rank_without_images_completes(strategy, tmp_path, tiny_dir):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MASTER_PORT", None)
    cmd = [sys.executable, "-m", "tests.train.test_text_only_dist", "--strategy", strategy,
           "--model", str(tiny_dir), "--out", str(tmp_path)]
    # Own session: on a hang the whole group goes (Lightning spawns rank 1 as a child).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{strategy}: no end in {TIMEOUT_S} s (a rank waits on a collective the "
                    f"other never joins)\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in res] == [2, 2]
    assert [r["global_step"] for r in res] == [STEPS, STEPS]
    # rank 0 saw image batches only, rank 1 text-only batches only
    assert res[0]["had_images"] == [True] * STEPS and res[1]["had_images"] == [False] * STEPS
    for r in res:
        assert len(r["losses"]) == STEPS and all(math.isfinite(x) for x in r["losses"])
        assert r["projector_lora_b_nonzero"]  # trained, through rank 0's image gradients
    # The ranks hold the same weights: gradients (zero on rank 1's projector) were reduced.
    assert res[0]["trainable_sums"] == res[1]["trainable_sums"]
    assert len(res[0]["trainable_sums"]) > 0
    assert all(r["pause_is_pad_row"] for r in res)
    if strategy == "deepspeed_stage_3":  # the table is empty outside a forward, as on a GPU
        assert res[0]["pause_used"] and res[0]["weight_numel_outside_forward"] == 0


# --------------------------------------------------------------------------- the worker


def _sample(i: int):
    """Even i: ``<s> <image>*64 prompt(4) answer(4)`` with a 64x64 image; odd i: the same
    text without the image (a text-only record). Prompt tokens are candidates."""
    from attanchor.data.render import RenderedSample
    from tests.train import IMAGE_TOKEN_ID, N_IMAGE_TOKENS, VOCAB_SIZE

    g = torch.Generator().manual_seed(i)
    text = torch.randint(10, VOCAB_SIZE, (8,), generator=g)
    image = i % 2 == 0
    head = [1] + [IMAGE_TOKEN_ID] * (N_IMAGE_TOKENS if image else 0)
    ids = torch.cat([torch.tensor(head), text])
    labels = ids.clone()
    labels[: len(head) + 4] = -100
    cand = torch.zeros(len(ids), dtype=torch.bool)
    cand[len(head): len(head) + 4] = True
    pixels = torch.randn(1, 3, 64, 64, generator=g) if image else None
    return RenderedSample(f"rec{i}", ids, labels, cand, pixels)


def _worker(strategy_name: str, model_dir: str, out: Path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, Sampler

    from attanchor.anchoring import AnchorConfig
    from attanchor.data.collate import collate
    from attanchor.train.module import AnchorModule, LoraSettings, ModelSettings, OptimSettings
    from attanchor.train.strategies import build_strategy
    from tests.train.test_strategies import _full_parameters

    class Record(L.Callback):
        def __init__(self) -> None:
            self.had_images: list[bool] = []
            self.ids: list[list[str]] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.had_images.append(batch["pixel_values"] is not None)
            self.ids.append(batch["ids"])

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    module = AnchorModule(
        model_dir, anchor=AnchorConfig(**CASES[strategy_name]),
        model=ModelSettings(mode="lora", freeze_vision_tower=True, attn_implementation="eager",
                            lora=LoraSettings(r=4, alpha=8, dropout=0.0, train_projector=True)),
        optim=OptimSettings(lr=1e-2, warmup_ratio=0.0, schedule="constant"))
    class RankSplit(Sampler):
        """Rank r gets items r, r + 2, ...: rank 0 the image records, rank 1 the text-only
        ones (Lightning's own DistributedSampler shuffles them together)."""

        def __init__(self, n: int) -> None:
            self.n = n

        def __iter__(self):
            return iter(range(torch.distributed.get_rank(), self.n, 2))

        def __len__(self) -> int:
            return self.n // 2

    samples = [_sample(i) for i in range(4 * STEPS)]
    loader = DataLoader(samples, batch_size=2, sampler=RankSplit(len(samples)),
                        collate_fn=lambda b: collate(b, pad_token_id=0))
    record = Record()
    strategy = build_strategy(strategy_name, accelerator="cpu")
    if strategy_name == "deepspeed_stage_3":
        # ZeRO-3 keeps parameters under 1e5 elements whole ("persistent"): every parameter
        # of the tiny model. 0 partitions them all, as a 7B model's are, so every module's
        # forward (the vision tower's included) gathers its weights across the ranks.
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=STEPS,
                        strategy=strategy,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record],
                        use_distributed_sampler=False,
                        default_root_dir=str(out))
    trainer.fit(module, loader)
    # Outside any forward: ZeRO-3 has partitioned the embedding table to an empty placeholder,
    # the pause lookup (through the embedding's forward) still gets the whole pad row.
    table = module.anchored.model.get_input_embeddings()
    weight_numel_outside_forward = table.weight.numel()
    with torch.no_grad():
        pause = module.anchored._pause_embedding(torch.device("cpu"))
    with _full_parameters(trainer):  # collective: whole parameters under ZeRO-3 / FSDP
        trainable = {n: p.detach().float() for n, p in module.named_parameters()
                     if p.requires_grad}
        sums = {n: float(p.double().sum()) for n, p in sorted(trainable.items())}
        proj_b = [p for n, p in trainable.items()
                  if "multi_modal_projector" in n and "lora_B" in n]
        proj_nonzero = bool(proj_b) and all(bool(p.abs().sum() > 0) for p in proj_b)
        pad_row = table.weight[0].detach().clone()  # pad id 0 (tests.train's tiny config)
    pause_ok = pause is None or (pause.shape == pad_row.shape and torch.equal(pause, pad_row))
    result = {"world_size": trainer.world_size, "global_step": trainer.global_step,
              "had_images": record.had_images, "ids": record.ids, "losses": record.losses,
              "trainable_sums": sums, "projector_lora_b_nonzero": proj_nonzero,
              "pause_is_pad_row": pause_ok, "pause_used": pause is not None,
              "weight_numel_outside_forward": weight_numel_outside_forward}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", required=True, choices=sorted(CASES))
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    _worker(args.strategy, args.model, args.out)
