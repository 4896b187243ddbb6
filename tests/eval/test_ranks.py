"""Evaluation under several processes: shards, ordered gather, one writer (2 CPU processes)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from attanchor.eval.ranks import eval_world, shard_bounds
from tests.conftest import world_overrides

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "recipes" / "demo" / "anchored.yaml")
FAST = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1", "--data.batch_size", "8",
        "--trainer.enable_progress_bar", "false", "--run.wandb", "false"]
LIMIT, BATCH = 7, 2  # shards of 4 and 3 items: batches [0,1] [2,3] | [4,5] [6], as in one process


@pytest.mark.parametrize("n,world,want", [
    (7, 2, [(0, 4), (4, 7)]),
    (5, 3, [(0, 2), (2, 4), (4, 5)]),
    (1, 2, [(0, 1), (1, 1)]),  # a rank may get nothing
    (0, 2, [(0, 0), (0, 0)]),
    (6, 1, [(0, 6)]),
])
def test_shards_cover_every_item_once_in_order(n, world, want):
    assert [shard_bounds(n, r, world) for r in range(world)] == want


def test_shard_bounds_rejects_bad_ranks():
    with pytest.raises(ValueError, match="0 <= rank < world"):
        shard_bounds(4, 2, 2)


def test_one_process_is_world_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert eval_world() == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 but \[.*'MASTER_ADDR'"):
        eval_world()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def _evaluate_worker(rank: int, world: int, port: int, model_dir: str, data: str, images: str,
                     out: str) -> None:
    """One torchrun-like rank: evaluate, count the prompts this rank answered itself."""
    import torch.distributed as dist
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from attanchor.anchoring import AnchorConfig, AnchoredVLM
    from attanchor.eval.evaluate import evaluate

    _torchrun_env(rank, world, port)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    prefill: list[int] = []  # rows of each prompt-embedding call (L > 1; decode steps are L = 1)
    model.get_input_embeddings().register_forward_hook(
        lambda m, args, output: prefill.append(args[0].shape[0]) if args[0].shape[1] > 1
        else None)
    metrics = evaluate(AnchoredVLM(model, AnchorConfig(threshold=-1.0)),
                       AutoProcessor.from_pretrained(model_dir), data, "pope", image_root=images,
                       out_dir=Path(out) / f"rank{rank}", limit=LIMIT, batch_size=BATCH,
                       max_new_tokens=3, progress=False)
    Path(out, f"result{rank}.json").write_text(json.dumps(
        {"metrics": metrics, "prompts": sum(prefill), "world": dist.get_world_size()}))
    dist.destroy_process_group()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_split_gather_and_write_once(tiny_world, tmp_path, monkeypatch):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from attanchor.anchoring import AnchorConfig, AnchoredVLM
    from attanchor.eval.evaluate import evaluate

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data, images = tiny_world["data"] / "pope.jsonl", tiny_world["images"]
    model = LlavaForConditionalGeneration.from_pretrained(tiny_world["model"]).eval()
    single = evaluate(AnchoredVLM(model, AnchorConfig(threshold=-1.0)),
                      AutoProcessor.from_pretrained(tiny_world["model"]), data, "pope",
                      image_root=images, out_dir=tmp_path / "single", limit=LIMIT,
                      batch_size=BATCH, max_new_tokens=3, progress=False)

    out = tmp_path / "ddp"
    mp.spawn(_evaluate_worker, args=(2, _free_port(), str(tiny_world["model"]), str(data),
                                     str(images), str(out)), nprocs=2, join=True)
    results = [json.loads((out / f"result{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2]
    assert [r["prompts"] for r in results] == [4, 3]  # each item answered once, by one rank
    assert [r["metrics"] for r in results] == [single, single]  # every rank: all items' metrics
    # Only rank zero writes; what it wrote is the single-process file, row for row.
    assert sorted(p.name for p in out.iterdir()) == ["rank0", "result0.json", "result1.json"]
    assert _rows(out / "rank0" / "predictions.jsonl") == _rows(tmp_path / "single" /
                                                               "predictions.jsonl")
    assert len(_rows(out / "rank0" / "predictions.jsonl")) == LIMIT


def _compare_worker(rank: int, world: int, port: int, overrides: list[str], evals: dict,
                    images: str, out: str) -> None:
    import torch.distributed as dist

    from attanchor.eval.compare import compare

    _torchrun_env(rank, world, port)
    logs: list[str] = []
    res = compare(DEMO, seeds=[0], strategies=["text_into_image"], evals=evals,
                  image_root=images, limit=LIMIT, batch_size=BATCH, overrides=overrides,
                  out_dir=Path(out) / f"report{rank}", log=logs.append, device="cpu")
    Path(out, f"result{rank}.json").write_text(json.dumps(
        {"logs": logs, "rank": res["rank"], "report": str(res["paths"]["report_md"]),
         "results": res["results"]}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_compare_under_two_processes_evaluates_shards_and_reports_once(tiny_world, tmp_path,
                                                                        monkeypatch):
    from attanchor.eval.compare import compare

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    evals = {"pope": str(tiny_world["data"] / "pope.jsonl")}
    images = str(tiny_world["images"])
    overrides = [*world_overrides(tiny_world, tmp_path / "runs"), *FAST]
    single = compare(DEMO, seeds=[0], strategies=["text_into_image"], evals=evals,
                     image_root=images, limit=LIMIT, batch_size=BATCH, overrides=overrides,
                     out_dir=tmp_path / "single", log=lambda line: None)
    arm = tmp_path / "runs" / "demo" / "text_into_image-seed0"
    want = _rows(arm / "eval" / "pope" / "predictions.jsonl")
    shutil.rmtree(arm / "eval")  # trained, not evaluated: the 2 processes evaluate it

    out = tmp_path / "ddp"
    mp.spawn(_compare_worker, args=(2, _free_port(), overrides, evals, images, str(out)),
             nprocs=2, join=True)
    results = [json.loads((out / f"result{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1]
    want_results = json.loads(json.dumps(single["results"]))  # seeds as JSON keys ("0")
    assert [r["results"] for r in results] == [want_results] * 2
    # One report, by rank zero; both ranks are told where it is; one log, not two.
    assert sorted(p.name for p in out.iterdir()) == ["report0", "result0.json", "result1.json"]
    assert [r["report"] for r in results] == [str(out / "report0" / "report.md")] * 2
    assert results[0]["logs"] == [f"[compare] evaluating {arm} (pope: no evaluation yet)"]
    assert results[1]["logs"] == []
    assert _rows(arm / "eval" / "pope" / "predictions.jsonl") == want
