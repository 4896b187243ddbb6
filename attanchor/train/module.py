"""AnchorModule: the LightningModule that trains a Hugging Face LLaVA on anchored sequences.

Every training, validation and test step runs through ``AnchoredVLM``, so the model sees the
regrouped sequence from the first step and the loss is computed on the regrouped labels.
The Hugging Face model is built in ``configure_model`` (Lightning's hook for sharded strategies)
from a path or hub id; LoRA / QLoRA checkpoints hold only the trainable weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lightning as L
import torch

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.train.numerics import NumericsSettings

log = logging.getLogger(__name__)

# The families' other image keys: image_sizes (LLaVA-NeXT), image_grid_thw and
# mm_token_type_ids (Qwen2.5-VL); a batch carries only its own family's.
BATCH_KEYS = ("input_ids", "pixel_values", "attention_mask", "labels", "candidate_mask",
              "sample_index", "image_sizes", "image_grid_thw", "mm_token_type_ids")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (the paper, TinyLLaVA: r 32, alpha 64, dropout 0.05).

    ``target_modules``: a regex over module names; None = the builder's default (the LLM's
    attention and MLP projections). ``train_projector``: the paper adapts the projector too,
    with LoRA (``projector_mode: lora``) or fully (``full``, via peft's modules_to_save).
    """

    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: str | None = None
    train_projector: bool = True
    projector_mode: Literal["lora", "full"] = "lora"


@dataclass(frozen=True)
class OptimSettings:
    """AdamW (or paged AdamW 8-bit, or DeepSpeed's CPU Adam for ZeRO offload) with a cosine
    schedule and linear warm-up."""

    name: Literal["adamw", "paged_adamw_8bit", "deepspeed_cpu_adam"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass(frozen=True)
class ModelSettings:
    """How the Hugging Face model is loaded and which parts train."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    stage: Literal["pretrain", "finetune"] = "finetune"
    mode: Literal["full", "lora", "qlora"] = "lora"
    freeze_vision_tower: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)


class AnchorModule(L.LightningModule):
    """Train / validate / test a LLaVA model with attention anchoring.

    Args:
        model_path: a local Hugging Face model directory or a hub id.
        anchor: the anchoring configuration (``strategy: none`` is the baseline arm).
        model: loading and trainable-parameter settings.
        optim: optimiser and schedule.
        numerics: what a NaN / inf training loss does (``attanchor.train.numerics``): stop
            naming the step and records (default) or skip the batch, counted.
    """

    def __init__(
        self,
        model_path: str,
        anchor: AnchorConfig = AnchorConfig(),
        model: ModelSettings = ModelSettings(),
        optim: OptimSettings = OptimSettings(),
        numerics: NumericsSettings = NumericsSettings(),  # noqa: B008  (frozen dataclass)
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"model_path": model_path, "anchor": asdict(anchor),
                                   "model": asdict(model), "optim": asdict(optim),
                                   "numerics": asdict(numerics)})
        self.numerics = numerics
        self.nonfinite_skips = 0  # batches skipped for a NaN/inf loss (this process run)
        self.model_path = model_path
        self.anchor_config = anchor
        self.settings = model
        self.optim_settings = optim
        self.anchored: AnchoredVLM | None = None
        self.built_empty = False
        # LoRA checkpoints hold only trainable weights; the rest comes from model_path.
        self.strict_loading = model.mode == "full"
        self._t_batch = 0.0

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.anchored is not None:  # Lightning may call this more than once
            return
        from attanchor.train.build import configure_trainable, load_model

        s = self.settings
        empty = self._fsdp_empty_rank()
        self.built_empty = empty  # for tests and logs: this rank read no weight
        hf = load_model(self.model_path, dtype=s.dtype, attn_implementation=s.attn_implementation,
                        trust_remote_code=s.trust_remote_code,
                        quantization="nf4" if s.mode == "qlora" else None,
                        gradient_checkpointing=s.gradient_checkpointing,
                        zero3_config=self._zero3_config(), empty=empty)
        hf = configure_trainable(
            hf, stage=s.stage, mode=s.mode, lora_r=s.lora.r, lora_alpha=s.lora.alpha,
            lora_dropout=s.lora.dropout, lora_target_modules=s.lora.target_modules,
            train_projector=s.lora.train_projector, projector_mode=s.lora.projector_mode,
            freeze_vision_tower=s.freeze_vision_tower)
        self.anchored = AnchoredVLM(hf, self.anchor_config)

    def _zero3_config(self) -> dict | None:
        """The DeepSpeed config when this module is built under ZeRO-3 (then the weights load
        partitioned, never whole on one rank; see ``sharding.zero3_from_pretrained``), else
        None. Lightning has formatted the config by then (its ``model_sharded_context``)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = getattr(self._trainer, "strategy", None)
        if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
            return strategy.config
        return None

    def _fsdp_empty_rank(self) -> bool:
        """True on the ranks other than zero of a multi-process FSDP run: they build on the meta
        device and receive rank zero's weights when FSDP wraps (``sync_module_states``), so a
        7B checkpoint is read into host memory once per run (by global rank zero), not once
        per GPU."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = getattr(self._trainer, "strategy", None)
        return (isinstance(strategy, FSDPStrategy) and strategy.world_size > 1
                and strategy.global_rank != 0 and self.settings.mode != "qlora"
                and bool(strategy.kwargs.get("sync_module_states")))

    @property
    def hf_model(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (a peft model for LoRA / QLoRA)."""
        assert self.anchored is not None, "call configure_model() first"
        return self.anchored.model

    def forward(self, batch: dict[str, Any]) -> Any:
        # The random control's placements are a function of (seed, sample, epoch): training
        # draws new ones each epoch; evaluation always uses epoch 0, so every validation sees
        # the same placements. No generator state: resumes, ranks and batch-mates cannot
        # shift them.
        epoch = self.current_epoch if self.training else 0
        inputs = {k: batch[k] for k in BATCH_KEYS if k in batch}
        if "pack_ids" in batch:  # packed rows (data.packing): each sample regrouped and
            # attended to on its own; the loss equals the unpacked batch's
            from attanchor.anchoring.packed import packed_forward

            return packed_forward(self.anchored, pack_ids=batch["pack_ids"], **inputs,
                                  epoch=epoch)[0]
        return self.anchored(**inputs, epoch=epoch)

    # -- steps -------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t_batch = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        out = self(batch)
        B = batch["input_ids"].shape[0]
        if self._nonfinite_loss(out.loss, batch, batch_idx):
            return None  # skipped: Lightning runs no backward and no optimizer update
        self.log("train/loss", out.loss, prog_bar=True, batch_size=B)
        self.log("train/nonfinite_skips", float(self.nonfinite_skips), batch_size=B)
        self._log_anchor_stats("train", batch)
        return out.loss

    def _nonfinite_loss(self, loss: torch.Tensor, batch: dict[str, Any], batch_idx: int) -> bool:
        """Check the loss before any backward pass (``attanchor.train.numerics``): True when
        this batch is skipped; raises ``NonFiniteLossError`` when the run must stop. The
        decision is "any rank saw NaN/inf", so all ranks skip or stop together."""
        from attanchor.train.numerics import (
            NonFiniteLossError,
            decide,
            describe_batch,
            loss_kind,
            stop_message,
        )

        kind = loss_kind(loss)
        trainer = self._trainer
        bad = kind is not None
        if trainer is not None:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        action = decide(self.numerics, nonfinite=bad, skipped_before=self.nonfinite_skips)
        if action == "train":
            return False
        ids = batch.get("ids") or [int(i) for i in batch["sample_index"]]
        where = describe_batch(kind, global_step=self.global_step, epoch=self.current_epoch,
                               batch_idx=batch_idx, ids=ids)
        if action == "skip":
            self.nonfinite_skips += 1
            log.warning("skipped batch %d of %d allowed: %s", self.nonfinite_skips,
                        self.numerics.max_nonfinite_skips, where)
            B = batch["input_ids"].shape[0]
            # The step's true loss (NaN/inf) goes to the log: else Lightning repeats the last
            # finite value on this step and the curve hides the fault.
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=B)
            self.log("train/nonfinite_skips", float(self.nonfinite_skips), batch_size=B)
            return True
        ckpt = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
        last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        raise NonFiniteLossError(stop_message(where, settings=self.numerics,
                                              skipped=self.nonfinite_skips,
                                              last_checkpoint=last or None))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Throughput counts the baseline's real tokens: inserted copies are extra work, not
        # extra throughput, so anchored and baseline runs compare on the same footing.
        dt = max(time.perf_counter() - self._t_batch, 1e-9)
        B = batch["input_ids"].shape[0]
        tokens = float(batch["attention_mask"].sum())
        self.log("train/tokens_per_s", tokens / dt, batch_size=B)
        self.log("train/samples_per_s", B / dt, batch_size=B)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step("test", batch)

    def _eval_step(self, split: str, batch: dict[str, Any]) -> torch.Tensor:
        out = self(batch)
        B = batch["input_ids"].shape[0]
        self.log(f"{split}/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=B)
        self._log_anchor_stats(split, batch)
        return out.loss

    def _log_anchor_stats(self, split: str, batch: dict[str, Any]) -> None:
        """Log ``attanchor.train.anchor_stats.STAT_REDUCE``'s keys, every one at every step on
        every rank (counts and sums; no key is ever skipped), so a synchronised reduction never
        waits on a rank that logged fewer keys. Means are ratios of the logged sums."""
        from attanchor.train.anchor_stats import STAT_REDUCE, batch_anchor_stats

        stats = batch_anchor_stats(self.anchored.last_regrouped, batch["attention_mask"])
        B = batch["input_ids"].shape[0]
        for name, value in stats.items():
            self.log(f"{split}/{name}", value, batch_size=B, reduce_fx=STAT_REDUCE[name],
                     sync_dist=split != "train")

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        from attanchor.train.optim import (
            build_optimizer,
            build_scheduler,
            check_optimizer_for_deepspeed,
        )

        o = self.optim_settings
        check_optimizer_for_deepspeed(o.name, getattr(self.trainer.strategy, "config", None))
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(named, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                    betas=o.betas)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, total_steps=total, warmup_ratio=o.warmup_ratio,
                                    schedule=o.schedule)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's FSDP precision refuses norm clipping (every recipe clips at 1.0): under
        FSDP clip with FSDP's own ``clip_grad_norm_`` (the norm over all shards, collective)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self.trainer.strategy.model
        if isinstance(model, FullyShardedDataParallel) and gradient_clip_val:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r} under "
                                 "FSDP: only 'norm' is supported")
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["anchor_config"] = self.anchor_config.to_dict()
        if self.settings.mode != "full":
            from attanchor.train.sharding import clean_param_name

            # FSDP's per-layer units add wrapper names that the saved state dict has not.
            trainable = {clean_param_name(n) for n, p in self.named_parameters()
                         if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that lacks any trainable weight of this model: LoRA loading is
        non-strict (the frozen base comes from ``model_path``), so without this count a resume
        or evaluation would silently keep freshly initialised adapters. Checkpoints whose
        weights the strategy restores itself (DeepSpeed: no ``state_dict``) are its business."""
        state = checkpoint.get("state_dict")
        if state is None or self.anchored is None:
            return
        from attanchor.train.sharding import clean_param_name

        trainable = {clean_param_name(n) for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(state))
        if missing:
            path = getattr(self._trainer, "ckpt_path", None) if self._trainer else None
            raise ValueError(
                f"checkpoint {path or '(given)'} restores {len(trainable) - len(missing)} of "
                f"the model's {len(trainable)} trainable weights; missing: {missing[:5]}: it "
                "was written for another model or LoRA setting (model.model.lora, "
                "model.model.mode); resume with the settings it was trained with, or start a "
                "new run")
