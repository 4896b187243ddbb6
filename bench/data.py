"""Data pipeline throughput: samples/second through render + collate, per worker, with real
easy-vqa images, next to what a tiny-model training step consumes (batch 32); and on 640x480
JPEGs decoded from disk at 336 px, next to a TinyLLaVA step's consumption on one GPU.

Run: python bench/data.py [--smoke] [--samples 640] [--train-images 300] [--out data.json]
Prints tables measured in this run; the ratio column is data samples/s divided by the
training step's samples/s (target: >= 10 per worker).

JPEG part: ``--jpeg-images`` random 640x480 JPEGs (smooth colour fields plus noise, quality
90, about 100 KB each) written to a temporary directory, rendered by the project's pipeline
with a CLIP processor at 336 px (resize + centre crop + normalise, 576 image tokens) from
the page cache, no image cache; per worker = one process, one thread, process CPU time.
The GPU side is an ESTIMATE, not a measurement: samples/s = peak bf16 FLOP/s x MFU / FLOPs
per sample, FLOPs per sample = 4 x 1.1e9 x 680 tokens (LoRA: forward plus the activation
backward through the frozen LLM, TinyLlama-1.1B, 576 image + ~100 text tokens) + 2 x 3.04e8 x
577 (the frozen CLIP ViT-L/14-336 forward), with ``--gpu-peak-tflops`` 989 (H100 SXM dense
bf16, NVIDIA's datasheet) and ``--gpu-mfu`` 0.4 (a typical achieved fraction for 1B models):
about 120 samples/s. Workers needed = ceil(GPU samples/s / per-worker samples/s).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timing import write_json
from torch.utils.data import DataLoader

from attanchor.data.collate import collate
from attanchor.data.easyvqa import prepare_easy_vqa
from attanchor.data.records import RenderedDataset, index_records
from attanchor.data.render import Renderer
from attanchor.data.tiny import build_processor, build_tokenizer, easy_vqa_vocab, tiny_llava_config


def in_process_rate(dataset: RenderedDataset, order: list[int], batch: int, pad: int) -> float:
    """Samples/s of one process rendering and collating ``order`` in batches (= one worker);
    from the median batch time, so other processes on a shared machine skew it less."""
    times = []
    for i in range(0, len(order) - batch + 1, batch):
        start = time.process_time()  # one worker's CPU: other jobs on the machine do not count
        collate([dataset[j] for j in order[i:i + batch]], pad_token_id=pad)
        times.append(time.process_time() - start)
    return batch / statistics.median(times)


def write_jpegs(root: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` 640x480 JPEGs (quality 90): a smooth random colour field plus pixel noise, so
    the encoder sees photo-like entropy rather than flat colour."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((640, 480), Image.BICUBIC), np.int16)
        noise = rng.integers(-24, 25, field.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))
        names.append(f"img{i:05d}.jpg")
        img.save(root / names[-1], quality=90)
    return names


def gpu_step_estimate(peak_tflops: float, mfu: float) -> dict[str, float]:
    """TinyLLaVA LoRA step consumption on one GPU, estimated from FLOPs (module doc)."""
    llm = 4 * 1.1e9 * 680  # forward 2NT + activation backward 2NT; frozen weights: no dW
    tower = 2 * 3.04e8 * 577  # frozen CLIP ViT-L/14-336 forward
    per_sample = llm + tower
    return {"flops_per_sample": per_sample, "peak_tflops": peak_tflops, "mfu": mfu,
            "samples_per_s": peak_tflops * 1e12 * mfu / per_sample}


def jpeg_rate(root: Path, n: int, batch: int) -> dict[str, Any]:
    """Samples/s of one worker rendering 640x480 JPEGs at 336 px (576 image tokens)."""
    names = write_jpegs(root / "images", n)
    records = [{"id": f"j{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape ?"},
        {"from": "gpt", "value": "red"}]} for i, name in enumerate(names)]
    (root / "train.json").write_text(json.dumps(records))
    processor = build_processor(build_tokenizer(easy_vqa_vocab()), image_size=336,
                                patch_size=14)
    renderer = Renderer(processor, max_length=1024, image_root=root / "images",
                        verify_template=False, image_cache_mb=0)
    index, bad, _ = index_records(root / "train.json", format="llava",
                                  image_root=root / "images", progress=False)
    assert not bad, bad[:3]
    ds = RenderedDataset(index, renderer)
    pad = processor.tokenizer.pad_token_id
    sample = ds[0]
    rate = in_process_rate(ds, list(range(len(index))), batch, pad)
    return {"images": n, "size": [640, 480], "bytes_mean": statistics.mean(
        (root / "images" / m).stat().st_size for m in names),
        "image_tokens": int((sample.input_ids == processor.tokenizer.convert_tokens_to_ids(
            processor.image_token)).sum()), "samples_per_s_per_worker": rate}


def loader_rate(dataset: RenderedDataset, n: int, batch: int, pad: int, workers: int) -> float:
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=n,
                                             generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                        collate_fn=partial(collate, pad_token_id=pad))
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, seen = time.perf_counter(), 0
    for b in it:
        seen += len(b["ids"])
    return seen / (time.perf_counter() - start)


def step_rate(processor, dataset: RenderedDataset, batch: int, steps: int) -> tuple[float, int]:
    """Samples/s of forward + backward + AdamW on the tiny LLaVA (patch 8, 64 image tokens)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    data = collate([dataset[i] for i in range(batch)],
                   pad_token_id=processor.tokenizer.pad_token_id)
    inputs = {k: data[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    for _ in range(3):  # warm-up
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times), data["input_ids"].shape[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI): seconds")
    ap.add_argument("--samples", type=int, default=640)
    ap.add_argument("--train-images", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--step-threads", type=int, default=torch.get_num_threads(),
                    help="threads of the training step (also measured with 1)")
    ap.add_argument("--jpeg-images", type=int, default=192)
    ap.add_argument("--gpu-peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak of the GPU the estimate assumes (H100 SXM: 989)")
    ap.add_argument("--gpu-mfu", type=float, default=0.4)
    ap.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.samples, args.train_images, args.batch, args.steps = 32, 12, 8, 2
        args.jpeg_images, args.workers, args.step_threads = 16, 1, 1
    torch.set_num_threads(1)  # one worker = one core, as in a DataLoader worker

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "easyvqa"
        counts = prepare_easy_vqa(out, max_train_images=args.train_images, max_test_images=10,
                                  progress=False)
        processor = build_processor(build_tokenizer(easy_vqa_vocab()))
        pad = processor.tokenizer.pad_token_id
        root = out / "images"
        t0 = time.perf_counter()
        index, bad, total = index_records(out / "train.json", format="llava", image_root=root,
                                          renderer=Renderer(processor, max_length=512,
                                                            image_root=root))
        index_s = time.perf_counter() - t0
        assert not bad, bad[:3]
        order = random.Random(0).choices(range(len(index)), k=args.samples)
        print(f"easy-vqa: {counts['train_questions']} train questions on "
              f"{counts['train_images']} images; setup indexing (format + image verify + "
              f"verified text render) {total / index_s:,.0f} records/s")

        rows = []
        epoch = list(range(len(index)))
        random.Random(1).shuffle(epoch)
        for template in (None, "llava-1.5"):
            name = template or "own"
            for cache_mb in (0, 256):
                r = Renderer(processor, template=template, max_length=512, image_root=root,
                             verify_template=False, image_cache_mb=cache_mb)
                ds = RenderedDataset(index, r)
                if not cache_mb:
                    rows.append((name, "off (cold)", "1", in_process_rate(ds, order, args.batch,
                                                                           pad)))
                    continue
                first = in_process_rate(ds, epoch, args.batch, pad)  # fills as it goes
                rows.append((name, "256 MB, epoch 1", "1", first))
                rows.append((name, "256 MB, warm", "1", in_process_rate(ds, order, args.batch,
                                                                        pad)))
        r = Renderer(processor, max_length=512, image_root=root, verify_template=False,
                     image_cache_mb=0)
        ds = RenderedDataset(index, r)
        rows.append(("own", "off (cold)", f"{args.workers} (DataLoader)",
                     loader_rate(ds, args.samples, args.batch, pad, args.workers)))
        steps = {}
        for threads in sorted({1, args.step_threads}):
            torch.set_num_threads(threads)
            steps[threads], length = step_rate(processor, ds, args.batch, args.steps)
        torch.set_num_threads(1)
        jpeg = jpeg_rate(Path(tmp) / "jpeg", args.jpeg_images, args.batch)
    consume = max(steps.values())  # the faster step: the stricter comparison
    gpu = gpu_step_estimate(args.gpu_peak_tflops, args.gpu_mfu)
    per_worker = jpeg["samples_per_s_per_worker"]
    jpeg.update({"gpu_estimate": gpu, "ratio_per_worker": per_worker / gpu["samples_per_s"],
                 "workers_needed": math.ceil(gpu["samples_per_s"] / per_worker)})

    for threads, rate in steps.items():
        print(f"training step (tiny LLaVA, batch {args.batch}, seq {length}, fwd+bwd+AdamW, "
              f"{threads} thread(s), median of {args.steps}): {rate:,.0f} samples/s "
              f"({args.batch / rate * 1e3:.0f} ms/step)")
    print(f"ratio = data samples/s / {consume:,.0f} (the faster step)")
    print(f"{'template':<10} {'image cache':<17} {'workers':<15} {'samples/s':>10} {'ratio':>7}")
    for template, cache, workers, rate in rows:
        print(f"{template:<10} {cache:<17} {workers:<15} {rate:>10,.0f} {rate / consume:>7.1f}")
    print(f"\n640x480 JPEGs from disk at 336 px ({jpeg['image_tokens']} image tokens, "
          f"{jpeg['bytes_mean'] / 1e3:.0f} KB each): {per_worker:.1f} samples/s per worker "
          f"({1e3 / per_worker:.1f} ms each)")
    print(f"TinyLLaVA LoRA step on one GPU, ESTIMATED from FLOPs ({gpu['flops_per_sample']:.2e} "
          f"FLOPs/sample, {gpu['peak_tflops']:.0f} TFLOP/s peak x MFU {gpu['mfu']}): "
          f"{gpu['samples_per_s']:.0f} samples/s -> ratio per worker "
          f"{jpeg['ratio_per_worker']:.2f}, workers needed {jpeg['workers_needed']}")
    result = {
        "easy_vqa": [{"template": t, "image_cache": c, "workers": w, "samples_per_s": r,
                      "ratio": r / consume} for t, c, w, r in rows],
        "tiny_step_samples_per_s": {str(k): v for k, v in steps.items()},
        "jpeg_336": jpeg,
        "ratios": {"easy_vqa_cold_per_worker_vs_tiny_step": rows[0][3] / consume,
                   "jpeg_336_per_worker_vs_gpu_estimate": jpeg["ratio_per_worker"]},
        "targets": {"easy_vqa cold per worker >= 10x tiny step": rows[0][3] / consume >= 10},
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
