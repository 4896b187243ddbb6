"""Device smoke test at TinyLLaVA's dimensions: LoRA training, baseline and anchored, then
anchored generation; throughput, peak GPU memory and the generation overhead, in one run.

    python bench/gpu_smoke.py --out smoke.json [--steps 20] [--batch 4] [--layers 4]
        [--vision-layers 24] [--gen-tokens 32] [--sync-debug]
    python bench/gpu_smoke.py --tiny --out smoke.json     # toy shapes, seconds on a CPU

Model: a random LlavaForConditionalGeneration with tiny-llava-v1-hf's configuration (TinyLlama-
1.1B: hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocabulary 32064 = TinyLlama's 32000 plus
the rows llava-hf adds for <image> (32000) and padding (32001); CLIP ViT-L/14-336: 576 image
tokens, feature layer -2), with ``--layers`` decoder layers instead of 22. Built directly on the
device, weights in bf16, then the project's own pieces: ``configure_trainable`` (LoRA r 32,
alpha 64, dropout 0.05 on the LLM and the projector, the TinyLLaVA recipe), ``build_optimizer``
(AdamW, lr 1e-4, weight decay 0.003) and ``AnchoredVLM`` (strategy ``none``, then
``text_into_image`` with ``top_fraction`` 0.1, so every prompt gets anchors whatever the random
weights' similarities). Forward passes run under bf16 autocast (the adapters are fp32).
``--dtype`` defaults to bfloat16 on CUDA and float32 on a CPU (as bench/regroup.py), because
CPU bf16 kernels are some 50x slower than fp32 here; ``--tiny`` on a CPU checks the logic.

Batches are synthetic but laid out as rendered LLaVA samples and padded by the project's
``collate``: ``<s> USER: <image>x576 question ASSISTANT: answer </s>``, the question words
the candidates, the answer and ``</s>`` the labels; lengths vary so rows are padded. Both arms
train on the same batches from the same initial weights, one arm after the other (the first
arm's model is freed first, so each arm's peak memory is its own). Throughput counts the
*baseline's* real tokens (inserted copies are extra work, not extra throughput), over the timed
steps after ``--warmup`` untimed ones, with ``torch.cuda.synchronize()`` around every step.
Generation: the anchored arm's trained model, greedy, exactly ``--gen-tokens`` new tokens per
prompt (``min_new_tokens``), plain ``generate`` vs anchored ``generate`` (the prompt regrouped
at prefill), median of ``--gen-repeats`` after one warm-up each.

``--sync-debug`` counts the host-device synchronisations of one more anchored forward, in the
trained configuration and in its static-shape twin (``max_anchors`` 16, ``static_shape``), on any
device; on CUDA the static regroup then runs under ``torch.cuda.set_sync_debug_mode("error")``
and the static forward under ``"warn"`` (``bench/sync_debug.py``).

Prints a table and writes every figure to ``--out`` (JSON). Target on one GPU: under 5 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import transformers
from sync_debug import describe, sync_debug
from timing import sync, timed
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.data.collate import collate
from attanchor.data.render import IGNORE_INDEX, RenderedSample
from attanchor.train.build import configure_trainable, count_parameters
from attanchor.train.optim import build_optimizer

# tiny-llava-v1-hf (bczhou/tiny-llava-v1-hf config.json) and a toy model of the same layout.
SHAPES: dict[str, dict[str, Any]] = {
    "tinyllava": {
        "text": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32064, max_position_embeddings=2048,
                     rms_norm_eps=1e-5),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
        "image_token_id": 32000, "pad_token_id": 32001,
        # LLaVA-Instruct-like lengths: questions of 10-60 tokens, answers of 20-120.
        "question": (10, 60), "answer": (20, 120),
    },
    "tiny": {
        "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=320, max_position_embeddings=512),
        "vision": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       image_size=32, patch_size=8, projection_dim=32),
        "image_token_id": 300, "pad_token_id": 301,
        "question": (6, 12), "answer": (2, 6),
    },
}
BOS, EOS = 1, 2  # Llama's ids; 0 is <unk>
USER, ASSISTANT = 3, 4  # template tokens around the image and before the answer (not candidates)
ANCHORED = AnchorConfig(strategy="text_into_image", threshold=None, top_fraction=0.1)
BASELINE = AnchorConfig(strategy="none")
BATCH_KEYS = ("input_ids", "pixel_values", "attention_mask", "labels", "candidate_mask")


def image_tokens(shape: dict[str, Any]) -> int:
    """Image tokens per image: (image_size / patch)^2 (CLS dropped by the "default" strategy)."""
    return (shape["vision"]["image_size"] // shape["vision"]["patch_size"]) ** 2


def build_model(shape: dict[str, Any], layers: int, vision_layers: int, device: torch.device,
                dtype: torch.dtype, seed: int) -> LlavaForConditionalGeneration:
    """A random LLaVA of ``shape`` with ``dtype`` weights on ``device``; same seed, same
    weights."""
    if vision_layers < 2:
        raise ValueError("--vision-layers must be >= 2 (LLaVA reads the second-to-last layer)")
    text = LlamaConfig(**shape["text"], num_hidden_layers=layers, bos_token_id=BOS,
                       eos_token_id=EOS, pad_token_id=shape["pad_token_id"])
    vision = CLIPVisionConfig(**shape["vision"], num_hidden_layers=vision_layers)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=shape["image_token_id"], projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=shape["pad_token_id"])
    config._attn_implementation = "sdpa"  # the recipes' choice; read by every sub-model
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: no host copy of the weights
        model = LlavaForConditionalGeneration(config)
    return model.to(dtype).train()


def make_batches(shape: dict[str, Any], n: int, batch: int, *, seed: int,
                 for_generation: bool = False) -> list[dict[str, Any]]:
    """``n`` collated batches (CPU tensors) laid out as rendered LLaVA samples.

    A row: ``[BOS, USER, image x M, question (candidates), ASSISTANT, answer, EOS]``, labels
    on the answer and EOS; for generation the row stops after ASSISTANT and is left-padded.
    """
    g = torch.Generator().manual_seed(seed)
    M, img = image_tokens(shape), shape["image_token_id"]
    size = shape["vision"]["image_size"]
    out = []
    for b in range(n):
        samples = []
        for i in range(batch):
            q = int(torch.randint(*shape["question"], (1,), generator=g))
            a = int(torch.randint(*shape["answer"], (1,), generator=g))
            question = torch.randint(5, img, (q,), generator=g)  # ordinary text ids
            answer = torch.randint(5, img, (a,), generator=g)
            head = torch.tensor([BOS, USER] + [img] * M)
            parts = [head, question, torch.tensor([ASSISTANT])]
            if not for_generation:
                parts += [answer, torch.tensor([EOS])]
            ids = torch.cat(parts)
            labels = torch.full_like(ids, IGNORE_INDEX)
            if not for_generation:
                labels[-(a + 1):] = ids[-(a + 1):]
            cand = torch.zeros(len(ids), dtype=torch.bool)
            cand[len(head):len(head) + q] = True
            pixels = torch.randn(1, 3, size, size, generator=g)
            samples.append(RenderedSample(id=f"b{b}s{i}", input_ids=ids, labels=labels,
                                          candidate_mask=cand, pixel_values=pixels))
        out.append(collate(samples, shape["pad_token_id"],
                           padding_side="left" if for_generation else "right"))
    return out


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype,
              keys: tuple[str, ...] = BATCH_KEYS) -> dict[str, Any]:
    moved = {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}
    # The processor gives fp32 pixels; a bf16 model wants its own dtype (as evaluation does).
    moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast for bf16 weights (the fp32 LoRA adapters then compute in bf16 too)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def new_arm(args: argparse.Namespace, shape: dict[str, Any], device: torch.device,
            config: AnchorConfig) -> tuple[AnchoredVLM, torch.optim.Optimizer]:
    hf = build_model(shape, args.layers, args.vision_layers, device, args.dtype, args.seed)
    hf = configure_trainable(hf, stage="finetune", mode="lora", lora_r=32, lora_alpha=64,
                             lora_dropout=0.05)
    opt = build_optimizer(hf.named_parameters(), "adamw", lr=1e-4, weight_decay=0.003)
    return AnchoredVLM(hf, config), opt


def train_arm(model: AnchoredVLM, opt: torch.optim.Optimizer, batches: list[dict[str, Any]],
              warmup: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Run every batch as one optimizer step; time the ones after ``warmup``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, tokens, base_len, seq_len, anchors = [], [], 0, [], [], []
    for i, cpu_batch in enumerate(batches):
        inputs = to_device(cpu_batch, device, dtype)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            out = model(**inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t0
        losses.append(float(out.loss.detach()))  # after the clock: .item() synchronises
        r = model.last_regrouped
        base_len.append(int(cpu_batch["input_ids"].shape[1]))  # (B, L) -> L
        seq_len.append(int(r.attention_mask.shape[1]) if r is not None else base_len[-1])
        anchors.append(float(model.last_anchor_counts.float().mean()))
        if i >= warmup:
            times.append(dt)
            tokens += int(cpu_batch["attention_mask"].sum())
        del out
    peak = peak_memory(device)
    return {
        "steps": len(times), "warmup_steps": warmup,
        "tokens_per_s": tokens / sum(times),
        "ms_per_step_median": 1e3 * statistics.median(times),
        "baseline_tokens_per_step": tokens / len(times),
        "baseline_seq_len_mean": statistics.mean(base_len),
        "seq_len_mean": statistics.mean(seq_len),  # the regrouped width (L' >= L)
        "anchors_per_row_mean": statistics.mean(anchors),
        "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
        "peak_memory_bytes": peak,
        "peak_memory_gib": None if peak is None else peak / 2**30,
    }


def time_generate(model: AnchoredVLM, batches: list[dict[str, Any]], tokens: int,
                  pad_id: int, repeats: int, device: torch.device, dtype: torch.dtype
                  ) -> tuple[float, list[int]]:
    """Median seconds to generate ``tokens`` new tokens for every prompt batch; the shape."""
    shape: list[int] = []  # (B, T_new) of the last batch, filled by every run

    def run() -> None:
        for cpu_batch in batches:
            b = to_device(cpu_batch, device, dtype, keys=("input_ids", "pixel_values",
                                                          "attention_mask", "candidate_mask"))
            with autocast(device, dtype):
                new = model.generate(b["input_ids"], b["pixel_values"], b["attention_mask"],
                                     candidate_mask=b["candidate_mask"], max_new_tokens=tokens,
                                     min_new_tokens=tokens, do_sample=False,
                                     pad_token_id=pad_id, eos_token_id=EOS)
            shape[:] = new.shape

    return timed(run, device, repeats), shape


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="write the figures here (JSON)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (CPU tests)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="weights (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per arm")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--batch", type=int, default=4, help="per-step batch (the recipe's 4)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; tiny 2)")
    ap.add_argument("--vision-layers", type=int, default=None,
                    help="CLIP layers (default 24 as ViT-L/14; tiny 2)")
    ap.add_argument("--gen-tokens", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--gen-batches", type=int, default=2)
    ap.add_argument("--gen-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sync-debug", action="store_true",
                    help="count host-device syncs of one anchored forward (CUDA)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.gen_tokens < 1 or args.batch < 1:
        ap.error("--steps, --batch and --gen-tokens must be >= 1, --warmup >= 0")
    name = "tiny" if args.tiny else "tinyllava"
    shape = SHAPES[name]
    args.layers = args.layers or (2 if args.tiny else 4)
    args.vision_layers = args.vision_layers or (2 if args.tiny else 24)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.dtype = getattr(torch, dtype_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --tiny --device cpu")
    t_start = time.perf_counter()

    batches = make_batches(shape, args.warmup + args.steps, args.batch, seed=args.seed)
    arms: dict[str, Any] = {}
    for arm, config in (("none", BASELINE), ("text_into_image", ANCHORED)):
        model, opt = new_arm(args, shape, device, config)
        trainable, total = count_parameters(model.model)
        arms[arm] = train_arm(model, opt, batches, args.warmup, device, args.dtype)
        if arm == "none":  # free it before the next arm, so each peak is the arm's own
            del model, opt
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # Evaluate the anchored arm's trained model: plain vs anchored generation.
    model.eval()
    prompts = make_batches(shape, args.gen_batches, args.batch, seed=args.seed + 1,
                           for_generation=True)
    pad = shape["pad_token_id"]
    plain_s, plain_shape = time_generate(AnchoredVLM(model.model, BASELINE), prompts,
                                         args.gen_tokens, pad, args.gen_repeats, device,
                                         args.dtype)
    anch_s, anch_shape = time_generate(model, prompts, args.gen_tokens, pad,
                                       args.gen_repeats, device, args.dtype)
    gen_anchors = float(model.last_anchor_counts.float().mean())
    debug = None
    if args.sync_debug:
        debug = sync_debug(model, to_device(batches[-1], device, args.dtype),
                           lambda: autocast(device, args.dtype))

    base, anch = arms["none"], arms["text_into_image"]
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": name, "dtype": dtype_name,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "model": {"text_layers": args.layers, "vision_layers": args.vision_layers,
                  "hidden_size": shape["text"]["hidden_size"],
                  "vocab_size": shape["text"]["vocab_size"], "image_tokens": image_tokens(shape),
                  "parameters": total, "trainable_parameters": trainable},
        "batch": args.batch, "steps": args.steps, "arms": arms,
        "tokens_per_s_ratio": anch["tokens_per_s"] / base["tokens_per_s"],
        "generation": {
            "batches": args.gen_batches, "batch": args.batch, "new_tokens": args.gen_tokens,
            "plain_shape": plain_shape, "anchored_shape": anch_shape,
            "plain_s": plain_s, "anchored_s": anch_s,
            "overhead": anch_s / plain_s - 1.0,  # 0.05 = anchored generation 5 % slower
            "anchors_per_row_mean": gen_anchors,
        },
        "sync_debug": debug,
        "wall_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(figures, indent=2))
    os.replace(tmp, out)

    mem = {a: (f"{v['peak_memory_gib']:.2f} GiB" if v["peak_memory_gib"] is not None
               else "n/a (CPU)") for a, v in arms.items()}
    print(f"{figures['device']}: {name} shapes, {args.layers} decoder + {args.vision_layers} "
          f"vision layers, {total / 1e6:.1f}M parameters ({trainable / 1e6:.2f}M LoRA), "
          f"batch {args.batch}, {args.steps} timed steps per arm, {dtype_name}")
    print(f"{'arm':<16} {'tokens/s':>10} {'ms/step':>9} {'seq len':>8} {'anchors/row':>12} "
          f"{'loss first->last':>17} {'peak memory':>12}")
    for a, v in arms.items():
        print(f"{a:<16} {v['tokens_per_s']:10.0f} {v['ms_per_step_median']:9.1f} "
              f"{v['seq_len_mean']:8.1f} {v['anchors_per_row_mean']:12.2f} "
              f"{v['loss_first']:8.3f}->{v['loss_last']:.3f} {mem[a]:>12}")
    print(f"anchored / baseline tokens/s: {figures['tokens_per_s_ratio']:.3f}")
    print(f"generation ({args.gen_batches} x {args.batch} prompts, {args.gen_tokens} new tokens): "
          f"plain {plain_s:.3f} s, anchored {anch_s:.3f} s, overhead "
          f"{100 * figures['generation']['overhead']:+.1f} %")
    if debug is not None:
        print(describe(debug))
    print(f"wall {figures['wall_s']:.1f} s; figures in {out}")
    if not all(math.isfinite(v["loss_last"]) for v in arms.values()):
        raise SystemExit("a loss is not finite: see the figures")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
