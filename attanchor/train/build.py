"""Model building: load a VLM checkpoint, then choose what trains (stage x mode).

Two steps, kept apart so a recipe can combine them freely:

- ``load_model``: the checkpoint's class (by its config's ``model_type``: LLaVA, LLaVA-NeXT or
  Qwen2.5-VL, ``train.parts``) ``.from_pretrained`` with dtype, attention implementation,
  gradient checkpointing and optional QLoRA (bitsandbytes nf4) quantization.
- ``configure_trainable``: freeze/unfreeze and wrap in peft according to

  ============  ==============================  ==========================================
  stage/mode    full                            lora / qlora (a ``peft.PeftModel``)
  ============  ==============================  ==========================================
  pretrain      projector only (LLaVA's         projector only, per ``projector_mode``; no
                alignment stage)                adapters in the LLM
  finetune      LLM + projector                 LoRA on the LLM's attention and MLP
                                                projections + projector per ``projector_mode``
  ============  ==============================  ==========================================

  ``projector_mode="lora"`` (default, the paper's choice: it LoRA-tunes the projector) puts LoRA
  on the projector's Linear layers; ``projector_mode="full"`` trains the projector's own weights
  (peft ``modules_to_save`` in the peft modes). The vision tower is frozen unless
  ``freeze_vision_tower=False`` (then it trains fully; in the peft modes through
  ``modules_to_save``). Module names come from the family (``train.parts``): LLaVA-NeXT's
  ``image_newline`` trains fully with its projector; Qwen2.5-VL's projector is
  ``model.visual.merger``.

Example::

    model = load_model("llava-hf/llava-1.5-7b-hf", dtype="bfloat16", quantization="nf4")
    model = configure_trainable(model, stage="finetune", mode="qlora", lora_r=8, lora_alpha=16)
    trainable, total = count_parameters(model)
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from attanchor.train.parts import model_class, parts_for, parts_of
from attanchor.train.sharding import outside_zero_init, zero3_from_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("pretrain", "finetune")
MODES = ("full", "lora", "qlora")
PROJECTOR_MODES = ("lora", "full")

# Full module-name prefixes QLoRA keeps in float (LLaVA's; per family: ``Parts.qlora_skip``):
# bitsandbytes matches skip modules by prefix, a bare "vision_tower" would not match.
QLORA_SKIP_MODULES = parts_for("llava").qlora_skip

# The language model's attention and MLP projections only; a bare ["q_proj", "v_proj"] list
# would also hit CLIP's attention (see shared/STACK.md).
DEFAULT_LORA_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed are {tuple(DTYPES)}")
    return DTYPES[dtype]


def _enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    # Non-reentrant checkpointing needs no `enable_input_require_grads` hack with frozen
    # embeddings (LoRA) and is what torch recommends.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def load_model(
    model_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = "eager",
    trust_remote_code: bool = False,
    quantization: str | None = None,
    gradient_checkpointing: bool = False,
    device_map: str | dict | None = None,
    zero3_config: dict | None = None,
    empty: bool = False,
) -> PreTrainedModel:
    """Load a supported VLM from a directory or hub id, the class picked by its config.

    Args:
        model_path: local directory or hub id (``llava-hf/llava-1.5-7b-hf``,
            ``llava-hf/llava-v1.6-vicuna-7b-hf``, ``Qwen/Qwen2.5-VL-3B-Instruct``); its
            ``model_type`` (llava, llava_next, qwen2_5_vl) picks the class (``train.parts``),
            any other raises naming the supported ones.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` (weights; for nf4 also the compute dtype).
        attn_implementation: ``eager`` | ``sdpa`` | ``flash_attention_2`` | ... (None: the
            transformers default).
        trust_remote_code: only when a recipe asks for it.
        quantization: ``None`` or ``"nf4"`` (QLoRA: 4-bit NormalFloat, double quantization; the
            vision tower, projector and LM head stay in float). Then the model is prepared for
            k-bit training (all weights frozen, non-quantized weights upcast to float32).
        gradient_checkpointing: recompute activations in backward (non-reentrant).
        device_map: passed to ``from_pretrained``. For ``nf4`` on a CUDA machine the default is
            this process's GPU (``LOCAL_RANK``), because bitsandbytes quantizes on the device.
        zero3_config: the strategy's DeepSpeed config under ZeRO-3 (a distributed process
            group must exist): the model is partitioned while it loads, so no rank ever holds
            the whole model (``sharding.zero3_from_pretrained``: one module at a time, rank 0
            reading the checkpoint's tensors). Not with ``nf4``.
        empty: build the architecture on the meta device and read no weight: the ranks other
            than zero of an FSDP run, whose weights FSDP materialises unit by unit and then
            broadcasts from rank zero (``sync_module_states``, set by ``build_strategy``), so
            only rank zero ever holds the whole checkpoint in host memory.

    Returns:
        The model in train mode. With ``nf4`` every ``bnb.nn.Linear4bit`` has
        ``support_avx512bf16_for_cpu = False``: on CPUs with avx512_bf16 a no-grad eval forward
        would otherwise repack the 4-bit weights, after which training silently stops producing
        gradients (shared/STACK.md).
    """
    torch_dtype = _torch_dtype(dtype)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    parts = parts_for(str(config.model_type))
    cls = model_class(parts.model_type)
    kwargs: dict = {
        "dtype": torch_dtype,
        "attn_implementation": attn_implementation,
        "trust_remote_code": trust_remote_code,
    }
    if quantization is not None:
        if quantization != "nf4":
            raise ValueError(f"quantization={quantization!r}: allowed are None and 'nf4'")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "quantization='nf4' needs bitsandbytes: pip install 'attanchor[quant]'"
            ) from err
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
            llm_int8_skip_modules=list(parts.qlora_skip),
        )
        if device_map is None and torch.cuda.is_available():
            device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if device_map is not None:
        kwargs["device_map"] = device_map

    if empty:
        if quantization is not None or device_map is not None or zero3_config is not None:
            raise ValueError("empty=True (FSDP's meta-device ranks) with quantization, a "
                             "device_map or ZeRO-3: FSDP shards plain weights only")
        with torch.device("meta"):
            model = cls._from_config(
                config, dtype=torch_dtype, attn_implementation=attn_implementation)
    elif zero3_config is not None:
        if quantization is not None or device_map is not None:
            raise ValueError("zero3_config with quantization or a device_map: QLoRA does not "
                             "shard under ZeRO-3; use deepspeed_stage_2 or ddp for QLoRA")
        model = zero3_from_pretrained(
            cls, model_path, zero3_config, dtype=torch_dtype,
            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    else:
        with outside_zero_init():
            model = cls.from_pretrained(model_path, **kwargs)

    if quantization is not None:
        import bitsandbytes as bnb
        from peft import prepare_model_for_kbit_training

        n4 = 0
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
                n4 += 1
        if n4 == 0:
            raise RuntimeError(f"{model_path}: quantization='nf4' produced no 4-bit layer")
        # Checkpointing is switched on below, the same way for every mode.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    model.train()
    return model


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds bitsandbytes 4-bit or 8-bit layers."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def projector_linear_names(model: PreTrainedModel) -> list[str]:
    """Full names of the projector's Linear layers, e.g. ``model.multi_modal_projector.linear_1``
    (Qwen2.5-VL: ``model.visual.merger.mlp.0``)."""
    prefix = parts_of(model).projector
    names = [
        f"{prefix}.{n}"
        for n, m in model.get_submodule(prefix).named_modules()
        if isinstance(m, nn.Linear) and n
    ]
    if not names:
        raise ValueError("the multi-modal projector has no Linear layer for LoRA to target")
    return names


def _lora_targets(
    user_targets: str | Sequence[str] | None, extra_full_names: list[str]
) -> str | list[str]:
    """Combine the user's targets with the projector's full names (regex or suffix list)."""
    if user_targets is None:
        user_targets = DEFAULT_LORA_TARGETS
    if isinstance(user_targets, str):
        # peft full-matches a string against each module name: extend the alternation.
        alternatives = [f"(?:{user_targets})"] + [re.escape(n) for n in extra_full_names]
        return "|".join(alternatives)
    # peft matches a list by name or by ".name" suffix: full names match exactly.
    return list(user_targets) + extra_full_names


def configure_trainable(
    model: PreTrainedModel,
    *,
    stage: str = "finetune",
    mode: str = "lora",
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: str | Sequence[str] | None = None,
    train_projector: bool = True,
    projector_mode: str = "lora",
    freeze_vision_tower: bool = True,
) -> nn.Module:
    """Set ``requires_grad`` (full) or wrap in a peft LoRA model (lora/qlora); see module doc.

    Args:
        model: from ``load_model`` (``quantization="nf4"`` iff ``mode="qlora"``).
        stage: ``pretrain`` (projector only) | ``finetune``.
        mode: ``full`` | ``lora`` | ``qlora``.
        lora_target_modules: a regex (full match on module names) or a list of name suffixes;
            default ``DEFAULT_LORA_TARGETS`` (the LLM's attention + MLP projections).
            Ignored at stage ``pretrain`` (no adapters in the LLM there).
        train_projector: train the projector (must be True at stage ``pretrain``).
        projector_mode: ``lora`` (LoRA on its Linear layers, the paper) | ``full``.
            In mode ``full`` the projector is always trained fully.
        freeze_vision_tower: keep the vision tower frozen (the paper, LLaVA).

    Returns:
        ``model`` itself (full) or a ``peft.PeftModel`` around it (lora/qlora). Invariant: only
        the parts named above have ``requires_grad=True``; a result with no trainable
        parameter raises.
    """
    try:
        parts = parts_of(model)
    except TypeError as e:
        raise TypeError(f"configure_trainable: {e}") from None
    base = model
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: allowed are {STAGES}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed are {MODES}")
    if projector_mode not in PROJECTOR_MODES:
        raise ValueError(f"projector_mode={projector_mode!r}: allowed are {PROJECTOR_MODES}")
    if stage == "pretrain" and not train_projector:
        raise ValueError(
            "stage='pretrain' trains the projector only; train_projector=False leaves nothing "
            "to train (use stage='finetune')"
        )
    if stage == "pretrain" and not freeze_vision_tower:
        raise ValueError(
            "stage='pretrain' trains the projector only; set freeze_vision_tower=True "
            "(or use stage='finetune' to train the vision tower too)"
        )
    quantized = is_quantized(base)
    if mode == "qlora" and not quantized:
        raise ValueError("mode='qlora' needs a 4-bit model: load_model(..., quantization='nf4')")
    if mode != "qlora" and quantized:
        raise ValueError(
            f"mode={mode!r} on a quantized model: use mode='qlora' or load without quantization"
        )

    base.requires_grad_(False)
    loose = [base.get_parameter(n) for n in parts.projector_params]  # (NeXT: image_newline)
    if mode == "full":
        if not freeze_vision_tower:
            for name in parts.vision_tower:
                base.get_submodule(name).requires_grad_(True)
        base.get_submodule(parts.projector).requires_grad_(train_projector)
        for p in loose:
            p.requires_grad_(train_projector)
        if stage == "finetune":
            base.get_submodule(parts.language_model).requires_grad_(True)
            base.get_submodule(parts.lm_head).requires_grad_(True)
            # Tied embeddings: lm_head shares the embedding weight, both now trainable.
        _check_any_trainable(base)
        return base

    from peft import LoraConfig, get_peft_model

    extra_targets: list[str] = []
    modules_to_save: list[str] = []
    if train_projector:
        if projector_mode == "lora":
            extra_targets += projector_linear_names(base)
        else:
            modules_to_save.append(parts.projector)
    if not freeze_vision_tower:
        for name in parts.vision_tower:  # a ModuleList (Qwen's blocks): each block (peft
            sub = base.get_submodule(name)  # wraps modules; the model iterates the list)
            modules_to_save += [f"{name}.{i}" for i in range(len(sub))] \
                if isinstance(sub, nn.ModuleList) else [name]

    if stage == "pretrain":
        # No adapters in the LLM: only the projector is trained.
        if not extra_targets:
            raise ValueError(
                "stage='pretrain' with projector_mode='full' in a peft mode has no adapter to "
                "train: use mode='full' (the projector's own weights) or projector_mode='lora'"
            )
        targets: str | list[str] = extra_targets
    else:
        targets = _lora_targets(lora_target_modules, extra_targets)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        bias="none",
        task_type=None,
    )
    with outside_zero_init():
        peft_model = get_peft_model(base, config)
    # Loose parameters (no Linear for LoRA) train fully with the projector; they live in the
    # base model, so checkpoints (trainable_state_dict) and exports (export.py) carry them.
    for p in loose:
        p.requires_grad_(train_projector)
    _check_any_trainable(peft_model)
    return peft_model


def _check_any_trainable(model: nn.Module) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise RuntimeError("configure_trainable left no trainable parameter")


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only, keyed like ``model.state_dict()``, detached on CPU.

    Under DeepSpeed ZeRO-3 the parameters are partitioned placeholders (``torch.Size([0])``);
    they are gathered first, so this call is collective there (call it on every rank). Under
    FSDP call it inside ``FullyShardedDataParallel.summon_full_params(root)``.

    Example: for a LoRA model the keys look like
    ``base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight``;
    ``model.load_state_dict(sd, strict=False)`` restores them.
    """
    from attanchor.train.sharding import clean_param_name

    named = [(clean_param_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Parameters an enclosing GatheredParameters already holds must not be gathered again.
        partitioned = [p for p in partitioned if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if partitioned:
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
    return {n: p.detach().to("cpu", copy=True) for n, p in named}


def _true_numel(p: torch.Tensor) -> int:
    n = p.numel()
    if n == 0 and hasattr(p, "ds_numel"):  # ZeRO-3 placeholder
        n = p.ds_numel
    if type(p).__name__ == "Params4bit":  # two 4-bit values per byte of storage
        n *= 2 * p.element_size()
    return n


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; 4-bit and ZeRO-3 parameters counted unpacked.

    Tied weights (one tensor under two names) count once, as ``named_parameters`` yields them.
    """
    trainable = total = 0
    for p in model.parameters():
        n = _true_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
