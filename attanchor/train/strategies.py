"""Distributed strategies by name, on GPUs and, for debugging the sharding path, on CPUs.

``build_strategy(name, accelerator=...)`` maps a recipe's strategy name to Lightning's own
strategy on CUDA and to a CPU variant (gloo process group) on a CPU:

=============================  ====================================  ==========================
name                           GPU                                   CPU
=============================  ====================================  ==========================
auto                           ``"auto"``                            ``"auto"``
ddp                            ``DDPStrategy``                       ``DDPStrategy`` (gloo)
deepspeed_stage_2              ``DeepSpeedStrategy(stage=2)``        ``CPUDeepSpeedStrategy``
deepspeed_stage_3              ``DeepSpeedStrategy(stage=3)``        ``CPUDeepSpeedStrategy``
deepspeed_stage_3_offload      stage 3 + optimizer/parameter offload  same, on CPU
fsdp                           ``FSDPStrategy``                      ``CPUFSDPStrategy`` (gloo)
=============================  ====================================  ==========================

FSDP wraps each decoder layer of the LLM and each encoder layer of the vision tower
(``sharding.DecoderLayerWrapPolicy``, the classes found from the model).

Traps this module's users must know:

- ZeRO-3 partitions parameters into empty placeholders (``torch.Size([0])``). Loading weights
  into a partitioned model, or reading them (``trainable_state_dict`` does it for you), needs
  ``deepspeed.zero.GatheredParameters``. Under stage 3 Lightning calls ``configure_model``
  inside ``deepspeed.zero.Init``. ``AnchorModule.configure_model`` passes the strategy's
  config to ``build.load_model(zero3_config=...)``: the model is built partitioned and filled
  one module at a time (``sharding.zero3_from_pretrained``), so no rank holds a whole copy;
  peft's adapters are created outside the context (``sharding.outside_zero_init``: inside it
  they would be placeholders and ``lora_B`` would not start at zero) and partitioned by
  ``deepspeed.initialize``.
- LoRA under DeepSpeed: ``exclude_frozen_parameters=True`` keeps checkpoints to the trainable
  weights; resuming then needs the LightningModule's ``strict_loading = False``.
- ZeRO offload (``deepspeed_stage_3_offload``) requires DeepSpeed's own CPU optimizer:
  ``build_optimizer(..., name="deepspeed_cpu_adam")``; DeepSpeed refuses ``torch.optim.AdamW``.
- A ZeRO checkpoint is a directory; ``consolidate_checkpoint`` turns it into one file.
- The first DeepSpeed run on a CPU compiles its shared-memory op (about a minute; cached under
  ``TORCH_EXTENSIONS_DIR``), ``deepspeed_cpu_adam`` another one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy

STRATEGY_NAMES = (
    "auto",
    "ddp",
    "deepspeed_stage_2",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
    "fsdp",
)
_DEEPSPEED_STAGES = {
    "deepspeed_stage_2": {"stage": 2},
    "deepspeed_stage_3": {"stage": 3},
    "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
}


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO on CPU processes (gloo). Lightning's own refuses a non-CUDA accelerator.

    Three overrides and nothing else: skip the CUDA check in ``setup_environment``, initialise
    DeepSpeed's process group without the CUDA device-index validation, and give every local
    rank a distinct ``cpu:<local_rank>`` root device (DeepSpeed reads its index as the rank).
    Runs ZeRO-2 and ZeRO-3 with 1 or 2 processes, LoRA and checkpoints included.
    """

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's "only supported on CUDA GPUs" check, keep DDP's setup.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)


class MaterializeEmpty:
    """FSDP's ``param_init_fn`` for meta-device ranks: allocate each unit's tensors, values
    left uninitialised, on this rank's device; ``sync_module_states`` then overwrites them with
    rank zero's. (FSDP's default calls ``reset_parameters`` on every module, which e.g.
    ``LlamaRMSNorm`` lacks, and would compute an initialisation that is thrown away.)"""

    def __init__(self, on_cpu: bool) -> None:
        self.on_cpu = on_cpu

    def __call__(self, module: torch.nn.Module) -> None:
        device = torch.device("cpu") if self.on_cpu else \
            torch.device("cuda", torch.cuda.current_device())
        module.to_empty(device=device, recurse=False)


@contextlib.contextmanager
def _gloo_sync_module_states() -> Iterator[None]:
    """Let FSDP's ``sync_module_states`` broadcast CPU tensors (gloo can; NCCL cannot, which is
    why torch refuses them). Only the CPU variant enters this: on GPUs FSDP's own check stands.
    Without it the CPU runs could not exercise the meta-device ranks' path GPU users take."""
    from torch.distributed.fsdp import _init_utils

    check = _init_utils._check_module_states_for_sync_module_states
    _init_utils._check_module_states_for_sync_module_states = lambda states: None
    try:
        yield
    finally:
        _init_utils._check_module_states_for_sync_module_states = check


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP on CPU processes (gloo): wraps with ``device_id=torch.device("cpu")``.

    Lightning's own FSDP refuses a CPU accelerator and, on CPU, would pass ``device_id=None``.
    """

    strategy_name = "fsdp_cpu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        with _gloo_sync_module_states():
            wrapped = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        # The parent's "already wrapped" path adds activation checkpointing and metrics moves;
        # hide the wrap policy from it so it does not warn that the policy is ignored.
        policy = self.kwargs.pop("auto_wrap_policy", None)
        try:
            return super()._setup_model(wrapped)
        finally:
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy


    @contextlib.contextmanager
    def _full_state_dict_context(self, rank0_only: bool = True) -> Iterator[None]:
        # Lightning's own context asks FSDP to offload the gathered tensors to the CPU; with
        # tensors already on the CPU that segfaults in FSDP's clone (torch 2.13, gloo).
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        with FSDP.state_dict_type(
            module=self.model,
            state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            optim_state_dict_config=FullOptimStateDictConfig(
                offload_to_cpu=False, rank0_only=rank0_only
            ),
        ):
            yield

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with self._full_state_dict_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with self._full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the standard (parameter id) format, as Lightning saves
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


def _resolve_accelerator(accelerator: str) -> str:
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "cpu":
        return "cpu"
    raise ValueError(f"accelerator={accelerator!r}: allowed are 'auto', 'cpu', 'gpu', 'cuda'")


def build_strategy(
    name: str,
    *,
    accelerator: str = "auto",
    find_unused_parameters: bool = False,
    exclude_frozen_parameters: bool = False,
    **strategy_kwargs: Any,
) -> str | Strategy:
    """Map a strategy name (``STRATEGY_NAMES``) to a Lightning strategy for ``accelerator``.

    Args:
        name: see the table in the module doc.
        accelerator: ``auto`` (CUDA when available) | ``cpu`` | ``gpu`` | ``cuda``.
        find_unused_parameters: DDP only. Not needed when the vision tower is frozen (LLaVA's
            ``vision_feature_layer=-2`` leaves the tower's last layer unused).
        exclude_frozen_parameters: DeepSpeed only: checkpoints hold trainable weights only
            (LoRA). Resuming then needs the LightningModule's ``strict_loading = False``.
        strategy_kwargs: passed on to the strategy's constructor (e.g. ``timeout``).

    Returns:
        ``"auto"`` or a strategy instance for ``Trainer(strategy=...)``.

    Example: ``build_strategy("deepspeed_stage_2", accelerator="cpu")`` ->
    ``CPUDeepSpeedStrategy(stage=2)`` with a gloo process group.
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(f"strategy {name!r}: allowed are {STRATEGY_NAMES}")
    device = _resolve_accelerator(accelerator)
    if name == "auto":
        if strategy_kwargs:
            raise ValueError(f"strategy 'auto' takes no options, got {sorted(strategy_kwargs)}")
        return "auto"
    if name == "ddp":
        if device == "cpu":
            strategy_kwargs.setdefault("process_group_backend", "gloo")
        return DDPStrategy(find_unused_parameters=find_unused_parameters, **strategy_kwargs)
    if name == "fsdp":
        from attanchor.train.sharding import DecoderLayerWrapPolicy

        # One FSDP unit per decoder / vision-encoder layer (found from the model); without a
        # policy FSDP makes the whole model one unit and every rank gathers all of it at once.
        strategy_kwargs.setdefault("auto_wrap_policy", DecoderLayerWrapPolicy())
        # Ranks other than zero build the model on the meta device (AnchorModule.configure_model);
        # FSDP materialises each unit and broadcasts rank zero's weights into it.
        strategy_kwargs.setdefault("sync_module_states", True)
        strategy_kwargs.setdefault("param_init_fn", MaterializeEmpty(on_cpu=device == "cpu"))
        cls = CPUFSDPStrategy if device == "cpu" else FSDPStrategy
        return cls(**strategy_kwargs)
    cls = CPUDeepSpeedStrategy if device == "cpu" else DeepSpeedStrategy
    if device == "cpu":
        strategy_kwargs.setdefault("process_group_backend", "gloo")
    return cls(
        **_DEEPSPEED_STAGES[name],
        exclude_frozen_parameters=exclude_frozen_parameters,
        **strategy_kwargs,
    )


def is_zero_checkpoint(path: str | os.PathLike) -> bool:
    """True for a DeepSpeed checkpoint directory (it holds a ``latest`` tag file)."""
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


# Keys DeepSpeed's engine writes into its model-states file next to Lightning's client state.
_DEEPSPEED_STATE_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
    "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
    "sparse_tensor_module_names", "csr_tensor_module_names", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
    "checkpoint_parallel_dimensions",
})


def consolidate_checkpoint(
    ckpt_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    tag: str | None = None,
    exclude_frozen: bool = False,
) -> dict[str, Any]:
    """Turn a sharded DeepSpeed ZeRO checkpoint directory into one Lightning checkpoint file.

    The file holds Lightning's training state (epoch, global_step, loops, callbacks,
    lr_schedulers, hyper_parameters, ...) and a ``state_dict`` of full float32 tensors keyed like
    the LightningModule's own state dict, so ``torch.load`` + ``load_state_dict`` (or
    ``LightningModule.load_from_checkpoint``) open it without DeepSpeed. DeepSpeed's own
    bookkeeping (partition shapes, its config) is dropped. ``exclude_frozen=True`` keeps the
    trainable weights only (a LoRA checkpoint: adapters and projector). Runs on a CPU; written
    atomically. The shard files are DeepSpeed pickles (``weights_only=False``): consolidate only
    checkpoints you trust, i.e. your own.

    Returns the checkpoint dict that was written.
    """
    from deepspeed.utils.zero_to_fp32 import (
        get_fp32_state_dict_from_zero_checkpoint,
        get_model_state_file,
        get_optim_files,
    )

    ckpt_dir = Path(ckpt_dir)
    if not is_zero_checkpoint(ckpt_dir):
        raise ValueError(
            f"{ckpt_dir}: not a DeepSpeed ZeRO checkpoint directory (no 'latest' file inside); "
            "a DDP/FSDP/single-device checkpoint is already one file and needs no consolidation"
        )
    if tag is None:
        tag = (ckpt_dir / "latest").read_text().strip()
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{tag_dir}: the checkpoint tag {tag!r} has no directory")

    state_dict = get_fp32_state_dict_from_zero_checkpoint(
        str(ckpt_dir), tag=tag, exclude_frozen_parameters=exclude_frozen
    )
    optim_state = torch.load(get_optim_files(str(tag_dir))[0], map_location="cpu",
                             weights_only=False)
    zero_stage = optim_state["optimizer_state_dict"]["zero_stage"]
    del optim_state
    model_file = get_model_state_file(str(tag_dir), zero_stage)
    client_state = torch.load(model_file, map_location="cpu", weights_only=False)
    checkpoint = {k: v for k, v in client_state.items() if k not in _DEEPSPEED_STATE_KEYS}
    # Lightning < 2.1 wrapped the module: drop that wrapper's prefix.
    prefix = "_forward_module."
    checkpoint["state_dict"] = {
        (k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()
    }

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out_file)
    return checkpoint
