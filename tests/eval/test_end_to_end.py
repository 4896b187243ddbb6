"""Evaluation, compare, calibrate and visualize end to end on the tiny world (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.cli import main as cli_main
from attanchor.eval.calibrate import threshold_for_fraction
from attanchor.eval.compare import compare
from attanchor.eval.evaluate import evaluate, read_pope, read_vqa
from tests.conftest import world_overrides

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "recipes" / "demo" / "anchored.yaml")
FAST = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1", "--data.batch_size", "8",
        "--trainer.enable_progress_bar", "false", "--run.wandb", "false"]


def test_readers(tiny_world):
    pope = read_pope(tiny_world["data"] / "pope.jsonl")
    assert pope and all(it.answer in ("yes", "no") for it in pope)
    first = pope[0].conversation
    assert first.turns[0].role == "user" and first.turns[0].text.startswith("<image>\n")
    vqa = read_vqa(tiny_world["data"] / "vqa_test.json")
    assert vqa and all(len(it.conversation.turns) == 1 for it in vqa)


@pytest.mark.parametrize("task,file", [("pope", "pope.jsonl"), ("vqa", "vqa_test.json")])
def test_evaluate_tiny_model(tiny_world, tmp_path, task, file):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_world["model"]).eval()
    processor = AutoProcessor.from_pretrained(tiny_world["model"])
    # threshold -1: every candidate becomes an anchor, so the count is checkable.
    anchored = AnchoredVLM(model, AnchorConfig(threshold=-1.0))
    metrics = evaluate(anchored, processor, tiny_world["data"] / file, task,
                       image_root=tiny_world["images"], out_dir=tmp_path, limit=10,
                       batch_size=4, max_new_tokens=3, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert 0.0 <= metrics["accuracy"] <= 1.0
    # Every prompt word of the question is a candidate; at least "is"/"what" and a noun.
    assert metrics["anchors_per_prompt"] >= 2
    if task == "pope":
        assert {"precision", "recall", "f1", "yes_ratio", "per_category"} <= set(metrics)


@pytest.fixture(scope="module")
def compared(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    logs: list[str] = []
    res = compare(DEMO, seeds=[0], strategies=["none", "text_into_image"],
                  evals={"pope": str(tiny_world["data"] / "pope.jsonl"),
                         "vqa": str(tiny_world["data"] / "vqa_test.json")},
                  image_root=str(tiny_world["images"]), limit=8, batch_size=8,
                  overrides=[*world_overrides(tiny_world, out / "runs"), *FAST],
                  log=logs.append)
    return {"res": res, "out": out, "logs": logs}


def test_compare_writes_report_files(compared):
    paths = compared["res"]["paths"]
    report = Path(paths["report_md"]).read_text()
    assert "pope/f1" in report and "text_into_image" in report and "none" in report
    assert Image.open(paths["report_png"]).size[0] > 100
    data = json.loads(Path(paths["metrics_json"]).read_text())
    assert set(data["results"]) == {"none", "text_into_image"}
    assert set(data["results"]["none"]["0"]) >= {"pope/accuracy", "vqa/accuracy"}
    assert data["summary"]["baseline_arm"] == "none"
    arm = compared["out"] / "runs" / "demo" / "text_into_image-seed0"
    assert (arm / "eval" / "pope" / "predictions.jsonl").exists()
    assert data["results"]["text_into_image"]["0"]["pope/anchors_per_prompt"] > 0
    assert data["results"]["none"]["0"]["pope/anchors_per_prompt"] == 0
    # curves.png: one panel per logged key (val/loss here: 2 steps log no train/loss).
    assert Path(paths["curves_png"]) == compared["out"] / "runs" / "demo" / "curves.png"
    assert Image.open(paths["curves_png"]).size[0] > 100
    assert "wandb_run" not in paths  # run.wandb false: nothing logged to W&B


def test_compare_logs_its_table_and_figures_to_the_arms_wandb_group(compared, tmp_path,
                                                                     monkeypatch):
    """The writer-rank step of compare with run.wandb on: an offline `compare` run in the
    recipe's W&B group holding the per-arm table (read back from the run's files)."""
    from types import SimpleNamespace

    from attanchor.eval.compare import _curves_and_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    res, runs = compared["res"], compared["out"] / "runs" / "demo"
    parsed = SimpleNamespace(run=SimpleNamespace(wandb=True, name="demo",
                                                 wandb_project="attanchor"))
    trained = {d.name: d for d in sorted(runs.glob("*-seed0"))}
    extra = _curves_and_wandb(parsed, tmp_path, trained, res["summary"], res["paths"], print)
    assert extra["curves_png"] == tmp_path / "curves.png"
    run_dir = extra["wandb_run"]
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    (table,) = (run_dir / "files" / "media" / "table" / "compare").glob("summary_*.table.json")
    rows = json.loads(table.read_text())["data"]
    acc = {(r[0], r[1]): r[3] for r in rows}  # (metric, arm) -> mean
    for arm in ("none", "text_into_image"):
        assert acc[("pope/accuracy", arm)] == res["results"][arm][0]["pope/accuracy"]
    media = run_dir / "files" / "media" / "images" / "compare"
    assert len(list(media.glob("report_*.png"))) == 1 and len(list(media.glob("curves_*.png"))) == 1


def test_compare_reuses_finished_arms(compared, tiny_world):
    logs: list[str] = []
    out = compared["out"]
    compare(DEMO, seeds=[0], strategies=["none", "text_into_image"],
            evals={"pope": str(tiny_world["data"] / "pope.jsonl")},
            image_root=str(tiny_world["images"]), limit=8,
            overrides=[*world_overrides(tiny_world, out / "runs"), *FAST], log=logs.append)
    assert sum("reusing" in line for line in logs) == 2
    assert not any("training" in line for line in logs)


def test_eval_cli_on_a_checkpoint(compared, tiny_world, tmp_path, capsys):
    ckpt = compared["out"] / "runs" / "demo" / "text_into_image-seed0" / "checkpoints" / "last.ckpt"
    code = cli_main(["eval", "--checkpoint", str(ckpt), "--data",
                     str(tiny_world["data"] / "pope.jsonl"), "--task", "pope", "--image-root",
                     str(tiny_world["images"]), "--out", str(tmp_path), "--limit", "6",
                     "--anchor.strategy", "none"])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["anchors_per_prompt"] == 0


def test_visualize_writes_png(compared, tiny_world, tmp_path):
    ckpt = compared["out"] / "runs" / "demo" / "text_into_image-seed0" / "checkpoints" / "last.ckpt"
    image = next((tiny_world["images"] / "test").glob("*.png"))
    out = tmp_path / "vis.png"
    code = cli_main(["visualize", "--checkpoint", str(ckpt), "--image", str(image), "--prompt",
                     "is there a red circle in the image ?", "--out", str(out),
                     "--anchor.threshold", "-1", "--max-new-tokens", "2"])
    assert code == 0
    # Documented size: the image scaled so its longer side is 640 px, plus a 360 px panel.
    assert Image.open(out).size == (640 + 360, 640)


def test_calibrate_cli(tiny_world, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    d = tiny_world["data"]
    recipe.write_text(
        f"extends: {DEMO}\nmodel: {{model_path: {tiny_world['model']}}}\n"
        f"data: {{train_file: {d / 'train.json'}, val_file: null, test_file: null, "
        f"image_root: {d / 'images'}, batch_size: 8}}\n")
    out = tmp_path / "cal.png"
    assert cli_main(["calibrate", "--config", str(recipe), "--target-fraction", "0.25",
                     "--batches", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "tau =" in text
    # The printed tau is the 25% quantile rule applied to the gathered similarities.
    from attanchor.eval.calibrate_run import gather_similarities
    from attanchor.train.recipe import resolve_recipe

    sims = gather_similarities(resolve_recipe(recipe), 2)
    assert sims.numel() > 0 and torch.isfinite(sims).all()
    tau = threshold_for_fraction(sims, 0.25)
    assert f"tau = {tau:.4f}" in text


@pytest.mark.parametrize("merge", [True, False])
def test_export_cli_then_reload_gives_the_same_logits(compared, tiny_world, tmp_path, merge):
    from attanchor.train.checkpoint import load_anchored, load_module

    ckpt = compared["out"] / "runs" / "demo" / "text_into_image-seed0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "export"
    args = ["export", "--checkpoint", str(ckpt), "--out", str(out)] + (["--merge"] if merge else [])
    assert cli_main(args) == 0
    assert json.loads((out / "anchor_config.json").read_text())["strategy"] == "text_into_image"
    assert list(out.glob("*.safetensors"))
    module = load_module(ckpt)
    reloaded, processor = load_anchored(out)
    assert reloaded.config == module.anchor_config
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = module.hf_model(input_ids=ids).logits
        got = reloaded.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    if merge:  # a plain HF directory: transformers alone opens it
        plain = LlavaForConditionalGeneration.from_pretrained(out)
        assert torch.allclose(plain(input_ids=ids).logits, want, atol=1e-5)
        assert AutoProcessor.from_pretrained(out).tokenizer.chat_template
