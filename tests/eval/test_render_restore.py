"""A run's chat template and candidate scope travel with its checkpoint and export, and
evaluation renders prompts with them unless a flag says otherwise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoProcessor

from attanchor.cli import main as cli_main
from attanchor.data.datamodule import VLMDataModule
from attanchor.data.tiny import CHAT_TEMPLATE
from attanchor.train.checkpoint import load_anchored, render_settings_of
from attanchor.train.export import RenderSettings
from tests.conftest import world_overrides

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "recipes" / "demo" / "anchored.yaml")
FAST = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
        "--data.batch_size", "4", "--trainer.enable_progress_bar", "false",
        "--run.wandb", "false"]
# The tiny model's own template is LLaVA-1.5's, which its lowercasing tokenizer renders like
# the named "llava-1.5"; this copy says "the user :" so the two renders differ by one token.
OWN_TEMPLATE = CHAT_TEMPLATE.replace("'USER: '", "'the USER: '")
NAMED_PROMPT = "<s> user : <image> does the image contain a circle? assistant :"
OWN_PROMPT = "<s> the user : <image> does the image contain a circle? assistant :"
TRAINED = RenderSettings(template="llava-1.5", scope="all_user_turns", format="llava")


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
    """One step of `attanchor fit` with template llava-1.5 and scope all_user_turns, on a copy
    of the tiny model whose own chat template differs from llava-1.5."""
    from attanchor.train.cli import build_cli

    root = tmp_path_factory.mktemp("render")
    model = root / "model"
    processor = AutoProcessor.from_pretrained(tiny_world["model"])
    processor.chat_template = processor.tokenizer.chat_template = OWN_TEMPLATE
    processor.save_pretrained(model)
    for f in tiny_world["model"].iterdir():
        if f.suffix in (".safetensors", ".json") and not (model / f.name).exists():
            (model / f.name).write_bytes(f.read_bytes())
    overrides = world_overrides(tiny_world, root / "runs")
    overrides[overrides.index("--model.model_path") + 1] = str(model)
    build_cli(["fit", "--config", DEMO, *overrides, *FAST, "--data.template", "llava-1.5",
               "--model.anchor.scope", "all_user_turns"])
    ckpt = next((root / "runs").rglob("last.ckpt"))
    return {"root": root, "ckpt": ckpt, "model": model}


def _eval_prompts(run, tiny_world, out: Path, *extra: str) -> list[str]:
    assert cli_main(["eval", "--checkpoint", str(run["ckpt"]), "--data",
                     str(tiny_world["data"] / "pope.jsonl"), "--task", "pope", "--image-root",
                     str(tiny_world["images"]), "--out", str(out), "--limit", "2",
                     "--max-new-tokens", "1", "--device", "cpu", *extra]) == 0
    return [json.loads(line)["prompt"]
            for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_checkpoint_stores_the_render_settings(run):
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    stored = dict(ckpt["VLMDataModule"])
    assert stored.pop("sampler")["epoch"] == 0  # the training order's position (resume)
    assert stored == {"template": "llava-1.5", "scope": "all_user_turns", "format": "llava"}
    assert render_settings_of(run["ckpt"]) == TRAINED
    loaded = load_anchored(run["ckpt"])
    assert loaded.render == TRAINED and loaded.anchored.config.scope == "all_user_turns"
    anchored, processor = loaded  # still unpacks as the pair it used to be
    assert anchored is loaded.anchored and processor is loaded.processor


def test_eval_renders_with_the_trained_template_by_default(run, tiny_world, tmp_path):
    prompts = _eval_prompts(run, tiny_world, tmp_path / "default")
    assert prompts[0] == NAMED_PROMPT
    # The ids the model read are llava-1.5's render of the item, not the model's own.
    from attanchor.data.render import Renderer
    from attanchor.eval.evaluate import prompt_text, read_pope

    processor = AutoProcessor.from_pretrained(run["model"])
    item = read_pope(tiny_world["data"] / "pope.jsonl")[0]
    for template, want in (("llava-1.5", NAMED_PROMPT), (None, OWN_PROMPT)):
        ids = Renderer(processor, template=template, image_root=tiny_world["images"])(
            item.conversation, for_generation=True).input_ids
        assert prompt_text(processor.tokenizer, ids, processor.image_token_id) == want
    assert prompts[0] != OWN_PROMPT


def test_explicit_flags_override(run, tiny_world, tmp_path):
    assert _eval_prompts(run, tiny_world, tmp_path / "own", "--template", "model")[0] \
        == OWN_PROMPT
    loaded = load_anchored(run["ckpt"], template=None, scope="image_turn")
    assert loaded.render == RenderSettings(template=None, scope="image_turn")
    assert loaded.anchored.config.scope == "image_turn"


def test_export_round_trips_the_render_settings(run, tiny_world, tmp_path):
    out = tmp_path / "export"
    assert cli_main(["export", "--checkpoint", str(run["ckpt"]), "--out", str(out),
                     "--merge"]) == 0
    assert json.loads((out / "render_config.json").read_text()) == TRAINED.to_dict()
    loaded = load_anchored(out)
    assert loaded.render == TRAINED and loaded.anchored.config.scope == "all_user_turns"
    run_export = {**run, "ckpt": out}
    assert _eval_prompts(run_export, tiny_world, tmp_path / "e")[0] == NAMED_PROMPT


def test_bad_stored_settings_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "render_config.json").write_text(json.dumps({"template": "vicuna"}))
    with pytest.raises(ValueError, match=r"render_config.json: render template='vicuna'"):
        render_settings_of(tmp_path)
    with pytest.raises(ValueError, match="unknown keys \\['tau'\\]"):
        RenderSettings.from_dict({"tau": 1})


def test_resume_with_another_template_fails_loudly(run, caplog):
    dm = VLMDataModule(model_path=str(run["model"]), template=None, scope="all_user_turns")
    stored = TRAINED.to_dict()
    dm.load_state_dict(dict(stored, template=None))  # the same settings: nothing to say
    with caplog.at_level(logging.WARNING):  # outside fit: evaluating another way is allowed
        dm.load_state_dict(stored)
    assert "data.template: checkpoint 'llava-1.5', now None" in caplog.text
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.state.fn = "fit"
    dm.trainer = trainer
    with pytest.raises(ValueError, match="resuming with other render settings"):
        dm.load_state_dict(stored)
