"""Padding waste and packed throughput, measured side by side in one run.

    python bench/packing.py [--smoke] [--steps 20] [--batch 32] [--pack-length 256]
                            [--out packing.json]

Part 1, padding fraction (pad tokens / all tokens of the batches; no model runs), for
  * easy-vqa (the demo's data, rendered lengths from ``attanchor.data.grouping.modality_lengths``)
  * a generated LLaVA-665K-like length distribution (``llava_like``: the shape of the real
    mix, a log-normal mixture, documented there; not the real data),
each in batches of ``--batch`` records, shuffled vs length-grouped
(``length_grouped_indices``), for the baseline rows and for anchored rows (text_into_image,
top 10 % of the prompt words: a row gains ceil(0.1 * candidates) copies, which the grouping,
working on baseline lengths, does not see), and packed (each batch into balanced rows of
at most ``--pack-length`` tokens, ``attanchor.data.packing.pack_rows``).

Part 2, training tokens/s on the demo recipe (tiny LLaVA, LoRA r 16, batch 32, max_length
128; baseline and text_into_image top 10 %): padded, length-grouped padded and packed
batches, the six arms interleaved step by step so machine noise hits all alike. Throughput
counts each batch's baseline real tokens, as the trainer logs (copies are extra work, not
extra throughput). On a CPU ``sdpa`` runs packed rows as dense masked attention: a row of
three samples costs (3 L)^2, not 3 L^2, so packing short samples costs attention work there;
flash-attention's varlen kernel on a GPU does not pay it.

Returns (and writes as JSON) ``{"padding": {...}, "throughput": {...}, "machine": ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attanchor.data.grouping import length_grouped_indices, padding_fraction
from attanchor.data.packing import pack_rows

TOP_FRACTION = 0.1
IMAGE_TOKENS_336 = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches


def llava_like(n: int, seed: int = 0, max_length: int = 2048
               ) -> tuple[list[int], list[bool], list[int]]:
    """``(lengths, multimodal, candidates)`` of ``n`` generated records shaped like
    LLaVA-1.5's 665K mix (text tokens log-normal per component, + 576 image tokens):

    ==============================  ======  ===================  ==============
    component (665K sources)        share   text tokens median   prompt words
    ==============================  ======  ===================  ==============
    short VQA (VQAv2, GQA, OCR-VQA,  0.45   90 (sigma 0.45)      12 (sigma 0.4)
      A-OKVQA, RefCOCO, VG: a few
      short QA turns per image)
    multi-turn conversations         0.30   330 (sigma 0.5)      14 (sigma 0.4)
    detail / complex reasoning       0.19   220 (sigma 0.35)     16 (sigma 0.4)
    text-only (ShareGPT)             0.06   700 (sigma 0.8)      0 (no image)
    ==============================  ======  ===================  ==============

    Lengths are capped at ``max_length`` (LLaVA truncates at 2048).
    """
    rng = np.random.default_rng(seed)
    comp = rng.choice(4, size=n, p=[0.45, 0.30, 0.19, 0.06])
    med = np.array([90, 330, 220, 700])[comp]
    sig = np.array([0.45, 0.5, 0.35, 0.8])[comp]
    text = np.maximum(8, rng.lognormal(np.log(med), sig)).astype(np.int64)
    mm = comp != 3
    cand = np.where(mm, np.maximum(1, rng.lognormal(np.log(np.array([12, 14, 16, 1])[comp]),
                                                    0.4)).astype(np.int64), 0)
    lengths = np.minimum(text + IMAGE_TOKENS_336 * mm, max_length)
    return lengths.tolist(), mm.tolist(), np.minimum(cand, text).tolist()


def anchored_lengths(lengths: list[int], candidates: list[int]) -> list[int]:
    """Lengths after text_into_image with top_fraction 0.1: ceil(0.1 * candidates) copies."""
    return [n + math.ceil(TOP_FRACTION * c - 1e-9) for n, c in zip(lengths, candidates)]


def packed_padding(lengths: list[int], order: list[int], batch: int, row: int) -> float:
    """Pad fraction when each batch is packed (``pack_rows``) into rows of ``row`` tokens,
    padded to its longest row."""
    total = pad = 0
    for s in range(0, len(order), batch):
        lens = [lengths[i] for i in order[s:s + batch]]
        rows = pack_rows(lens, max(row, max(lens)))
        width = max(sum(lens[i] for i in r) for r in rows)
        total += width * len(rows)
        pad += width * len(rows) - sum(lens)
    return pad / total if total else 0.0


def padding_table(name: str, lengths: list[int], mm: list[bool], cands: list[int],
                  batch: int, row: int, seed: int = 0) -> dict[str, float]:
    n = len(lengths)
    shuffled = np.argsort(np.random.default_rng(seed).random(n), kind="stable").tolist()
    grouped = length_grouped_indices(lengths, mm, batch, seed, 0)
    anch = anchored_lengths(lengths, cands)
    out = {"records": n, "mean_length": float(np.mean(lengths)),
           "anchored_mean_length": float(np.mean(anch))}
    for rows, lens in (("baseline", lengths), ("anchored", anch)):
        for how, order in (("shuffled", shuffled), ("grouped", grouped)):
            out[f"{rows}_{how}"] = padding_fraction(lens, order, batch)
        out[f"{rows}_packed"] = packed_padding(lens, shuffled, batch, row)
    return out


def easy_vqa_lengths(root: Path, n_images: int) -> tuple[Any, list[int], list[bool], list[int]]:
    """Rendered lengths and candidate counts of easy-vqa records (text render, no images)."""
    from attanchor.data.datamodule import VLMDataModule
    from attanchor.data.easyvqa import prepare_easy_vqa
    from attanchor.data.grouping import modality_lengths, nominal_image_tokens
    from attanchor.data.tiny import build_tiny_llava

    prepare_easy_vqa(root / "data", max_train_images=n_images, max_test_images=4,
                     progress=False)
    model_dir = build_tiny_llava(root / "model", seed=0)
    dm = VLMDataModule(model_path=str(model_dir), train_file=str(root / "data/train.json"),
                       image_root=str(root / "data/images"), max_length=128)
    dm.setup("fit")
    ds = dm.datasets["train"]
    lengths, mm = modality_lengths(ds)
    k = nominal_image_tokens(ds.renderer)
    cands = [int(ds.renderer.render_text(ds.index[i], [k] * len(ds.index[i].images))
                 .candidate_mask.sum()) for i in range(len(ds))]
    return dm, lengths, mm, cands


def throughput(dm: Any, lengths: list[int], mm: list[bool], steps: int, batch: int,
               pack_length: int) -> dict[str, Any]:
    """Training steps on padded, length-grouped padded and packed batches (module doc, part
    2). Padded and packed arms take the same records (a seeded shuffle); the grouped arms take
    the first batches of ``length_grouped_indices``. Tokens/s per arm: its own real tokens."""
    from attanchor.anchoring import AnchorConfig, AnchoredVLM
    from attanchor.anchoring.packed import packed_forward
    from attanchor.data.collate import collate
    from attanchor.data.packing import packed_collate
    from attanchor.train.build import configure_trainable, load_model

    ds = dm.datasets["train"]
    need = batch * (steps + 1)
    shuffled = np.argsort(np.random.default_rng(0).random(len(ds)), kind="stable").tolist()
    grouped = length_grouped_indices(lengths, mm, batch, 0, 0)
    orders = {"padded": shuffled, "packed": shuffled, "grouped": grouped}
    cache: dict[int, Any] = {}

    def records(order: list[int], i: int) -> list[Any]:
        idx = [order[j % len(order)] for j in range(i * batch, (i + 1) * batch)]
        return [cache.setdefault(k, ds[k]) for k in idx]

    keys = ("input_ids", "pixel_values", "attention_mask", "labels", "candidate_mask",
            "sample_index")
    arms: dict[str, Any] = {}
    for strat, cfg in (("none", AnchorConfig(strategy="none")),
                       ("text_into_image", AnchorConfig(threshold=None,
                                                        top_fraction=TOP_FRACTION))):
        for layout in ("padded", "grouped", "packed"):
            torch.manual_seed(0)
            hf = configure_trainable(load_model(dm.model_path), stage="finetune", mode="lora",
                                     lora_r=16, lora_alpha=32, lora_dropout=0.0)
            params = [p for p in hf.parameters() if p.requires_grad]
            arms[f"{strat}/{layout}"] = (AnchoredVLM(hf, cfg),
                                         torch.optim.AdamW(params, lr=1e-4), layout)
    times: dict[str, list[float]] = {k: [] for k in arms}
    cpu: dict[str, list[float]] = {k: [] for k in arms}  # process CPU time: work, not waits
    slots: dict[str, list[int]] = {k: [] for k in arms}
    tokens: dict[str, list[float]] = {k: [] for k in arms}
    for i in range(min(steps + 1, max(1, need // batch))):
        batches = {"padded": collate(records(orders["padded"], i), dm.pad_token_id),
                   "grouped": collate(records(orders["grouped"], i), dm.pad_token_id),
                   "packed": packed_collate(records(orders["packed"], i), dm.pad_token_id,
                                            pack_length)}
        for name, (model, opt, layout) in arms.items():
            b = batches[layout]
            t0, c0 = time.perf_counter(), time.process_time()
            if layout == "packed":
                out = packed_forward(model, **{k: b[k] for k in keys},
                                     pack_ids=b["pack_ids"])[0]
            else:
                out = model(**{k: b[k] for k in keys})
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # step 0 warms up allocators and caches
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                slots[name].append(int(out.logits.shape[0] * out.logits.shape[1]))
                tokens[name].append(float(b["attention_mask"].sum()))
    res: dict[str, Any] = {"steps": steps, "batch": batch, "pack_length": pack_length,
                           "threads": torch.get_num_threads(), "arms": {}}
    for name in arms:
        t = statistics.median(times[name]) if times[name] else float("nan")
        tok = statistics.mean(tokens[name]) if tokens[name] else 0.0
        c = statistics.median(cpu[name]) if cpu[name] else float("nan")
        res["arms"][name] = {"ms_per_step": 1e3 * t, "cpu_ms_per_step": 1e3 * c,
                             "tokens_per_step": tok, "tokens_per_cpu_s": tok / c,
                             "tokens_per_s": tok / t,
                             "slots_per_step": statistics.mean(slots[name]) if slots[name]
                             else 0.0}
    base = res["arms"]["none/padded"]["tokens_per_s"]
    for name in arms:
        res["arms"][name]["vs_padded_baseline"] = res["arms"][name]["tokens_per_s"] / base
    for layout in ("padded", "grouped", "packed"):
        res[f"anchored_over_baseline_{layout}"] = (
            res["arms"][f"text_into_image/{layout}"]["tokens_per_s"]
            / res["arms"][f"none/{layout}"]["tokens_per_s"])
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI): seconds")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pack-length", type=int, default=256)
    ap.add_argument("--llava-records", type=int, default=100_000)
    ap.add_argument("--easy-vqa-images", type=int, default=200)
    ap.add_argument("--out", default="packing.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.llava_records, args.easy_vqa_images = 1, 4, 2000, 8
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        dm, lens, mm, cands = easy_vqa_lengths(Path(tmp), args.easy_vqa_images)
        padding = {"easy-vqa": padding_table("easy-vqa", lens, mm, cands, args.batch,
                                             args.pack_length)}
        ll, lm, lc = llava_like(args.llava_records)
        padding["llava-665k-like"] = padding_table("llava-665k-like", ll, lm, lc, 16, 2048)
        thr = throughput(dm, lens, mm, args.steps, args.batch, args.pack_length)
    result = {"padding": padding, "throughput": thr,
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}}
    print("padding fraction (pad tokens / all tokens); easy-vqa batch "
          f"{args.batch}, packed rows of {args.pack_length}; llava-665k-like batch 16, "
          "packed rows of 2048")
    cols = ("baseline_shuffled", "baseline_grouped", "baseline_packed", "anchored_shuffled",
            "anchored_grouped", "anchored_packed")
    print(f"{'data':<16} {'records':>8} {'mean len':>9} " + " ".join(f"{c:>17}" for c in cols))
    for name, row in padding.items():
        print(f"{name:<16} {row['records']:>8} {row['mean_length']:>9.1f} "
              + " ".join(f"{row[c]:>17.4f}" for c in cols))
    print(f"\ndemo recipe training step (tiny LLaVA, LoRA r16, batch {thr['batch']}, packed "
          f"rows of {thr['pack_length']}, {thr['steps']} timed steps per arm, interleaved, "
          f"{thr['threads']} threads)")
    print(f"{'arm':<24} {'ms/step':>9} {'cpu ms/step':>11} {'tokens/step':>11} "
          f"{'tokens/s':>10} {'slots/step':>11} {'vs padded none':>15}")
    for name, a in thr["arms"].items():
        print(f"{name:<24} {a['ms_per_step']:>9.1f} {a['cpu_ms_per_step']:>11.1f} "
              f"{a['tokens_per_step']:>11.0f} {a['tokens_per_s']:>10.0f} "
              f"{a['slots_per_step']:>11.0f} {a['vs_padded_baseline']:>15.3f}")
    print("anchored / baseline tokens/s: " + ", ".join(
        f"{lay} {thr[f'anchored_over_baseline_{lay}']:.3f}"
        for lay in ("padded", "grouped", "packed")))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
