"""The one device rule (--device auto|cpu|cuda[:k]) and dtype-keeping placement, on a CPU."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.eval.device import model_dtype, place_model, resolve_device
from attanchor.eval.evaluate import evaluate
from attanchor.train.checkpoint import load_anchored
from attanchor.train.export import export_model

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")


@NO_CUDA
def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # no accelerator: LOCAL_RANK does not matter
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_cpu_and_torch_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_unavailable_cuda_is_a_clear_error(spec):
    with pytest.raises(RuntimeError, match=rf"device='{spec}': CUDA is not available.*--device cpu"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:a", "mps0", ""])
def test_invalid_strings_name_the_choices(spec):
    with pytest.raises(ValueError, match=r"expected auto \| cpu \| cuda \| cuda:K"):
        resolve_device(spec)


def test_bad_local_rank_and_type(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK='x'"):
        resolve_device("cuda")
    with pytest.raises(TypeError, match="device must be a string"):
        resolve_device(0)


@pytest.fixture(scope="module")
def bf16_export(tiny_world, tmp_path_factory):
    """The tiny world's model exported in bfloat16, anchoring every candidate (threshold -1)."""
    model = LlavaForConditionalGeneration.from_pretrained(tiny_world["model"])
    return export_model(model, tmp_path_factory.mktemp("bf16") / "export", merge=True,
                        anchor_config=AnchorConfig(threshold=-1.0), dtype="bfloat16",
                        processor=AutoProcessor.from_pretrained(tiny_world["model"]))


def test_place_model_keeps_every_dtype(bf16_export):
    model = LlavaForConditionalGeneration.from_pretrained(bf16_export)
    model.model.multi_modal_projector.float()  # a mixed model: bf16 with an fp32 projector
    before = {n: p.dtype for n, p in model.named_parameters()}
    placed = place_model(AnchoredVLM(model, AnchorConfig()), "cpu")
    assert {n: p.dtype for n, p in placed.model.named_parameters()} == before
    assert {p.device for p in placed.parameters()} == {torch.device("cpu")}
    assert model_dtype(placed) == torch.bfloat16


def test_bf16_export_stays_bf16_and_evaluates(bf16_export, tiny_world, tmp_path):
    assert json.loads((bf16_export / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_anchored(bf16_export, device=resolve_device("auto"))
    params = list(loaded.anchored.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {p.device for p in params} == {resolve_device("auto")}
    metrics = evaluate(loaded.anchored, loaded.processor, tiny_world["data"] / "pope.jsonl",
                       "pope", image_root=tiny_world["images"], out_dir=tmp_path, limit=4,
                       batch_size=2, max_new_tokens=2, progress=False)
    assert metrics["n"] == 4
    # threshold -1 anchors every candidate: the 7 words of "does the image contain a circle?"
    # and its siblings (6 to 8 words) each get a copy.
    assert metrics["anchors_per_prompt"] >= 6
    with pytest.raises(TypeError, match="pass a torch.device"):
        load_anchored(bf16_export, device="cpu")


def test_plugin_uses_the_same_rule(bf16_export):
    from attanchor.eval.lmms_plugin import load_anchored_checkpoint

    vlm, _ = load_anchored_checkpoint(bf16_export, device="auto")
    assert {p.dtype for p in vlm.parameters()} == {torch.bfloat16}  # dtype="auto": as saved
    with pytest.raises(ValueError, match="device='gpu'"):
        load_anchored_checkpoint(bf16_export, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            load_anchored_checkpoint(bf16_export, device="cuda:0")


@NO_CUDA
def test_every_command_takes_the_rule_and_fails_before_loading(tmp_path):
    """--device is resolved first: a wrong one fails at once, not after loading a 7B model."""
    from attanchor.cli import main as cli_main

    missing = str(tmp_path / "no-such.ckpt")  # never opened: the device check comes first
    commands = [
        ["eval", "--checkpoint", missing, "--data", "d", "--task", "pope", "--image-root", "."],
        ["visualize", "--checkpoint", missing, "--image", "i.png", "--prompt", "p", "--out",
         "o.png"],
        ["calibrate", "--config", missing],
        ["compare", "--config", missing, "--pope", "p.jsonl"],  # before training any arm
    ]
    for argv in commands:
        with pytest.raises(RuntimeError, match="device='cuda': CUDA is not available"):
            cli_main([*argv, "--device", "cuda"])
        with pytest.raises(ValueError, match="device='tpu'"):
            cli_main([*argv, "--device", "tpu"])
