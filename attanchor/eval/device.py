"""The one device rule of every command that loads a model for inference.

``eval``, ``compare`` (its evaluation), ``visualize``, ``calibrate`` and the lmms-eval plugin
take ``--device auto|cpu|cuda[:k]`` (the plugin: ``device=`` in model_args) and resolve it with
``resolve_device``; ``place_model`` then moves the model there without touching its dtype
(a bf16 recipe or export stays bf16). Batches follow the model's device in the callers.

``auto`` is the local accelerator: ``cuda:LOCAL_RANK`` when CUDA is available (torchrun and
Lightning set LOCAL_RANK, so each process of a multi-GPU evaluation takes its own GPU), else
the CPU. ``cuda`` alone means the same local GPU; ``cuda:k`` names one.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

DEVICE_CHOICES = "auto | cpu | cuda | cuda:K"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def _local_rank() -> int:
    raw = os.environ.get("LOCAL_RANK", "0")
    if not raw.isdigit():
        raise ValueError(f"LOCAL_RANK={raw!r} is not a non-negative int; unset it or let "
                         "torchrun set it")
    return int(raw)


def _cuda_index(index: int, spec: str) -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device={spec!r}: CUDA is not available here (torch {torch.__version__}, built "
            f"for CUDA {torch.version.cuda}); use --device cpu, or --device auto to take the "
            "accelerator only when there is one")
    count = torch.cuda.device_count()
    if index >= count:
        raise RuntimeError(f"device={spec!r}: cuda:{index} does not exist, this machine has "
                           f"{count} CUDA device(s) (cuda:0..cuda:{count - 1}); under torchrun "
                           "check --nproc_per_node against the GPUs of the node")
    return torch.device("cuda", index)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto | cpu | cuda | cuda:K`` (or a ``torch.device``; None = auto) -> a torch.device.

    Invariant: the result exists on this machine. ``auto`` -> ``cuda:LOCAL_RANK`` when
    ``torch.cuda.is_available()``, else ``cpu``; ``cuda`` -> ``cuda:LOCAL_RANK``. An unknown
    string raises ValueError; a CUDA device that is unavailable raises RuntimeError, both
    naming the value and the fix.

    Example on a CPU-only machine: ``resolve_device("auto") == torch.device("cpu")``.
    """
    if spec is None:
        spec = "auto"
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise TypeError(f"device must be a string ({DEVICE_CHOICES}) or a torch.device, got "
                        f"{type(spec).__name__}")
    text = spec.strip().lower()
    if text == "auto":
        return _cuda_index(_local_rank(), spec) if torch.cuda.is_available() \
            else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is None:
        raise ValueError(f"device={spec!r}: expected {DEVICE_CHOICES}")
    index = _local_rank() if match.group(1) is None else int(match.group(1))
    return _cuda_index(index, spec)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (the first floating parameter)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    raise ValueError(f"{type(model).__name__} has no floating-point parameter")


def place_model(model: nn.Module, device: str | torch.device | None = "auto") -> nn.Module:
    """Move ``model`` (an AnchoredVLM or any module) to the resolved device, in place, and
    return it. Only the device changes: every parameter and buffer keeps its dtype
    (``Module.to(device)`` casts nothing). On CUDA the device also becomes the current one,
    so collectives of this process (NCCL gathers) use it."""
    target = resolve_device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if any(t.device != target for t in [*model.parameters(), *model.buffers()]):
        model.to(target)
    return model
