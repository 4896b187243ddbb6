"""Regroup cost against its floor, and its peak memory at LLaVA-NeXT's image length, in one run.

    python bench/regroup.py [--smoke] [--repeats 5] [--layer] [--out regroup.json]

Floor: the work no implementation can skip, timed side by side with the regroup on the same
tensors: the candidate-by-image similarity matmul (B, N, d) x (B, d, M) plus one gather of the
lengthened output (B * L', d); forward+backward adds the gather's backward (a scatter-add of
the output gradient). Ratios regroup / floor, forward and forward+backward, for the dynamic
mode and the static-shape mode (``max_anchors`` 16: its packed queries are L wide, every
position could be a candidate, so its similarity is L / N times the floor's), at three shapes:

    tinyllava : B 4, M 576,  60 prompt + 30 answer tokens, d 2048 (TinyLlama-1.1B)
    llava-7b  : B 4, M 576,  60 + 30, d 4096 (Vicuna-7B)
    llava-next: B 2, M 2880 (5 tiles of 576), 60 + 30, d 4096

fp32 on a CPU (bf16 on CUDA), top 10 % of the prompt words. Times: the fastest process CPU
time of interleaved rounds, one thread (``timing.cpu_interleaved``); target regroup <= 1.5x
the floor. ``--layer`` also times one TinyLlama decoder layer (fwd+bwd) at the first shape for
the regroup's share of a 22-layer step (slow on a CPU).

Memory: peak bytes of the tensors one forward regroup allocates (the profiler's allocation and
free events; inputs not counted) at llava-next's shape with ``image_into_text`` (M = 2880
queries against every key: the largest similarity), for several ``max_similarity_elements``:
the (B, q, L) fp32 chunk is bounded by it, the rest is the (B, M, d) normalised queries and
the (B, L', d) output. Smoke: tiny shapes, one repeat.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from timing import cpu_interleaved, timed, write_json

from attanchor.anchoring import AnchorConfig, regroup

SHAPES = {  # B, M image tokens, P prompt (candidates), A answer, d
    "tinyllava": (4, 576, 60, 30, 2048),
    "llava-7b": (4, 576, 60, 30, 4096),
    "llava-next": (2, 2880, 60, 30, 4096),
}
SMOKE_SHAPES = {"smoke": (2, 16, 6, 3, 32)}
DYNAMIC = AnchorConfig(threshold=None, top_fraction=0.1)
STATIC = AnchorConfig(threshold=None, top_fraction=0.1, max_anchors=16, static_shape=True)


def inputs(B: int, M: int, P: int, A: int, d: int, dtype: torch.dtype,
           device: torch.device) -> dict[str, Any]:
    """Rows [bos, image x M, prompt x P, answer x A], the last row 10 tokens shorter."""
    L = 1 + M + P + A
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, L - min(10, A):] = 0
    image = torch.zeros(B, L, dtype=torch.bool)
    image[:, 1:1 + M] = True
    cand = torch.zeros(B, L, dtype=torch.bool)
    cand[:, 1 + M:1 + M + P] = True
    labels = torch.full((B, L), -100)
    labels[:, 1 + M + P:] = 7
    labels[mask == 0] = -100
    embeds = torch.randn(B, L, d, generator=g).to(dtype)
    t = {"embeds": embeds, "attention_mask": mask, "image_mask": image, "candidate_mask": cand,
         "labels": labels}
    return {k: v.to(device) for k, v in t.items()}


def floor_and_regroup(x: dict[str, Any], config: AnchorConfig, repeats: int
                      ) -> dict[str, float]:
    """Fastest CPU seconds of the floor and the regroup, forward and forward+backward."""
    emb, mask = x["embeds"], x["attention_mask"]
    B, L, d = emb.shape
    out = regroup(emb, mask, x["image_mask"], x["candidate_mask"], x["labels"], config)
    rows = torch.arange(B)[:, None]
    flat = (out.origin.clamp(min=0) + rows * L).flatten()  # the output gather's index
    q = emb[x["candidate_mask"]].view(B, -1, d)  # (B, N, d) candidates
    k = emb[x["image_mask"]].view(B, -1, d)  # (B, M, d) image tokens
    leaf = emb.detach().clone().requires_grad_(True)
    # A dense upstream gradient, as the LM's would be (sum()'s is a stride-0 broadcast).
    grad = torch.randn(out.inputs_embeds.shape, dtype=emb.dtype, device=emb.device)

    def floor_fwd() -> None:
        torch.bmm(q, k.transpose(1, 2))
        emb.reshape(B * L, d).index_select(0, flat)

    def floor_bwd() -> None:
        torch.bmm(q, k.transpose(1, 2))
        leaf.reshape(B * L, d).index_select(0, flat).view(grad.shape).backward(grad)

    def reg_fwd() -> None:
        regroup(emb, mask, x["image_mask"], x["candidate_mask"], x["labels"], config)

    def reg_bwd() -> None:
        regroup(leaf, mask, x["image_mask"], x["candidate_mask"], x["labels"],
                config).inputs_embeds.backward(grad)

    return cpu_interleaved({"floor_fwd": floor_fwd, "regroup_fwd": reg_fwd,
                            "floor_fwd_bwd": floor_bwd, "regroup_fwd_bwd": reg_bwd}, repeats)


def peak_bytes(fn: Any) -> tuple[int, int]:
    """Peak and final live bytes of the CPU tensors ``fn`` allocates (the profiler's memory
    events: allocations at their op, frees as they happen), inputs not counted."""
    with torch.profiler.profile(profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        if e.name == "[memory]":
            events.append((e.time_range.start, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage > 0:
            events.append((e.time_range.start, e.self_cpu_memory_usage))
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak, live


def memory(shape: str, limits: tuple[int, ...]) -> list[dict[str, Any]]:
    """Peak bytes of one forward ``image_into_text`` regroup per ``max_similarity_elements``."""
    B, M, P, A, d = (SHAPES | SMOKE_SHAPES)[shape]
    L = 1 + M + P + A
    x = inputs(B, M, P, A, d, torch.float32, torch.device("cpu"))
    rows = []
    for static in (False, True):
        cfg = AnchorConfig(strategy="image_into_text", threshold=None, top_fraction=0.1,
                           max_anchors=16 if static else None, static_shape=static)
        for max_elements in limits:
            kept: list[Any] = []

            def run(cfg: AnchorConfig = cfg, max_elements: int = max_elements,
                    kept: list[Any] = kept) -> None:
                with torch.no_grad():
                    kept.append(regroup(x["embeds"], x["attention_mask"], x["image_mask"],
                                        x["candidate_mask"], x["labels"], cfg,
                                        max_similarity_elements=max_elements))

            peak, _ = peak_bytes(run)
            queries = L if static else M
            chunk_q = min(max(1, max_elements // (B * L)), queries)
            rows.append({"static": static, "max_similarity_elements": max_elements,
                         "chunk_bytes_bound": B * chunk_q * L * 4, "peak_bytes": peak,
                         "output_bytes": kept[0].inputs_embeds.numel() * 4,
                         "width": kept[0].inputs_embeds.shape[1]})
            kept.clear()
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CI): seconds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", action="store_true", help="also time one decoder layer")
    ap.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    repeats = 1 if args.smoke else args.repeats
    result: dict[str, Any] = {"device": str(device), "dtype": str(dtype), "threads": 1,
                              "shapes": {}, "ratios": {}, "targets": {}}
    print("regroup / floor (similarity matmul + one output gather), fastest process CPU time "
          "of interleaved rounds, 1 thread")
    print(f"{'shape':<11} {'mode':<8} {'floor fwd ms':>12} {'regroup ms':>11} {'ratio':>6} "
          f"{'floor f+b ms':>12} {'regroup ms':>11} {'ratio':>6}")
    for name, (B, M, P, A, d) in shapes.items():
        x = inputs(B, M, P, A, d, dtype, device)
        for mode, cfg in (("dynamic", DYNAMIC), ("static", STATIC)):
            t = floor_and_regroup(x, cfg, repeats)
            fwd, fb = t["regroup_fwd"] / t["floor_fwd"], t["regroup_fwd_bwd"] / t["floor_fwd_bwd"]
            result["shapes"][f"{name}/{mode}"] = {"B": B, "M": M, "P": P, "A": A, "d": d,
                                                  "cpu_s": t}
            result["ratios"][f"{name}/{mode}/fwd"] = fwd
            result["ratios"][f"{name}/{mode}/fwd_bwd"] = fb
            if mode == "dynamic":
                result["targets"][f"{name}/dynamic <= 1.5x floor"] = max(fwd, fb) <= 1.5
            print(f"{name:<11} {mode:<8} {1e3 * t['floor_fwd']:>12.2f} "
                  f"{1e3 * t['regroup_fwd']:>11.2f} {fwd:>6.2f} {1e3 * t['floor_fwd_bwd']:>12.2f} "
                  f"{1e3 * t['regroup_fwd_bwd']:>11.2f} {fb:>6.2f}")
    mem_shape = "smoke" if args.smoke else "llava-next"
    result["memory"] = {"shape": mem_shape, "strategy": "image_into_text",
                        "runs": memory(mem_shape, (2**20,) if args.smoke
                                       else (2**20, 2**24, 2**26, 2**40))}
    print(f"\npeak tensor memory of one forward regroup, {mem_shape}, image_into_text "
          "(allocated by the regroup; inputs not counted)")
    print(f"{'mode':<8} {'max_similarity_elements':>24} {'chunk bound MiB':>16} "
          f"{'output MiB':>11} {'peak MiB':>9}")
    for r in result["memory"]["runs"]:
        print(f"{'static' if r['static'] else 'dynamic':<8} {r['max_similarity_elements']:>24} "
              f"{r['chunk_bytes_bound'] / 2**20:>16.1f} {r['output_bytes'] / 2**20:>11.1f} "
              f"{r['peak_bytes'] / 2**20:>9.1f}")
    if args.layer:
        result["layer"] = layer_share(device, dtype, args.repeats)
    write_json(args.out, result)
    return result


def layer_share(device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Regroup fwd+bwd as a share of one TinyLlama decoder layer's fwd+bwd (tinyllava shape)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    B, M, P, A, d = SHAPES["tinyllava"]
    x = inputs(B, M, P, A, d, dtype, device)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, num_hidden_layers=22, vocab_size=32000,
                      attn_implementation="sdpa")
    leaf = x["embeds"].clone().requires_grad_(True)
    out = regroup(leaf, x["attention_mask"], x["image_mask"], x["candidate_mask"], x["labels"],
                  DYNAMIC)
    Lp = out.inputs_embeds.shape[1]
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device=device, dtype=dtype)
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    hidden = torch.randn(B, Lp, d, device=device, dtype=dtype, requires_grad=True)
    causal = torch.full((Lp, Lp), float("-inf"), device=device, dtype=dtype).triu(1)[None, None]

    def run_layer() -> None:
        y = layer(hidden, attention_mask=causal, position_ids=out.position_ids,
                  position_embeddings=rotary(hidden, out.position_ids))
        (y[0] if isinstance(y, tuple) else y).float().sum().backward()

    def run_regroup() -> None:
        regroup(leaf, x["attention_mask"], x["image_mask"], x["candidate_mask"], x["labels"],
                DYNAMIC).inputs_embeds.float().sum().backward()

    t_layer, t_reg = timed(run_layer, device, 2), timed(run_regroup, device, repeats)
    share = {"regroup_ms": 1e3 * t_reg, "layer_ms": 1e3 * t_layer,
             "share_of_22_layer_step": t_reg / (22 * t_layer)}
    print(f"regroup fwd+bwd {share['regroup_ms']:.2f} ms, one decoder layer "
          f"{share['layer_ms']:.1f} ms: {100 * share['share_of_22_layer_step']:.3f} % of a "
          "22-layer step (target < 0.5 %)")
    return share


if __name__ == "__main__":
    main(sys.argv[1:])
