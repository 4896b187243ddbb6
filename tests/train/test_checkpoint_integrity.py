"""Atomic, verified checkpoints and fingerprinted derived files, each with the fault injected:
a truncated file, a flipped byte, a save that dies half-way, a checkpoint short of trainable
weights, a ZeRO checkpoint rewritten under its consolidated copy, an export without
anchor_config.json, an export whose checkpoint was rewritten."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from attanchor.train.checkpoint import (
    _ckpt_file,
    export_staleness,
    load_anchored,
    source_fingerprint,
    write_export_source,
)
from attanchor.train.cli import build_cli
from attanchor.train.resilience import AtomicCheckpointIO, CorruptCheckpointError, meta_path
from tests.train.test_resume_exact import ckpt_of, fit_args

STRATEGY = "text_into_image"


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (injected)")


def test_atomic_save_writes_whole_files_and_a_verified_sidecar(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(6.0), "global_step": 3}, path)
    meta = json.loads(meta_path(path).read_text())
    assert meta["size"] == path.stat().st_size and len(meta["sha256"]) == 64
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.ckpt.meta.json"]
    assert torch.equal(io.load_checkpoint(path)["w"], torch.arange(6.0))
    # A save that dies half-way (here: pickling fails) leaves the previous file as it was.
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"w": torch.zeros(3), "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.ckpt.meta.json"]
    assert io.load_checkpoint(path)["global_step"] == 3
    io.remove_checkpoint(path)
    assert list(path.parent.iterdir()) == []


def test_truncated_flipped_or_unreadable_files_are_refused_naming_the_fallback(tmp_path):
    io = AtomicCheckpointIO()
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(4)}, best)
    os.utime(best, ns=(1, 1))  # older than last
    io.save_checkpoint({"w": torch.arange(1000.0)}, last)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a full disk cut it short
    with pytest.raises(CorruptCheckpointError, match=rf"{last} is truncated or corrupt \(size "
                       rf"{len(data) // 2} bytes, recorded {len(data)}\): resume from the "
                       rf"previous checkpoint with --ckpt_path {best}"):
        io.load_checkpoint(last)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(flipped))  # same size, one bit rot
    with pytest.raises(CorruptCheckpointError, match="sha256 differs"):
        io.load_checkpoint(last)
    # No sidecar (an older checkpoint): torch's own failure, named with the same fix.
    meta_path(last).unlink()
    last.write_bytes(data[:100])
    with pytest.raises(CorruptCheckpointError, match=rf"{last} is truncated or corrupt "
                       rf"\(torch.load: .*--ckpt_path {best}"):
        io.load_checkpoint(last)
    best.unlink()
    with pytest.raises(CorruptCheckpointError, match="no other checkpoint in"):
        io.load_checkpoint(last)


def test_fit_refuses_a_corrupt_last_and_a_checkpoint_short_of_trainable_weights(tiny_world,
                                                                               tmp_path):
    build_cli(fit_args(tiny_world, tmp_path, STRATEGY, "--trainer.max_steps", "2"))
    last = ckpt_of(tmp_path, STRATEGY)
    best = last.with_name("best.ckpt")
    assert best.is_file() and meta_path(last).is_file()
    good = last.read_bytes()
    last.write_bytes(good[:-1000])
    os.utime(best, ns=(1, 1))
    with pytest.raises(CorruptCheckpointError, match=rf"--ckpt_path {best}"):
        build_cli(fit_args(tiny_world, tmp_path, STRATEGY, "--trainer.max_steps", "4",
                           "--ckpt_path", "last"))
    # A checkpoint with one LoRA tensor fewer: non-strict loading would keep a fresh one.
    state = torch.load(best, map_location="cpu", weights_only=True)
    n = len(state["state_dict"])
    dropped = sorted(state["state_dict"])[0]
    del state["state_dict"][dropped]
    short = tmp_path / "short.ckpt"
    torch.save(state, short)
    with pytest.raises(ValueError, match=rf"restores {n - 1} of the model's {n} trainable "
                       rf"weights; missing: \['{dropped}'\]"):
        build_cli(fit_args(tiny_world, tmp_path, STRATEGY, "--trainer.max_steps", "4",
                           "--ckpt_path", str(short)))


def test_consolidated_checkpoint_is_rebuilt_when_its_source_changes(tmp_path):
    zero = tmp_path / "last.ckpt"  # stands for a ZeRO checkpoint directory
    (zero / "checkpoint").mkdir(parents=True)
    shard = zero / "checkpoint" / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"shard v1")
    consolidated = tmp_path / "last.ckpt.consolidated.ckpt"
    consolidated.write_bytes(b"consolidated from v1")
    stamp = tmp_path / "last.ckpt.consolidated.ckpt.source.json"
    stamp.write_text(json.dumps({"fingerprint": source_fingerprint(zero)}))
    assert _ckpt_file(zero) == consolidated  # the source is unchanged: reused
    before = source_fingerprint(zero)
    shard.write_bytes(b"shard v2, rewritten by a resumed run")
    assert source_fingerprint(zero) != before
    # Changed: it is consolidated again (here the stand-in is no real ZeRO checkpoint, so the
    # consolidation itself fails), never answered with the stale file.
    with pytest.raises((ValueError, FileNotFoundError)):
        _ckpt_file(zero)
    assert not stamp.exists()


def test_exports_without_anchor_config_or_with_a_rewritten_source_are_refused(tiny_world,
                                                                             tmp_path):
    from transformers import AutoProcessor

    from attanchor.train.checkpoint import load_module
    from attanchor.train.export import export_model

    build_cli(fit_args(tiny_world, tmp_path, STRATEGY, "--trainer.max_steps", "1"))
    ckpt = ckpt_of(tmp_path, STRATEGY)
    module = load_module(ckpt)
    processor = AutoProcessor.from_pretrained(module.model_path)
    bare = export_model(module.hf_model, tmp_path / "bare", merge=True, anchor_config=None,
                        processor=processor)
    with pytest.raises(ValueError, match=rf"{bare} has no anchor_config.json"):
        load_anchored(bare)
    from attanchor.anchoring import AnchorConfig

    assert load_anchored(bare, anchor=AnchorConfig(strategy="none")).anchored.config.strategy \
        == "none"  # the explicit decision
    out = export_model(module.hf_model, tmp_path / "exp", merge=True,
                       anchor_config=module.anchor_config, processor=processor)
    write_export_source(out, ckpt)
    assert export_staleness(out) is None
    assert load_anchored(out).anchored.config.strategy == STRATEGY
    os.utime(ckpt, ns=(5, 5))  # the checkpoint is rewritten (a resumed run saved again)
    with pytest.raises(ValueError, match="has been rewritten since: re-export it"):
        load_anchored(out)


def test_export_command_records_its_checkpoint(tiny_world, tmp_path):
    from attanchor.train.export_cmd import main

    build_cli(fit_args(tiny_world, tmp_path, STRATEGY, "--trainer.max_steps", "1"))
    ckpt = ckpt_of(tmp_path, STRATEGY)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    src = json.loads((tmp_path / "e" / "source.json").read_text())
    assert src == {"checkpoint": str(Path(ckpt).resolve()),
                   "fingerprint": source_fingerprint(ckpt)}
