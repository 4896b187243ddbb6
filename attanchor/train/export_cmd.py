"""`attanchor export --checkpoint C --out DIR [--merge]`: a training checkpoint (Lightning .ckpt
or a DeepSpeed ZeRO checkpoint directory) to a Hugging Face model directory that transformers
and peft load as they are, with ``anchor_config.json`` beside it."""

from __future__ import annotations

import argparse
import sys

from attanchor.train.checkpoint import load_module, render_settings_of, write_export_source
from attanchor.train.export import export_model, load_processor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="attanchor export", description=__doc__)
    ap.add_argument("--checkpoint", required=True, help=".ckpt file or ZeRO checkpoint dir")
    ap.add_argument("--out", required=True, help="directory to write")
    ap.add_argument("--merge", action="store_true",
                    help="merge LoRA adapters into the weights (default: save the adapter)")
    ap.add_argument("--model-path", default=None,
                    help="base model, if it moved since training (default: the recorded one)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    module = load_module(args.checkpoint, model_path=args.model_path)
    out = export_model(module.hf_model, args.out, merge=args.merge,
                       anchor_config=module.anchor_config,
                       processor=load_processor(module.model_path),
                       dtype=args.dtype, overwrite=args.overwrite,
                       render=render_settings_of(args.checkpoint))
    write_export_source(out, args.checkpoint)  # evaluation refuses it once that is rewritten
    print(f"exported {args.checkpoint} -> {out}")
    return 0
