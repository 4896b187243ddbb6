"""AnchorModule: the LightningModule that trains a Hugging Face LLaVA on anchored sequences.

Every training, validation and test step runs through ``AnchoredVLM``, so the model sees the
regrouped sequence from the first step and the loss is computed on the regrouped labels.
The Hugging Face model is built in ``configure_model`` (Lightning's hook for sharded strategies)
from a path or hub id; LoRA / QLoRA checkpoints hold only the trainable weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lightning as L
import torch

from attanchor.anchoring import AnchorConfig, AnchoredVLM

BATCH_KEYS = ("input_ids", "pixel_values", "attention_mask", "labels", "candidate_mask")


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
    """AdamW (or paged AdamW 8-bit) with a cosine schedule and linear warm-up."""

    name: Literal["adamw", "paged_adamw_8bit"] = "adamw"
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
    """

    def __init__(
        self,
        model_path: str,
        anchor: AnchorConfig = AnchorConfig(),
        model: ModelSettings = ModelSettings(),
        optim: OptimSettings = OptimSettings(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"model_path": model_path, "anchor": asdict(anchor),
                                   "model": asdict(model), "optim": asdict(optim)})
        self.model_path = model_path
        self.anchor_config = anchor
        self.settings = model
        self.optim_settings = optim
        self.anchored: AnchoredVLM | None = None
        # LoRA checkpoints hold only trainable weights; the rest comes from model_path.
        self.strict_loading = model.mode == "full"
        self._t_batch = 0.0

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.anchored is not None:  # Lightning may call this more than once
            return
        from attanchor.train.build import configure_trainable, load_model

        s = self.settings
        hf = load_model(self.model_path, dtype=s.dtype, attn_implementation=s.attn_implementation,
                        trust_remote_code=s.trust_remote_code,
                        quantization="nf4" if s.mode == "qlora" else None,
                        gradient_checkpointing=s.gradient_checkpointing)
        hf = configure_trainable(
            hf, stage=s.stage, mode=s.mode, lora_r=s.lora.r, lora_alpha=s.lora.alpha,
            lora_dropout=s.lora.dropout, lora_target_modules=s.lora.target_modules,
            train_projector=s.lora.train_projector, projector_mode=s.lora.projector_mode,
            freeze_vision_tower=s.freeze_vision_tower)
        self.anchored = AnchoredVLM(hf, self.anchor_config)

    @property
    def hf_model(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (a peft model for LoRA / QLoRA)."""
        assert self.anchored is not None, "call configure_model() first"
        return self.anchored.model

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.anchored(**{k: batch[k] for k in BATCH_KEYS if k in batch})

    # -- steps -------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t_batch = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        B = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=B)
        self._log_anchor_stats("train", B)
        return out.loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Throughput counts the baseline's real tokens: inserted copies are extra work, not
        # extra throughput, so anchored and baseline runs compare on the same footing.
        dt = max(time.perf_counter() - self._t_batch, 1e-9)
        B = batch["input_ids"].shape[0]
        tokens = float(batch["attention_mask"].sum())
        self.log("train/tokens_per_s", tokens / dt, batch_size=B)
        self.log("train/samples_per_s", B / dt, batch_size=B)

    # Evaluation draws the random control's placements from a fresh generator each time, so
    # every validation sees the same placements and the training stream is left untouched
    # (sanity checks and validations do not shift it, which keeps resumes exact).
    def on_validation_epoch_start(self) -> None:
        self._swap_in_eval_generator()

    def on_validation_epoch_end(self) -> None:
        self._swap_back_train_generator()

    def on_test_epoch_start(self) -> None:
        self._swap_in_eval_generator()

    def on_test_epoch_end(self) -> None:
        self._swap_back_train_generator()

    def _swap_in_eval_generator(self) -> None:
        self._train_generator = self.anchored.generator
        self.anchored.generator = torch.Generator().manual_seed(self.anchor_config.seed)

    def _swap_back_train_generator(self) -> None:
        if getattr(self, "_train_generator", None) is not None:
            self.anchored.generator, self._train_generator = self._train_generator, None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._eval_step("test", batch)

    def _eval_step(self, split: str, batch: dict[str, Any]) -> torch.Tensor:
        out = self(batch)
        B = batch["input_ids"].shape[0]
        self.log(f"{split}/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=B)
        self._log_anchor_stats(split, B)
        return out.loss

    def _log_anchor_stats(self, split: str, batch_size: int) -> None:
        for name, value in self.anchored.last_stats.items():
            if not math.isnan(value):
                self.log(f"{split}/{name}", value, batch_size=batch_size,
                         sync_dist=split != "train")

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        from attanchor.train.optim import build_optimizer, build_scheduler

        o = self.optim_settings
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(named, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                    betas=o.betas)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, total_steps=total, warmup_ratio=o.warmup_ratio,
                                    schedule=o.schedule)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["anchor_config"] = self.anchor_config.to_dict()
        # The random control's placements continue exactly after a resume.
        checkpoint["anchor_generator_state"] = self.anchored.generator.get_state()
        if self.settings.mode != "full":
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("anchor_generator_state")
        if state is not None and self.anchored is not None:
            self.anchored.generator.set_state(state)
