"""Data pipeline throughput: samples/second through render + collate, per worker, with real
easy-vqa images, next to what a tiny-model training step consumes (batch 32).

Run: /work/venv/bin/python bench/data.py [--samples 2000] [--train-images 1000]
Prints one table measured in this run; the ratio column is data samples/s divided by the
training step's samples/s (target: >= 10 per worker).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from attanchor.data.collate import collate
from attanchor.data.datamodule import RenderedDataset, index_records
from attanchor.data.easyvqa import prepare_easy_vqa
from attanchor.data.render import Renderer
from attanchor.data.tiny import build_processor, build_tokenizer, easy_vqa_vocab, tiny_llava_config


def in_process_rate(dataset: RenderedDataset, order: list[int], batch: int, pad: int) -> float:
    """Samples/s of one process rendering and collating ``order`` in batches (= one worker);
    from the median batch time, so other processes on a shared machine skew it less."""
    times = []
    for i in range(0, len(order) - batch + 1, batch):
        start = time.perf_counter()
        collate([dataset[j] for j in order[i:i + batch]], pad_token_id=pad)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--train-images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--step-threads", type=int, default=torch.get_num_threads(),
                    help="threads of the training step (also measured with 1)")
    args = ap.parse_args()
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
    consume = max(steps.values())  # the faster step: the stricter comparison

    for threads, rate in steps.items():
        print(f"training step (tiny LLaVA, batch {args.batch}, seq {length}, fwd+bwd+AdamW, "
              f"{threads} thread(s), median of {args.steps}): {rate:,.0f} samples/s "
              f"({args.batch / rate * 1e3:.0f} ms/step)")
    print(f"ratio = data samples/s / {consume:,.0f} (the faster step)")
    print(f"{'template':<10} {'image cache':<17} {'workers':<15} {'samples/s':>10} {'ratio':>7}")
    for template, cache, workers, rate in rows:
        print(f"{template:<10} {cache:<17} {workers:<15} {rate:>10,.0f} {rate / consume:>7.1f}")


if __name__ == "__main__":
    main()
