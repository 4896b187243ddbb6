"""Shared fixtures: a small built-in world (easy-vqa subset + the tiny LLaVA), built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub or a W&B server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """easy-vqa with 40 train / 20 test images as LLaVA JSON + POPE, and the tiny model."""
    from attanchor.data.easyvqa import prepare_easy_vqa
    from attanchor.data.tiny import build_tiny_llava

    root = tmp_path_factory.mktemp("world")
    data = root / "data" / "easy-vqa"
    prepare_easy_vqa(data, max_train_images=40, max_test_images=20, progress=False)
    model = build_tiny_llava(root / "models" / "tiny", seed=0)
    return {"root": root, "data": data, "images": data / "images", "model": model}


def world_overrides(world: dict[str, Path], run_root: Path) -> list[str]:
    """`attanchor fit` arguments pointing a demo recipe at the fixture world."""
    d = world["data"]
    return ["--model.model_path", str(world["model"]),
            "--data.train_file", str(d / "train.json"), "--data.val_file", str(d / "val.json"),
            "--data.test_file", str(d / "test.json"), "--data.image_root", str(d / "images"),
            "--run.root", str(run_root)]
