"""Regroup cost next to a training step, at the paper's TinyLLaVA shapes, measured in one run.

    python bench/regroup.py [--device cpu|cuda] [--repeats 5]

Shapes: B=4, M=576 image tokens (CLIP ViT-L/14-336), ~60 prompt tokens (candidates), a 30-token
answer, d=2048 (TinyLlama-1.1B: 22 decoder layers, 32 heads, 4 KV heads, MLP 5632). Prints the
median regroup time (forward, and forward + backward through the gather), the median
forward+backward time of ONE decoder layer, and regroup as a fraction of a 22-layer step
(22 x one layer; the embedding, LM head and vision tower are left out, which makes the ratio
pessimistic). Target: regroup under 0.5% of the step.
"""

from __future__ import annotations

import argparse

import torch
from timing import timed
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from attanchor.anchoring import AnchorConfig, regroup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--image-tokens", type=int, default=576)
    ap.add_argument("--prompt-tokens", type=int, default=60)
    ap.add_argument("--answer-tokens", type=int, default=30)
    ap.add_argument("--layers", type=int, default=22)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, num_hidden_layers=args.layers, vocab_size=32000,
                      attn_implementation="sdpa")
    B, M, P, A = args.batch, args.image_tokens, args.prompt_tokens, args.answer_tokens
    L = 1 + M + P + A
    # Baseline rows: [bos, image x M, prompt x P, answer x A], the last row 10 tokens shorter.
    attention_mask = torch.ones(B, L, dtype=torch.long, device=device)
    attention_mask[-1, L - 10:] = 0
    image_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    image_mask[:, 1:1 + M] = True
    candidate_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    candidate_mask[:, 1 + M:1 + M + P] = True
    labels = torch.full((B, L), -100, device=device)
    labels[:, 1 + M + P:] = 7
    labels[attention_mask == 0] = -100
    embeds = torch.randn(B, L, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    # top_fraction 0.1: the paper's ~10% of prompt tokens become anchors, independent of tau.
    config = AnchorConfig(threshold=None, top_fraction=0.1)

    def run_regroup():
        return regroup(embeds, attention_mask, image_mask, candidate_mask, labels, config)

    def run_regroup_backward():
        run_regroup().inputs_embeds.float().sum().backward()

    out = run_regroup()
    Lp = out.inputs_embeds.shape[1]
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device=device, dtype=dtype)
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    hidden = torch.randn(B, Lp, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    pos = out.position_ids
    # Causal attention (the LM's own); padding keys are a negligible part of the cost.
    causal = torch.full((Lp, Lp), float("-inf"), device=device, dtype=dtype).triu(1)[None, None]

    def run_layer():
        cos_sin = rotary(hidden, pos)
        y = layer(hidden, attention_mask=causal, position_ids=pos, position_embeddings=cos_sin)
        y = y[0] if isinstance(y, tuple) else y
        y.float().sum().backward()

    t_regroup = timed(run_regroup, device, args.repeats)
    t_regroup_bw = timed(run_regroup_backward, device, args.repeats)
    t_layer = timed(run_layer, device, max(2, args.repeats // 2))
    t_step = args.layers * t_layer
    print(f"device {device} dtype {dtype}; B={B} M={M} prompt={P} answer={A} L={L} -> L'={Lp} "
          f"(anchors per row {out.num_anchors.tolist()})")
    print(f"regroup forward            : {t_regroup * 1e3:9.3f} ms")
    print(f"regroup forward + backward : {t_regroup_bw * 1e3:9.3f} ms")
    print(f"one decoder layer fwd+bwd  : {t_layer * 1e3:9.3f} ms")
    print(f"{args.layers}-layer step (estimate) : {t_step * 1e3:9.3f} ms")
    print(f"regroup / one layer        : {100 * t_regroup_bw / t_layer:9.3f} %")
    print(f"regroup / {args.layers}-layer step     : {100 * t_regroup_bw / t_step:9.3f} %   "
          "(target < 0.5 %)")


if __name__ == "__main__":
    main()
