"""Open what training wrote: a Lightning checkpoint (.ckpt), a consolidated ZeRO checkpoint
directory, or an exported Hugging Face directory, as an ``AnchoredVLM`` plus its processor and
the render settings (chat template, candidate scope, format) the run trained with."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.train.export import RenderSettings
from attanchor.train.module import AnchorModule, LoraSettings, ModelSettings, OptimSettings

KEEP = object()  # load_anchored(template=KEEP): the stored template (None is a real choice)


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
    path = _ckpt_file(Path(ckpt_path))  # a ZeRO directory: consolidated once, beside it
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


DATAMODULE_STATE_KEY = "VLMDataModule"  # where Lightning stores VLMDataModule.state_dict()


def _ckpt_file(path: Path) -> Path:
    """The one-file form of a checkpoint (a ZeRO directory's consolidated file)."""
    if path.is_dir():
        consolidated = path.parent / f"{path.name}.consolidated.ckpt"
        if not consolidated.exists():
            from attanchor.train.strategies import consolidate_checkpoint

            consolidate_checkpoint(path, consolidated)
        return consolidated
    return path


def render_settings_of(path: str | Path) -> RenderSettings | None:
    """The render settings (template, scope, format) a checkpoint or export was trained with:
    a Lightning checkpoint's datamodule state (``VLMDataModule.state_dict()``; older
    checkpoints: the datamodule's hyper-parameters), an export's ``render_config.json``.
    None when the file records none."""
    from attanchor.train.export import read_render_config

    path = Path(path)
    if path.is_dir() and _is_export(path):
        return read_render_config(path)
    # mmap: only the small dicts are read, not the weights (a full fine-tune's are large).
    ckpt = torch.load(_ckpt_file(path), map_location="cpu", weights_only=True, mmap=True)
    state = ckpt.get(DATAMODULE_STATE_KEY)
    if state is None:
        hp = ckpt.get("datamodule_hyper_parameters") or {}
        if not {"template", "scope"} <= set(hp):
            return None
        state = {k: hp[k] for k in ("template", "scope", "format") if k in hp}
    try:
        return RenderSettings.from_dict(dict(state))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: stored render settings {state!r}: {e}") from None


def _is_export(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


@dataclass(frozen=True)
class LoadedModel:
    """What ``load_anchored`` returns: unpacks as the pair ``(anchored, processor)`` (its
    historical return value), with the run's render settings in ``.render``."""

    anchored: AnchoredVLM
    processor: Any
    render: RenderSettings

    def __iter__(self) -> Iterator[Any]:
        return iter((self.anchored, self.processor))


def load_anchored(path: str | Path, *, anchor: AnchorConfig | None = None,
                  device: torch.device | None = None,
                  template: str | None | object = KEEP, scope: str | None = None,
                  ) -> LoadedModel:
    """``(AnchoredVLM, processor)`` from a .ckpt / ZeRO directory or an exported directory,
    with ``.render``: the template, scope and format the run trained with.

    ``anchor`` overrides the anchor config stored with the weights (e.g. evaluating a
    baseline-trained model with anchoring on at inference). ``template`` (a named template,
    or None for the model's own chat template) and ``scope`` override the stored render
    settings; left out, the stored ones apply (the model's own template and the anchor
    config's scope when the file records none). The anchor config's scope is set to the
    render scope, so rendering and regrouping agree. ``device`` (resolved by
    ``attanchor.eval.device.resolve_device``; None: stay on the CPU) receives the model in the
    dtype it was trained or exported in (``Module.to(device)`` casts nothing).
    """
    from transformers import AutoProcessor

    path = Path(path)
    stored = render_settings_of(path)
    if path.is_dir() and _is_export(path):
        from attanchor.train.export import load_exported

        model, processor, saved = load_exported(path)
        config = anchor or AnchorConfig.from_dict(saved or {"strategy": "none"})
        wrapped = AnchoredVLM(model.eval(), config)
    else:
        module = load_module(path)
        processor = AutoProcessor.from_pretrained(module.model_path)
        wrapped = module.anchored
        if anchor is not None:
            wrapped = AnchoredVLM(wrapped.model, anchor)
        config = wrapped.config
    base = stored or RenderSettings(scope=config.scope)
    render = RenderSettings(template=base.template if template is KEEP else template,
                            scope=scope or base.scope, format=base.format)
    if config.scope != render.scope:
        wrapped = AnchoredVLM(wrapped.model, replace(config, scope=render.scope))
    if device is not None:
        if not isinstance(device, torch.device):
            raise TypeError(f"device={device!r}: pass a torch.device (resolve 'auto', 'cuda:1' "
                            "... with attanchor.eval.device.resolve_device)")
        wrapped.to(device)
    return LoadedModel(wrapped.eval(), processor, render)
