"""Export a trained model as a Hugging Face directory, with its anchor config beside it.

Three layouts, all safetensors, all with the processor (tokenizer, image processor, chat
template) so evaluation harnesses open them as they are:

- ``merged`` (LoRA / QLoRA with ``merge=True``): the adapters merged into the base weights; a
  plain directory of the model's own class (LLaVA, LLaVA-NeXT, Qwen2.5-VL). QLoRA merges into the *dequantized* 4-bit
  weights, i.e. the weights the adapters were trained against, so the logits equal the trained
  model's; the export holds float weights and no quantization config.
- ``adapter`` (LoRA / QLoRA with ``merge=False``): peft's ``adapter_config.json`` (whose
  ``base_model_name_or_path`` references the base model) + ``adapter_model.safetensors``, and
  ``base_parameters.safetensors`` when base parameters outside peft's reach trained too
  (LLaVA-NeXT's ``model.image_newline``, trained with the projector); ``load_exported`` puts
  them back on the base.
- ``full`` (a full fine-tune, no adapters): the whole model; ``merge`` has nothing to merge.

``anchor_config.json`` holds ``AnchorConfig.to_dict()`` so inference regroups the way training
did; a baseline run exports ``{"strategy": "none", ...}``. ``render_config.json`` holds the
``RenderSettings`` the run trained with (chat template, candidate scope, data format), so
evaluation renders prompts as training did.

Example::

    export_model(peft_model, "exports/tiny", merge=True, anchor_config=AnchorConfig(),
                 processor=AutoProcessor.from_pretrained(model_path))
    model, processor, anchor = load_exported("exports/tiny")
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from attanchor.anchoring import AnchorConfig
from attanchor.data.images import load_processor  # noqa: F401  (re-exported)

ANCHOR_CONFIG_FILE = "anchor_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
RENDER_CONFIG_FILE = "render_config.json"
BASE_PARAMETERS_FILE = "base_parameters.safetensors"


@dataclass(frozen=True)
class RenderSettings:
    """How a run rendered its prompts: ``template`` (None: the model's own chat template, or a
    name of ``attanchor.data.templates.NAMED_TEMPLATES``), candidate ``scope`` and data
    ``format``. Validated on construction; ``VLMDataModule.state_dict()`` is its dict form."""

    template: str | None = None
    scope: str = "image_turn"
    format: str = "llava"

    def __post_init__(self) -> None:
        from attanchor.data.formats import FORMATS
        from attanchor.data.render import SCOPES
        from attanchor.data.templates import NAMED_TEMPLATES

        if self.template is not None and self.template not in NAMED_TEMPLATES:
            raise ValueError(f"render template={self.template!r}: allowed are None or "
                             f"{sorted(NAMED_TEMPLATES)}")
        if self.scope not in SCOPES:
            raise ValueError(f"render scope={self.scope!r}: allowed are {SCOPES}")
        if self.format not in FORMATS:
            raise ValueError(f"render format={self.format!r}: allowed are {FORMATS}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RenderSettings:
        unknown = set(d) - {"template", "scope", "format"}
        if unknown:
            raise ValueError(f"render settings: unknown keys {sorted(unknown)}; expected "
                             "template, scope, format")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_render_config(path: str | os.PathLike) -> RenderSettings | None:
    """The ``render_config.json`` of an export directory; None when it has none (exports
    written before it existed)."""
    file = Path(path) / RENDER_CONFIG_FILE
    if not file.is_file():
        return None
    try:
        return RenderSettings.from_dict(json.loads(file.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from None


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _unwrap(model: nn.Module) -> tuple[nn.Module, AnchorConfig | None]:
    """Accept a HF model, a peft model, or a wrapper with ``.model`` and ``.config`` (AnchoredVLM)."""
    if isinstance(model, PreTrainedModel) or _is_peft(model):
        return model, None
    inner = getattr(model, "model", None)
    if isinstance(inner, PreTrainedModel) or (inner is not None and _is_peft(inner)):
        config = getattr(model, "config", None)
        return inner, config if isinstance(config, AnchorConfig) else None
    raise TypeError(
        f"export_model needs a supported HF VLM, a peft model around one, or an "
        f"AnchoredVLM; got {type(model).__name__}"
    )


def _anchor_dict(anchor_config: AnchorConfig | dict | None) -> dict[str, Any] | None:
    if anchor_config is None:
        return None
    if isinstance(anchor_config, AnchorConfig):
        return anchor_config.to_dict()
    if isinstance(anchor_config, dict):
        return AnchorConfig.from_dict(anchor_config).to_dict()  # validates, fills defaults
    raise TypeError(f"anchor_config must be an AnchorConfig, a dict or None, got {type(anchor_config)}")


def _float_base_state(peft_model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parameters and buffers of the peft model's base, unwrapped, as plain float copies.

    ``x.base_layer.w`` -> ``x.w``; ``p.original_module.w`` -> ``p.w``; adapter weights (LoRA,
    modules_to_save copies) are left out. bitsandbytes 4-bit weights are dequantized.
    """
    from peft.utils.integrations import dequantize_bnb_weight

    def clean(name: str) -> str:
        return name.replace(".base_layer.", ".").replace(".original_module.", ".")

    def skip(name: str) -> bool:
        return ".lora_" in name or ".modules_to_save." in name

    base = peft_model.get_base_model()
    # One float dtype for the copy: the embeddings' (float32 after k-bit preparation).
    dtype = base.get_input_embeddings().weight.dtype
    params: dict[str, torch.Tensor] = {}
    for name, p in base.named_parameters():
        if skip(name):
            continue
        if type(p).__name__ == "Params4bit":
            if getattr(p.quant_state, "packing_format_for_cpu", False):
                raise RuntimeError(
                    f"{name}: 4-bit weight is in bitsandbytes' CPU packing format; load the "
                    "model with attanchor.train.build.load_model (it disables the repacking)"
                )
            t = dequantize_bnb_weight(p).to(dtype)
        elif type(p).__name__ == "Int8Params":
            raise NotImplementedError(f"{name}: 8-bit bitsandbytes weights are not exported")
        else:
            t = p.detach().to(dtype if p.is_floating_point() else p.dtype, copy=True)
        params[clean(name)] = t
    buffers = {clean(n): b.detach().clone() for n, b in base.named_buffers() if not skip(n)}
    return params, buffers


def trained_base_parameters(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters of a peft model's base that peft does not save: neither LoRA
    weights nor ``modules_to_save`` copies (LLaVA-NeXT's ``model.image_newline``), keyed by
    their name in the HF model, detached on CPU. Empty for LLaVA and Qwen2.5-VL."""
    base = peft_model.get_base_model()
    return {n: p.detach().to("cpu", copy=True) for n, p in base.named_parameters()
            if p.requires_grad and ".lora_" not in n and ".modules_to_save." not in n
            and ".original_module." not in n}


def merged_copy(peft_model: nn.Module) -> PreTrainedModel:
    """A new float model of the base's class = base (dequantized if 4-bit) + merged LoRA.

    The passed model is left as it is (the copy costs one more model in memory). Invariant:
    the copy's logits equal the peft model's (up to float rounding).
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if list(peft_model.peft_config) != ["default"]:
        raise ValueError(f"expected one adapter named 'default', got {list(peft_model.peft_config)}")
    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    params, buffers = _float_base_state(peft_model)
    with torch.device("meta"):
        float_model = type(base)(config)
    loaded = float_model.load_state_dict(params, strict=False, assign=True)
    if loaded.unexpected_keys:
        raise RuntimeError(f"merge: base weights with no place: {loaded.unexpected_keys[:5]}")
    for name, buf in buffers.items():  # non-persistent buffers (rotary tables) are not loaded
        module_name, _, attr = name.rpartition(".")
        setattr(float_model.get_submodule(module_name), attr, buf)
    if getattr(config, "tie_word_embeddings", False):
        float_model.tie_weights()
    meta = [n for n, t in [*float_model.named_parameters(), *float_model.named_buffers()]
            if t.is_meta]
    if meta:
        raise RuntimeError(f"merge: no weight found for {meta[:5]} (and {max(len(meta) - 5, 0)} more)")

    adapter_config = copy.deepcopy(peft_model.peft_config["default"])
    adapter_state = get_peft_model_state_dict(peft_model)
    float_peft = get_peft_model(float_model, adapter_config)
    result = set_peft_model_state_dict(float_peft, adapter_state)
    if result.unexpected_keys:
        raise RuntimeError(f"merge: adapter weights not placed: {result.unexpected_keys[:5]}")
    merged = float_peft.merge_and_unload()
    merged.eval()
    return merged


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    merge: bool,
    anchor_config: AnchorConfig | dict | None,
    processor: Any,
    dtype: str | None = None,
    overwrite: bool = False,
    render: RenderSettings | dict | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face directory (see module doc for the layouts).

    Args:
        model: a supported HF VLM (``train.parts``), a peft model around one (LoRA / QLoRA) or an
            ``AnchoredVLM`` (its ``.config`` is the default ``anchor_config``).
        out_dir: the directory to create. It is written beside, then renamed into place.
        merge: merge LoRA adapters into the weights (a plain model) or keep an adapter.
        anchor_config: written to ``anchor_config.json`` (validated); None writes none.
        processor: the processor of the base model (tokenizer, image processor, chat
            template): ``AutoProcessor.from_pretrained(model_path)``.
        dtype: cast merged/full weights before saving (``bfloat16`` halves a float32 export).
        overwrite: replace an existing ``out_dir``.
        render: the run's ``RenderSettings`` (or their dict), written to
            ``render_config.json``; None writes none (evaluation then uses the model's own
            template and the anchor config's scope).

    Returns:
        ``Path(out_dir)``.
    """
    from attanchor.train.build import DTYPES, is_quantized

    if processor is None:
        raise ValueError(
            "export_model needs the processor so the export carries tokenizer, image processor "
            "and chat template: pass processor=AutoProcessor.from_pretrained(<base model path>)"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed are {tuple(DTYPES)} or None")
    inner, wrapper_anchor = _unwrap(model)
    anchor = _anchor_dict(anchor_config if anchor_config is not None else wrapper_anchor)
    if isinstance(render, dict):
        render = RenderSettings.from_dict(render)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists: choose another --out or pass overwrite=True")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if _is_peft(inner) and not merge:
            inner.save_pretrained(tmp, safe_serialization=True)
            loose = trained_base_parameters(inner)
            if loose:
                from safetensors.torch import save_file

                save_file(loose, str(tmp / BASE_PARAMETERS_FILE))
        else:
            if _is_peft(inner):
                to_save = merged_copy(inner)
            elif is_quantized(inner):
                raise ValueError("a quantized model without adapters cannot be exported")
            else:
                to_save = inner
            if dtype is not None:
                to_save = to_save.to(DTYPES[dtype])
            to_save.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if anchor is not None:
            (tmp / ANCHOR_CONFIG_FILE).write_text(json.dumps(anchor, indent=2, sort_keys=True))
        if render is not None:
            (tmp / RENDER_CONFIG_FILE).write_text(json.dumps(render.to_dict(), indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def saved_dtype(model: str | os.PathLike) -> str:
    """The weights' dtype a saved HF model (a directory or a hub id) records in its config
    (``dtype``, ``torch_dtype`` in older files); ``float32`` when it records none."""
    from transformers import AutoConfig

    from attanchor.train.build import DTYPES

    recorded = getattr(AutoConfig.from_pretrained(str(model)), "dtype", None)
    name = str(recorded).removeprefix("torch.") if recorded is not None else "float32"
    if name not in DTYPES:
        raise ValueError(f"{model}: its config records dtype {name!r}, not one of "
                         f"{tuple(DTYPES)}; pass dtype= explicitly")
    return name


def load_exported(
    path: str | os.PathLike,
    *,
    dtype: str = "auto",
    attn_implementation: str = "eager",
    quantization: str | None = None,
    base_model_path: str | None = None,
) -> tuple[nn.Module, Any, dict[str, Any] | None]:
    """Load what ``export_model`` wrote: ``(model in eval mode, processor, anchor config dict)``.

    A merged / full export loads as its config's class (``build.load_model``); an adapter
    export loads its base (``base_model_path``, default the adapter's
    ``base_model_name_or_path``; pass ``quantization="nf4"`` to rebuild a QLoRA run's 4-bit
    base), puts the trained base parameters back (``base_parameters.safetensors``) and the
    adapter on it as a ``peft.PeftModel``. ``dtype="auto"`` keeps the dtype the weights were saved in (the
    export's, or for an adapter its base's: a bf16 export loads as bf16). The anchor config is
    validated (``AnchorConfig.from_dict``); None when the export has none.
    """
    from attanchor.train.build import load_model

    path = Path(path)
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: no config.json or {ADAPTER_CONFIG_FILE}: not an export")
    processor = load_processor(path)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        from peft import PeftModel

        if base_model_path is None:
            base_model_path = json.loads((path / ADAPTER_CONFIG_FILE).read_text()).get(
                "base_model_name_or_path")
        if not base_model_path:
            raise ValueError(f"{path}: the adapter names no base model: pass base_model_path=")
        if dtype == "auto":
            dtype = saved_dtype(base_model_path)
        base = load_model(base_model_path, dtype=dtype, attn_implementation=attn_implementation,
                          quantization=quantization)
        _load_base_parameters(base, path)
        model: nn.Module = PeftModel.from_pretrained(base, path)
    else:
        if quantization is not None:
            raise ValueError(f"{path} is a merged/full export: load it without quantization")
        if dtype == "auto":
            dtype = saved_dtype(path)
        model = load_model(str(path), dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    anchor = None
    if (path / ANCHOR_CONFIG_FILE).is_file():
        anchor = AnchorConfig.from_dict(json.loads((path / ANCHOR_CONFIG_FILE).read_text())).to_dict()
    return model, processor, anchor


def _load_base_parameters(base: nn.Module, path: Path) -> None:
    """Copy an adapter export's ``base_parameters.safetensors`` into ``base`` (in place, in
    the base's dtype); a name the base lacks raises."""
    file = path / BASE_PARAMETERS_FILE
    if not file.is_file():
        return
    from safetensors.torch import load_file

    params = dict(base.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(file)).items():
            if name not in params:
                raise ValueError(f"{file}: parameter {name!r} is not in the base model "
                                 f"{type(base).__name__}; is base_model_path the right base?")
            params[name].copy_(value.to(params[name].dtype))
