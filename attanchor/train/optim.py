"""Optimizers and learning-rate schedules for the LightningModule's ``configure_optimizers``.

Example::

    optimizer = build_optimizer(model.named_parameters(), name="adamw", lr=1e-4,
                                weight_decay=0.003)
    return {"optimizer": optimizer,
            "lr_scheduler": build_scheduler(optimizer, total_steps=1000, warmup_ratio=0.03)}

Optimizers (``OPTIMIZERS``):

- ``adamw``: ``torch.optim.AdamW``.
- ``paged_adamw_8bit``: ``bitsandbytes.optim.PagedAdamW8bit`` (the paper's LLaVA-1.5-7B
  setting). Paging needs CUDA unified memory; on a CPU bitsandbytes 0.50 warns "Paged
  optimizers are not supported on CPU" and runs the same 8-bit AdamW without paging (measured:
  uint8 moment buffers, the loss falls), so a CPU run of a GPU recipe still works.
  Parameters smaller than 4096 elements keep 32-bit state (bitsandbytes' ``min_8bit_size``).
- ``deepspeed_cpu_adam``: ``deepspeed.ops.adam.DeepSpeedCPUAdam`` in AdamW mode, the optimizer
  DeepSpeed requires with ZeRO optimizer offload (``deepspeed_stage_3_offload``); its first use
  compiles a C++ op (cached under ``TORCH_EXTENSIONS_DIR``).

Weight decay applies to matrices only: biases, norm weights and other 1-D parameters get none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

OPTIMIZERS = ("adamw", "paged_adamw_8bit", "deepspeed_cpu_adam")
SCHEDULES = ("cosine", "constant")


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms and any 1-D parameter (gains, scales) are not decayed."""
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith(".bias") or "norm" in lowered


def param_groups(
    params_or_named_params: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Accepts a module, ``model.named_parameters()`` or ``model.parameters()`` (without names the
    rule is ``ndim < 2``). Frozen parameters are left out. Empty groups are dropped.

    Example: a ``Linear(4, 3)`` gives ``[{"params": [weight], "weight_decay": wd},
    {"params": [bias], "weight_decay": 0.0}]``.
    """
    if isinstance(params_or_named_params, nn.Module):
        items: list = list(params_or_named_params.named_parameters())
    else:
        items = list(params_or_named_params)
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, tuple):
            name, param = item
        elif isinstance(item, torch.Tensor):
            name, param = "", item
        else:
            raise TypeError(f"expected parameters or (name, parameter) pairs, got {type(item)}")
        if not param.requires_grad:
            continue
        (no_decay if _no_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("no trainable parameter to optimize (all have requires_grad=False)")
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    params_or_named_params: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    name: str = "adamw",
    *,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Optimizer:
    """Build an optimizer over the trainable parameters (see module doc for ``name``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name={name!r}: allowed are {OPTIMIZERS}")
    if lr <= 0:
        raise ValueError(f"lr={lr}: must be > 0")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay}: must be >= 0")
    groups = param_groups(params_or_named_params, weight_decay)
    betas = (float(betas[0]), float(betas[1]))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError(
                "optimizer 'paged_adamw_8bit' needs bitsandbytes: pip install 'attanchor[quant]' "
                "(or use name='adamw')"
            ) from err
        return bnb.optim.PagedAdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError as err:
        raise ImportError(
            "optimizer 'deepspeed_cpu_adam' needs deepspeed: pip install 'attanchor[distributed]'"
        ) from err
    return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)


def optimizer_class(name: str) -> type:
    """The class ``build_optimizer(name=...)`` builds, without building it (DeepSpeed's CPU
    Adam compiles a C++ op when constructed, not when imported)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name={name!r}: allowed are {OPTIMIZERS}")
    if name == "adamw":
        return torch.optim.AdamW
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam


def check_optimizer_for_deepspeed(name: str, config: dict[str, Any] | None) -> None:
    """Raise when DeepSpeed would refuse optimizer ``name`` under ``config`` (a strategy's
    DeepSpeed config; None for other strategies): with ZeRO optimizer offload to CPU or NVMe,
    DeepSpeed accepts only its own CPU optimizers unless ``zero_force_ds_cpu_optimizer`` is
    false. The rule is DeepSpeed's (``DeepSpeedEngine._configure_basic_optimizer``), read
    through its own config classes, so a recipe fails at build time, not after model loading.
    """
    if not config or "zero_optimization" not in config:
        return
    from deepspeed.runtime.config import get_zero_force_ds_cpu_optimizer
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    zero = DeepSpeedZeroConfig(**config["zero_optimization"])
    offload = zero.offload_optimizer
    needs_ds = (offload is not None and offload.device in (OffloadDeviceEnum.cpu,
                                                          OffloadDeviceEnum.nvme)
                and get_zero_force_ds_cpu_optimizer(config))
    if needs_ds and name != "deepspeed_cpu_adam":
        raise ValueError(
            f"optimizer {name!r} under ZeRO optimizer offload (device {str(offload.device)!r}): "
            "DeepSpeed accepts only its own CPU optimizer there; set model.optim.name: "
            "deepspeed_cpu_adam (or a strategy without offload)"
        )


def build_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    warmup_ratio: float = 0.0,
    schedule: str = "cosine",
) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` config stepping every optimizer step.

    ``warmup_steps = ceil(total_steps * warmup_ratio)`` (as HF's Trainer): the learning rate
    rises linearly from 0 to the base value over the warmup, then follows a half cosine to 0 at
    ``total_steps`` (``cosine``) or stays at the base value (``constant``).

    Example: total_steps=10, warmup_ratio=0.2, cosine -> lr factors
    0, 0.5, 1, 0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038 at steps 0..9.
    """
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: allowed are {SCHEDULES}")
    if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: must be an int >= 1")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio={warmup_ratio}: must lie in [0, 1)")
    warmup_steps = math.ceil(int(total_steps) * warmup_ratio)
    if schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, int(total_steps))
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}
