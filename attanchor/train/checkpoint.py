"""Open what training wrote: a Lightning checkpoint (.ckpt), a consolidated ZeRO checkpoint
directory, or an exported Hugging Face directory, as an ``AnchoredVLM`` plus its processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.train.module import AnchorModule, LoraSettings, ModelSettings, OptimSettings


def _settings(hp: dict[str, Any]) -> tuple[AnchorConfig, ModelSettings, OptimSettings]:
    model = dict(hp.get("model", {}))
    model["lora"] = LoraSettings(**model.get("lora", {}))
    optim = dict(hp.get("optim", {}))
    if "betas" in optim:
        optim["betas"] = tuple(optim["betas"])
    return AnchorConfig.from_dict(hp["anchor"]), ModelSettings(**model), OptimSettings(**optim)


def load_module(ckpt_path: str | Path, *, model_path: str | None = None,
                map_location: str = "cpu") -> AnchorModule:
    """Rebuild the ``AnchorModule`` of a Lightning checkpoint, weights loaded.

    Checkpoints need hold only the trainable weights (LoRA, or ZeRO with frozen weights
    excluded): the frozen rest is loaded from the base ``model_path`` recorded in the
    checkpoint (or the one given here, e.g. after moving it). A missing trainable weight raises.
    A DeepSpeed checkpoint *directory* is consolidated to a plain state dict first.
    """
    path = Path(ckpt_path)
    if path.is_dir():  # a DeepSpeed ZeRO checkpoint: consolidate once, beside it
        from attanchor.train.strategies import consolidate_checkpoint

        consolidated = path.parent / f"{path.name}.consolidated.ckpt"
        if not consolidated.exists():
            consolidate_checkpoint(path, consolidated)
        path = consolidated
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    hp = ckpt.get("hyper_parameters")
    if not hp:
        raise ValueError(f"{path} holds no hyper_parameters: not a checkpoint written by "
                         "`attanchor fit`")
    anchor, model, optim = _settings(hp)
    module = AnchorModule(model_path or hp["model_path"], anchor=anchor, model=model,
                          optim=optim)
    module.configure_model()
    state = ckpt["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: weights the model does not have: {unexpected[:5]}...")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    lost = sorted(trainable & set(missing))
    if lost:
        raise ValueError(f"{path}: trainable weights missing from the checkpoint: {lost[:5]}")
    return module.eval()


def load_anchored(path: str | Path, *, anchor: AnchorConfig | None = None
                  ) -> tuple[AnchoredVLM, Any]:
    """``(AnchoredVLM, processor)`` from a .ckpt / ZeRO directory or an exported directory.

    ``anchor`` overrides the anchor config stored with the weights (e.g. evaluating a
    baseline-trained model with anchoring on at inference).
    """
    from transformers import AutoProcessor

    path = Path(path)
    exported = (path / "config.json").exists() or (path / "adapter_config.json").exists()
    if path.is_dir() and exported:
        from attanchor.train.export import load_exported

        model, processor, stored = load_exported(path)
        config = anchor or AnchorConfig.from_dict(stored or {"strategy": "none"})
        return AnchoredVLM(model.eval(), config), processor
    module = load_module(path)
    processor = AutoProcessor.from_pretrained(module.model_path)
    wrapped = module.anchored
    if anchor is not None:
        wrapped = AnchoredVLM(wrapped.model, anchor)
    return wrapped.eval(), processor
