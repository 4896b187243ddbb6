"""Sharded from the first byte: ZeRO-3 loading without a whole copy on any rank, and the FSDP
wrap policy of a LLaVA model's repeated layers.

ZeRO-3 (``zero3_from_pretrained``): the model is constructed inside ``deepspeed.zero.Init``
through transformers' DeepSpeed integration (``HfDeepSpeedConfig``: every parameter is
partitioned as soon as its module exists, no random init), then the checkpoint's safetensors
are read one module at a time: the module's partitions are gathered, rank 0 copies the
module's tensors from the file, and leaving ``GatheredParameters`` re-partitions them. A
rank's peak while loading is its partition plus one module's full weights (rank 0 also one
tensor read from the file). transformers' own ZeRO-3 ``from_pretrained`` merges every shard
of the checkpoint into one state dict in rank 0's memory before loading it
(``modeling_utils``: ``map_location="cpu"`` on rank 0), one whole copy, which is why this
module reads lazily. Measured (tests/train/test_zero3_memory.py, 2 CPU processes, 125M
parameters in float32): each rank's peak growth 0.68 x one copy, its partition being 0.5.

FSDP (``DecoderLayerWrapPolicy``): one FSDP unit per decoder layer of the language model and
per encoder layer of the vision tower, the classes found from the model (its transformers
``_no_split_modules``), not named per family.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def outside_zero_init() -> Iterator[None]:
    """Suspend an active ``deepspeed.zero.Init`` for the duration of the block.

    Lightning calls ``configure_model`` inside its own ``deepspeed.zero.Init`` under ZeRO-3.
    peft's LoRA init would write into its placeholders there (``lora_B`` would not start at
    zero), so adapters are created outside it, as plain tensors that ``deepspeed.initialize``
    partitions; the base model is built inside the context (``zero3_from_pretrained``).
    Do not build a model in here expecting it partitioned: a ``zero.Init`` opened inside a
    suspended one is a no-op (DeepSpeed counts nesting), so it would be whole on every rank.
    No-op when DeepSpeed is not imported or no context is active.
    """
    pp = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if pp is None or getattr(pp, "top_level_context", None) is None:
        yield
        return
    pp.shutdown_init_context()
    try:
        yield
    finally:
        pp.restore_init_context()


def zero3_loading_config(config: dict[str, Any]) -> object:
    """Turn transformers' DeepSpeed ZeRO-3 integration on; return its ``HfDeepSpeedConfig``.

    transformers holds only a weak reference to it: the caller keeps it alive (``load_model``
    stores it on the model) for as long as transformers should treat the model as partitioned
    (its generation then keeps the ranks in step, ``synced_gpus``).
    """
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(f"zero3_loading_config needs a ZeRO stage-3 DeepSpeed config, got "
                         f"zero_optimization.stage={stage!r}")
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def safetensors_files(model_path: str) -> list[str]:
    """The checkpoint's safetensors files (a local directory or a hub id, sharded or not)."""
    from transformers.utils import cached_file

    for name in ("model.safetensors.index.json", "model.safetensors"):
        local = Path(model_path) / name
        found = str(local) if local.is_file() else cached_file(
            model_path, name, _raise_exceptions_for_missing_entries=False)
        if found is None:
            continue
        if name.endswith(".json"):
            shards = sorted(set(json.loads(Path(found).read_text())["weight_map"].values()))
            return [str(Path(found).parent / s) if Path(found).parent.joinpath(s).is_file()
                    else cached_file(model_path, s) for s in shards]
        return [found]
    raise FileNotFoundError(
        f"{model_path}: no model.safetensors(.index.json): ZeRO-3 loading reads safetensors "
        "only; convert a .bin checkpoint once with from_pretrained + save_pretrained"
    )


def _file_index(model: nn.Module, files: list[str]) -> dict[str, tuple[str, str]]:
    """Model key -> (file, key in file), through transformers' own key renamings (LLaVA
    checkpoints keep the original ``language_model.model.*`` layout)."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = dict.fromkeys(model.state_dict().keys())
    index: dict[str, tuple[str, str]] = {}
    for f in files:
        with safe_open(f, framework="pt") as handle:
            keys = list(handle.keys())
        for key in keys:
            new, pattern = rename_source_key(key, renamings, converters,
                                             model.base_model_prefix, meta)
            if pattern is not None:
                raise NotImplementedError(
                    f"{f}: key {key!r} needs a weight conversion ({pattern}); ZeRO-3 lazy "
                    "loading supports renamed keys only"
                )
            index[new] = (f, key)
    return index


def zero3_from_pretrained(model_cls: type, model_path: str, ds_config: dict[str, Any], *,
                          dtype: torch.dtype, attn_implementation: str | None,
                          trust_remote_code: bool = False) -> nn.Module:
    """Build ``model_cls`` partitioned under ZeRO-3 and fill it from ``model_path`` one module
    at a time (see the module doc). Collective: call it on every rank of the process group.

    Invariant: after it returns every parameter equals the checkpoint's tensor (gathered), and
    a parameter the checkpoint lacks raises, naming it. The ``HfDeepSpeedConfig`` is kept on
    the model (``_attanchor_hf_ds_config``).
    """
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig, GenerationConfig
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import local_torch_dtype

    hf_ds_config = zero3_loading_config(ds_config)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    config.dtype = dtype
    if attn_implementation:
        config._attn_implementation = attn_implementation  # applied to the sub-configs too
    # Constructed directly, not through transformers' _from_config: that one gathers every
    # module once more to (re-)initialise it, which costs a whole module per gather for
    # nothing here. Under Lightning's zero.Init (configure_model) that context partitions; on
    # its own a new one does. Parameters take the DeepSpeed config's dtype (bf16 when the
    # strategy runs bf16), as under any zero.Init.
    _return_large_frees_to_the_os()
    pp = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    enclosing = pp is not None and getattr(pp, "top_level_context", None) is not None
    init = contextlib.nullcontext() if enclosing else deepspeed.zero.Init(
        config_dict_or_path=ds_config)
    with init, no_init_weights(), prevent_arange_dtype_change(), \
            local_torch_dtype(dtype, model_cls.__name__):
        model = model_cls(config)
    model.tie_weights()
    model._attanchor_hf_ds_config = hf_ds_config  # keeps transformers' weak reference alive
    files = safetensors_files(model_path)
    index = _file_index(model, files)
    missing = [n for n, _ in model.named_parameters() if n not in index]
    if missing:
        raise KeyError(f"{model_path}: the checkpoint lacks {len(missing)} parameters of "
                       f"{model_cls.__name__}, e.g. {missing[:3]}")
    rank = dist.get_rank()
    with torch.no_grad():
        for prefix, module in model.named_modules():
            own = [(f"{prefix}.{n}" if prefix else n, p)
                   for n, p in module.named_parameters(recurse=False)]
            if own:
                # (full weights of this module only) -> copied on rank 0 -> re-partitioned
                with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                    if rank == 0:
                        for name, p in own:
                            _copy_from_file(p, name, index)
            for n, buf in module.named_buffers(recurse=False):
                name = f"{prefix}.{n}" if prefix else n
                if name in index and buf is not None:  # buffers are whole on every rank
                    if rank == 0:
                        _copy_from_file(buf, name, index)
                    dist.broadcast(buf, src=0)
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(model_path)
    return model


def _return_large_frees_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``, as the environment
    variable ``MALLOC_MMAP_THRESHOLD_`` would): every module's full weights are allocated and
    freed once while loading, and glibc's default (a threshold that rises to 32 MiB after the
    first large free) keeps such freed tensors in its heap, so the process's resident memory
    would grow by about one whole copy of the model (measured) although nothing holds it.
    No-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3 in glibc's malloc.h
    except OSError:
        pass


def _copy_from_file(target: torch.Tensor, name: str, index: dict[str, tuple[str, str]]) -> None:
    """Copy one checkpoint tensor into ``target``. The file is opened per tensor: a handle
    kept open holds on to what it has read (measured: the whole file by the end)."""
    from safetensors import safe_open

    f, key = index[name]
    with safe_open(f, framework="pt") as handle:
        value = handle.get_tensor(key)
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{f}: {key!r} has shape {tuple(value.shape)}, the model's {name!r} "
                         f"{tuple(target.shape)}")
    target.copy_(value)
    del value


# Wrapper module names FSDP and activation checkpointing insert into parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_param_name(name: str) -> str:
    """A parameter name without FSDP / checkpoint-wrapper parts, as state dicts key it:
    ``model.layers.0._fsdp_wrapped_module.mlp.weight`` -> ``model.layers.0.mlp.weight``."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


class DecoderLayerWrapPolicy:
    """An FSDP ``auto_wrap_policy`` that wraps each repeated transformer layer of the model it
    is applied to: the classes named by the ``_no_split_modules`` of every transformers
    sub-model that stand in a ``ModuleList`` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``,
    ``CLIPEncoderLayer``, ``SiglipEncoderLayer`` ...), found when FSDP first calls it with the
    root module.

    A callable of FSDP's ``(module, recurse, nonwrapped_numel) -> bool`` kind; the root is
    always wrapped by FSDP itself.
    """

    def __init__(self) -> None:
        self.layer_names: set[str] | None = None

    @staticmethod
    def layer_classes(model: nn.Module) -> set[str]:
        """Class names of the repeated layers of ``model`` (found from its sub-models)."""
        names: set[str] = set()
        for m in model.modules():
            names.update(getattr(m, "_no_split_modules", None) or [])
        # Only the repeated ones (the items of a ModuleList): _no_split_modules also names
        # single blocks such as CLIP's embeddings.
        repeated = {type(c).__name__ for m in model.modules() if isinstance(m, nn.ModuleList)
                    for c in m}
        found = names & repeated
        if not found:
            raise ValueError(f"{type(model).__name__}: no transformers layer class to wrap "
                             f"(its _no_split_modules {sorted(names)} are not in the model)")
        return found

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.layer_names is None:  # FSDP calls the root first
            self.layer_names = self.layer_classes(module)
        if recurse:
            return True  # descend everywhere; wrap only the layers
        return type(module).__name__ in self.layer_names
