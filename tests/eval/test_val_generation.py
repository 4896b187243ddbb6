"""Evaluation during training: accuracy at each validation, equal to an independent evaluate()
on the same weights, and usable as the early-stopping monitor.

The tiny model is fully fine-tuned at a high constant learning rate so that within a dozen
steps its answers move (empty -> "yes" ...) and the accuracies are not all zero.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback, EarlyStopping

from attanchor.eval.evaluate import evaluate
from attanchor.eval.val_generation import ValGenerationCallback, ValGenerationSettings
from attanchor.train.checkpoint import load_anchored
from attanchor.train.cli import check_monitor
from tests.train.test_cli import fit

KEYS = ("val/pope_acc", "val/pope_f1", "val/vqa_acc")


class SaveAtEachValidation(Callback):
    """Writes the weights every validation scored: ``<run>/val-step<k>.ckpt``."""

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            trainer.save_checkpoint(Path(trainer.default_root_dir) /
                                    f"val-step{trainer.global_step}.ckpt")


CALLBACK = "attanchor.eval.val_generation.ValGenerationCallback"


def learning_fit(world, root: Path, *extra: str, also: tuple[str, ...] = ()):
    d = world["data"]
    gen = {"pope": str(d / "pope.jsonl"), "vqa": str(d / "vqa_test.json"), "limit": 8,
           "batch_size": 4}
    callbacks = [{"class_path": CALLBACK, "init_args": gen},
                 *({"class_path": c} for c in also)]
    return fit(world, root, "--trainer.max_steps", "12", "--trainer.val_check_interval", "3",
               "--trainer.log_every_n_steps", "1", "--run.wandb", "false",
               "--model.model.mode", "full", "--model.optim.lr", "0.003",
               "--model.optim.warmup_ratio", "0", "--model.optim.schedule", "constant",
               "--trainer.callbacks", json.dumps(callbacks), *extra)


def val_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("val/loss")]


def test_accuracy_at_each_validation_equals_evaluate(tiny_world, tmp_path):
    cli = learning_fit(tiny_world, tmp_path, "--run.early_stopping_patience", "null",
                       also=("tests.eval.test_val_generation.SaveAtEachValidation",))
    run = tmp_path / "demo" / "text_into_image-seed0"
    rows = val_rows(run)
    assert [int(r["step"]) for r in rows] == [2, 5, 8, 11]  # four validations, 3 steps apart
    for r in rows:
        assert all(r[k] != "" for k in KEYS), r  # logged beside val/loss at every validation
    d = tiny_world["data"]
    for r in rows:
        loaded = load_anchored(run / f"val-step{int(r['step']) + 1}.ckpt")
        got = {}
        for task, path in (("pope", d / "pope.jsonl"), ("vqa", d / "vqa_test.json")):
            got[task] = evaluate(loaded.anchored, loaded.processor, path, task,
                                 image_root=d / "images", out_dir=tmp_path / task,
                                 template=loaded.render.template, scope=loaded.render.scope,
                                 limit=8, batch_size=4, progress=False)
        # Exact: the same weights, questions and batches give the same answers and scores.
        assert float(r["val/pope_acc"]) == got["pope"]["accuracy"]
        assert float(r["val/pope_f1"]) == got["pope"]["f1"]
        assert float(r["val/vqa_acc"]) == got["vqa"]["accuracy"]
    # Training moved the answers: the accuracy is not one constant over the run.
    assert len({r["val/pope_acc"] for r in rows}) > 1
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ValGenerationCallback))
    with open(tmp_path / "vqa" / "predictions.jsonl") as f:  # the last evaluate() call's
        evaluated = [json.loads(line)["prediction"] for line in f]
    assert [p["prediction"] for p in callback.last_predictions["vqa"]] == evaluated


def test_early_stopping_on_pope_accuracy(tiny_world, tmp_path):
    cli = learning_fit(tiny_world, tmp_path, "--run.early_stopping_monitor", "val/pope_acc",
                       "--run.early_stopping_mode", "max", "--run.early_stopping_patience", "1")
    stopper = next(c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping))
    assert (stopper.monitor, stopper.mode, stopper.patience) == ("val/pope_acc", "max", 1)
    acc = [float(r["val/pope_acc"]) for r in val_rows(tmp_path / "demo" / "text_into_image-seed0")]
    # Patience 1, mode max: stop at the first validation that does not beat the best so far.
    first_stall = next(i for i in range(1, len(acc)) if acc[i] <= max(acc[:i]))
    assert len(acc) == first_stall + 1
    assert cli.trainer.global_step == 3 * (first_stall + 1) < 12  # stopped before max_steps


def test_settings_and_monitor_fail_early(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="pope and/or vqa"):
        ValGenerationSettings()
    with pytest.raises(ValueError, match="limit"):
        ValGenerationSettings(pope="p.jsonl", limit=0)
    vqa_only = ValGenerationCallback(vqa="v.json")
    assert vqa_only.logged_keys == ("val/vqa_acc",)
    assert ValGenerationCallback(pope="p.jsonl").logged_keys == ("val/pope_acc", "val/pope_f1")
    with pytest.raises(ValueError, match="'val/pope_acc' is logged by nothing"):
        check_monitor("val/pope_acc", [vqa_only])
    check_monitor("val/loss", [])  # the default watches val/loss only
    check_monitor("val/vqa_acc", [vqa_only])
    with pytest.raises(ValueError, match="'val/vqa_acc' is logged by nothing"):
        fit(tiny_world, tmp_path, "--trainer.max_steps", "1", "--run.wandb", "false",
            "--run.early_stopping_monitor", "val/vqa_acc")
    d = tiny_world["data"]
    no_val = [{"class_path": CALLBACK, "init_args": {"vqa": str(d / "vqa_test.json")}}]
    with pytest.raises(ValueError, match="has none: set data.val_file"):
        fit(tiny_world, tmp_path / "noval", "--trainer.max_steps", "1", "--run.wandb", "false",
            "--data.val_file", "null", "--trainer.callbacks", json.dumps(no_val))


# -- several ranks ---------------------------------------------------------------------------

LIMIT, BATCH = 5, 2  # three batches: [0,1] -> rank 0, [2,3] -> rank 1, [4] -> rank 0


def _subset_worker(rank: int, world: int, port: int, model_dir: str, data: str, images: str,
                   out: str) -> None:
    """One rank: answer the subset without and with lockstep; count its prompt batches."""
    import os

    import torch
    import torch.distributed as dist
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from attanchor.anchoring import AnchorConfig, AnchoredVLM
    from attanchor.data.render import Renderer
    from attanchor.eval.evaluate import read_pope
    from attanchor.eval.val_generation import answer_subset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    prefill: list[int] = []  # rows of each prompt-embedding call (decode steps have L = 1)
    model.get_input_embeddings().register_forward_hook(
        lambda m, args, output: prefill.append(args[0].shape[0]) if args[0].shape[1] > 1
        else None)
    anchored = AnchoredVLM(model, AnchorConfig(threshold=-1.0))
    renderer = Renderer(AutoProcessor.from_pretrained(model_dir), image_root=images)
    items = read_pope(data)[:LIMIT]
    result = {}
    for lockstep in (False, True):
        prefill.clear()
        preds = answer_subset(anchored, renderer, items, batch_size=BATCH, max_new_tokens=3,
                              rank=rank, world=world, lockstep=lockstep)
        result[str(lockstep)] = {"preds": preds, "prefill": list(prefill)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_answer_by_batch_and_agree(tiny_world, tmp_path):
    import socket

    import torch.multiprocessing as mp
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from attanchor.anchoring import AnchorConfig, AnchoredVLM
    from attanchor.data.render import Renderer
    from attanchor.eval.evaluate import generate_answers, read_pope

    data, images, model_dir = tiny_world["data"] / "pope.jsonl", tiny_world["images"], \
        tiny_world["model"]
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    single = generate_answers(AnchoredVLM(model, AnchorConfig(threshold=-1.0)),
                              Renderer(AutoProcessor.from_pretrained(model_dir),
                                       image_root=images),
                              read_pope(data)[:LIMIT], batch_size=BATCH, max_new_tokens=3,
                              progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_subset_worker, args=(2, port, str(model_dir), str(data), str(images),
                                   str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:  # every rank: all answers, in order, equal to one process's
        assert r["False"]["preds"] == r["True"]["preds"] == single
    # Batch k on rank k % 2: rank 0 answers batches 0 (2 rows) and 2 (1 row), rank 1 batch 1.
    assert [r["False"]["prefill"] for r in ranks] == [[2, 1], [2]]
    # Lockstep: rank 1 re-runs batch 0 so both ranks make two (collective) generate calls.
    assert [r["True"]["prefill"] for r in ranks] == [[2, 1], [2, 2]]
