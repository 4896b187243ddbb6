"""Open what training wrote: a Lightning checkpoint (.ckpt), a consolidated ZeRO checkpoint
directory, or an exported Hugging Face directory, as an ``AnchoredVLM`` plus its processor and
the render settings (chat template, candidate scope, format) the run trained with."""

from __future__ import annotations

import hashlib
import json
import os
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


def source_fingerprint(path: str | Path) -> str:
    """A sha256 over the relative path, size and mtime (ns) of every file under ``path`` (a
    ZeRO checkpoint directory) or of ``path`` itself: it changes whenever the checkpoint is
    rewritten, without reading the (large) shards."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{st.st_size}\0"
                 f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _fingerprint_file(derived: Path) -> Path:
    return derived.with_name(derived.name + ".source.json")


EXPORT_SOURCE_FILE = "source.json"  # in an export: the checkpoint it came from, fingerprinted


def write_export_source(out_dir: str | Path, checkpoint: str | Path) -> Path:
    """Record in export ``out_dir`` which checkpoint it was made from and that checkpoint's
    ``source_fingerprint`` (``attanchor export`` calls it)."""
    out = Path(out_dir) / EXPORT_SOURCE_FILE
    out.write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve()),
                               "fingerprint": source_fingerprint(checkpoint)}, indent=2))
    return out


def export_staleness(export_dir: str | Path) -> str | None:
    """Why export ``export_dir`` no longer matches its checkpoint (rewritten since), or None
    (it matches, or records no source, or its checkpoint is gone)."""
    stamp = Path(export_dir) / EXPORT_SOURCE_FILE
    if not stamp.is_file():
        return None
    src = json.loads(stamp.read_text())
    ckpt = Path(src["checkpoint"])
    if ckpt.exists() and source_fingerprint(ckpt) != src["fingerprint"]:
        return (f"{export_dir} was exported from {ckpt}, which has been rewritten since: "
                f"re-export it (attanchor export --checkpoint {ckpt} --out {export_dir} "
                "--overwrite)")
    return None


def _ckpt_file(path: Path) -> Path:
    """The one-file form of a checkpoint (a ZeRO directory's consolidated file).

    The consolidated file is reused only while its ``<file>.source.json`` records the current
    ``source_fingerprint`` of the directory; a rewritten checkpoint (a resumed run saving
    ``last`` again) is consolidated anew, never answered with the stale weights."""
    if path.is_dir():
        consolidated = path.parent / f"{path.name}.consolidated.ckpt"
        stamp = _fingerprint_file(consolidated)
        fingerprint = source_fingerprint(path)
        try:
            recorded = json.loads(stamp.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            recorded = None  # none (an older consolidation) or unreadable: rebuild
        if not consolidated.exists() or recorded != fingerprint:
            from attanchor.train.strategies import consolidate_checkpoint

            stamp.unlink(missing_ok=True)  # a kill mid-rebuild leaves no stale stamp
            consolidate_checkpoint(path, consolidated)
            tmp = stamp.with_name(stamp.name + ".tmp")
            tmp.write_text(json.dumps({"source": str(path.resolve()),
                                       "fingerprint": fingerprint}))
            os.replace(tmp, stamp)
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
    if state is not None:  # the data module also stores its sampler position there
        state = {k: v for k, v in state.items() if k != "sampler"}
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
    from attanchor.train.export import load_processor  # Qwen's needs no torchvision

    path = Path(path)
    stored = render_settings_of(path)
    if path.is_dir() and _is_export(path):
        from attanchor.train.export import load_exported

        stale = export_staleness(path)
        if stale is not None:
            raise ValueError(stale)
        model, processor, saved = load_exported(path)
        if anchor is None and saved is None:
            # Evaluating it as the baseline would report an anchored model as `none`.
            raise ValueError(
                f"{path} has no anchor_config.json, so how it was trained to regroup is "
                "unknown: pass anchor=AnchorConfig(...) (e.g. strategy 'none' for a baseline), "
                f"or write its config to {path / 'anchor_config.json'} (`attanchor export` "
                "writes it), or re-export from the training checkpoint")
        config = anchor or AnchorConfig.from_dict(saved)
        wrapped = AnchoredVLM(model.eval(), config)
    else:
        module = load_module(path)
        processor = load_processor(module.model_path)
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
