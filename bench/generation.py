"""Anchored greedy generation against the plain path, measured side by side in one run.

    python bench/generation.py [--smoke] [--out generation.json]

Models (random weights, fp32, CPU): ``tiny`` (the demo's tiny LLaVA layout,
``attanchor.data.tiny.tiny_llava_config``: 64 image tokens, hidden 128, 2 layers) on
``--batches`` x 32 prompts, 8 new tokens; ``tinyllava`` (TinyLLaVA's dimensions,
``gpu_smoke.SHAPES``: hidden 2048, 576 image tokens, CLIP-L width) with 1 decoder and 2 vision
layers, 2 prompts, 4 new tokens (left out by ``--smoke``). Prompts are laid out as rendered
LLaVA prompts (``gpu_smoke.make_batches``), left-padded.

Arms, interleaved round by round, fastest process CPU time of each (``timing.cpu_interleaved``,
one thread):
  * ``plain``: Hugging Face's generate from ``input_ids`` (strategy ``none``);
  * ``plain_padded``: the same prompts left-padded to the anchored prompt's width, i.e. the
    plain path paying for as many extra prompt columns as the anchored one;
  * ``embeds_padded``: the padded prompts through the anchored path's own steps minus the
    regroup (``baseline_embeds``, then Hugging Face's generate from ``inputs_embeds``);
  * ``anchored``: ``AnchoredVLM.generate`` (text_into_image, top 10 % of the prompt words).

``overhead_beyond_prompt = anchored / plain_padded - 1`` is the cost that the extra prompt
tokens do not explain (target < 1 %). ``regroup_share`` is the regroup's CPU time (on the
baseline embeddings) as a share of the anchored generation: where a fixed cost would live.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from gpu_smoke import SHAPES, build_model, make_batches
from timing import cpu_interleaved, write_json
from transformers import LlavaForConditionalGeneration

from attanchor.anchoring import AnchorConfig, AnchoredVLM, regroup
from attanchor.data.tiny import tiny_llava_config

ANCHORED = AnchorConfig(threshold=None, top_fraction=0.1)
EOS = 2


def tiny_model(shape: dict[str, Any]) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    cfg = tiny_llava_config(shape["text"]["vocab_size"], image_token_id=shape["image_token_id"],
                            pad_token_id=shape["pad_token_id"], bos_token_id=1,
                            eos_token_id=EOS)
    return LlavaForConditionalGeneration(cfg).eval()


def left_pad(batch: dict[str, Any], width: int, pad_id: int) -> dict[str, Any]:
    """Left-pad a generation batch to ``width`` columns (pad ids, mask 0, no candidates)."""
    extra = width - batch["input_ids"].shape[1]
    out = dict(batch)
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("candidate_mask", False)):
        v = batch[key]
        out[key] = torch.cat([torch.full((v.shape[0], max(extra, 0)), fill, dtype=v.dtype), v], 1)
    return out


def measure(name: str, model: LlavaForConditionalGeneration, shape: dict[str, Any],
            batches: list[dict[str, Any]], new_tokens: int, repeats: int) -> dict[str, Any]:
    pad = shape["pad_token_id"]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=pad, eos_token_id=EOS)
    plain, anch = AnchoredVLM(model, AnchorConfig(strategy="none")), AnchoredVLM(model, ANCHORED)

    def gen(vlm: AnchoredVLM, bs: list[dict[str, Any]]) -> None:
        for b in bs:
            vlm.generate(b["input_ids"], b["pixel_values"], b["attention_mask"],
                         candidate_mask=b["candidate_mask"], **kw)

    widths, real_in, real_out = [], 0, 0
    for b in batches:  # the anchored widths, and the extra real prompt tokens
        gen(anch, [b])
        widths.append(anch.last_regrouped.attention_mask.shape[1])
        real_in += int(b["attention_mask"].sum())
        real_out += int(anch.last_regrouped.attention_mask.sum())
    padded = [left_pad(b, w, pad) for b, w in zip(batches, widths)]
    with torch.no_grad():  # the regroup alone, on the baseline embeddings of each batch
        base = [anch.baseline_embeds(b["input_ids"], b["pixel_values"])[0] for b in batches]

    def regroup_only() -> None:
        for b, e in zip(batches, base):
            regroup(e, b["attention_mask"], b["input_ids"] == shape["image_token_id"],
                    b["candidate_mask"], None, ANCHORED, side="left")

    def embeds_padded() -> None:
        for b in padded:
            with torch.no_grad():
                e = anch.baseline_embeds(b["input_ids"], b["pixel_values"])[0]
                model.generate(inputs_embeds=e, attention_mask=b["attention_mask"], **kw)

    arms = {"plain": lambda: gen(plain, batches), "plain_padded": lambda: gen(plain, padded),
            "embeds_padded": embeds_padded,
            "anchored": lambda: gen(anch, batches), "regroup_only": regroup_only}
    t = cpu_interleaved(arms, repeats)
    base_width = sum(b["input_ids"].shape[1] for b in batches)
    res = {
        "model": name, "prompts": sum(b["input_ids"].shape[0] for b in batches),
        "new_tokens": new_tokens, "cpu_s": t,
        "prompt_growth_real": real_out / real_in - 1.0,
        "prompt_growth_width": sum(widths) / base_width - 1.0,
        "ratios": {"anchored_vs_plain": t["anchored"] / t["plain"],
                   "anchored_vs_plain_padded": t["anchored"] / t["plain_padded"],
                   "anchored_vs_embeds_padded": t["anchored"] / t["embeds_padded"]},
    }
    res["overhead_beyond_prompt"] = res["ratios"]["anchored_vs_plain_padded"] - 1.0
    res["regroup_share"] = t["regroup_only"] / t["anchored"]
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI): seconds")
    ap.add_argument("--batches", type=int, default=4, help="tiny model: batches of 32 prompts")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # process time = one core's work (timing.cpu_interleaved)
    tiny = dict(SHAPES["tiny"], vision=dict(SHAPES["tiny"]["vision"], image_size=64))
    n_batches, batch, tokens = (1, 4, 2) if args.smoke else (args.batches, 32, 8)
    repeats = 1 if args.smoke else args.repeats
    runs = [measure("tiny", tiny_model(tiny), tiny,
                    make_batches(tiny, n_batches, batch, seed=1, for_generation=True),
                    tokens, repeats)]
    if not args.smoke:
        big = SHAPES["tinyllava"]
        model = build_model(big, 1, 2, torch.device("cpu"), torch.float32, seed=0).eval()
        runs.append(measure("tinyllava-1-layer", model, big,
                            make_batches(big, 1, 2, seed=1, for_generation=True), 4,
                            max(1, repeats // 3)))
    result: dict[str, Any] = {"runs": runs, "threads": 1, "ratios": {}, "targets": {}}
    print("generation, process CPU seconds (fastest of the interleaved rounds), 1 thread")
    print(f"{'model':<18} {'prompts':>7} {'new':>4} {'plain':>8} {'padded':>8} {'anchored':>9} "
          f"{'embeds':>8} {'growth real/width %':>20} {'vs plain':>9} {'beyond prompt %':>16} "
          f"{'regroup %':>10}")
    for r in runs:
        t = r["cpu_s"]
        print(f"{r['model']:<18} {r['prompts']:>7} {r['new_tokens']:>4} {t['plain']:>8.3f} "
              f"{t['plain_padded']:>8.3f} {t['anchored']:>9.3f} {t['embeds_padded']:>8.3f} "
              f"{100 * r['prompt_growth_real']:>9.2f}/{100 * r['prompt_growth_width']:<10.2f} "
              f"{r['ratios']['anchored_vs_plain']:>9.3f} "
              f"{100 * r['overhead_beyond_prompt']:>+16.2f} "
              f"{100 * r['regroup_share']:>10.2f}")
        for k, v in r["ratios"].items():
            result["ratios"][f"{r['model']}/{k}"] = v
        result["targets"][f"{r['model']}/overhead_beyond_prompt < 0.01"] = (
            r["overhead_beyond_prompt"] < 0.01)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
