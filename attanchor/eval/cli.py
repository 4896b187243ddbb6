"""`attanchor eval | compare | demo | calibrate | visualize`: argparse front ends.

Each command's work lives in a module of its own (evaluate, compare, demo, calibrate,
visualize); this file only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attanchor.anchoring import STRATEGIES, AnchorConfig, AnchoredVLM
from attanchor.data.render import SCOPES
from attanchor.data.templates import NAMED_TEMPLATES

OWN_TEMPLATE = "model"  # --template model: the tokenizer's own chat template


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def _anchor_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("anchor overrides (default: the config stored with the weights)")
    g.add_argument("--anchor.strategy", dest="a_strategy", choices=STRATEGIES)
    g.add_argument("--anchor.threshold", dest="a_threshold", type=float)
    g.add_argument("--anchor.top_fraction", dest="a_top_fraction", type=float)
    g.add_argument("--anchor.max_anchors", dest="a_max_anchors", type=int)
    g.add_argument("--anchor.seed", dest="a_seed", type=int)


def _anchor_config(args: argparse.Namespace, stored: AnchorConfig) -> AnchorConfig | None:
    fields = {k[2:]: v for k, v in vars(args).items() if k.startswith("a_") and v is not None}
    if not fields:
        return None
    merged = {**stored.to_dict(), **fields}
    if "top_fraction" in fields and "threshold" not in fields:
        merged["threshold"] = None
    if "threshold" in fields and "top_fraction" not in fields:
        merged["top_fraction"] = None
    return AnchorConfig.from_dict(merged)


PAUSE_TOKENS = 4  # the image_into_text arm's pause tokens ("think mode") unless told


def _strategies(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategies", type=_csv(str), default=["none", "text_into_image", "random"],
                   help=f"comma-separated arms among {', '.join(STRATEGIES)}; e.g. add "
                        "image_into_text (the paper's variant, with --pause-tokens) or append "
                        "(control: the copies all after the image)")
    p.add_argument("--pause-tokens", type=int, default=PAUSE_TOKENS,
                   help="pause tokens of the image_into_text arm (the paper's think mode; "
                        "every other arm gets 0)")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (the local accelerator: cuda:LOCAL_RANK when CUDA is available, "
                        "else cpu) | cpu | cuda | cuda:K; the model keeps its dtype")


def _render(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rendering (default: what the run trained with, stored in the "
                             "checkpoint / export)")
    g.add_argument("--template", default=None, choices=[*sorted(NAMED_TEMPLATES), OWN_TEMPLATE],
                   help=f"a named chat template, or {OWN_TEMPLATE!r} for the model's own")
    g.add_argument("--scope", default=None, choices=SCOPES, help="candidate scope")


def render_overrides(args: argparse.Namespace) -> dict:
    """``load_anchored`` keyword overrides from --template / --scope (absent: stored ones)."""
    out: dict = {}
    if args.template is not None:
        out["template"] = None if args.template == OWN_TEMPLATE else args.template
    if args.scope is not None:
        out["scope"] = args.scope
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attanchor")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="anchored generation + POPE/VQA metrics on a checkpoint")
    p.add_argument("--checkpoint", required=True, help=".ckpt, ZeRO dir or exported HF dir")
    p.add_argument("--data", required=True)
    p.add_argument("--task", required=True, choices=("pope", "vqa"))
    p.add_argument("--image-root", required=True)
    p.add_argument("--out", default=None, help="default: <checkpoint dir>/../eval/<task>")
    p.add_argument("--format", default=None, choices=("llava", "messages"),
                   help="VQA file format (default: the run's data.format)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--limit", type=int, default=None)
    _device(p)
    _render(p)
    _anchor_overrides(p)

    p = sub.add_parser("compare", help="paired seeded runs of several strategies + a report")
    p.add_argument("--config", required=True, help="the recipe every arm trains from")
    p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
    _strategies(p)
    p.add_argument("--reference", default=None,
                   help="the checkpoint the arms adapt (.ckpt or export dir), evaluated "
                        "unadapted as the 'pretrained' row, every arm compared against it too")
    p.add_argument("--pope", default=None, help="POPE JSONL to evaluate on")
    p.add_argument("--vqa", default=None, help="LLaVA JSON of open questions to evaluate on")
    p.add_argument("--image-root", default=None, help="default: the recipe's data.image_root")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N items")
    p.add_argument("--out", default=None, help="default: <run.root>/<run.name>/")
    _device(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="extra `attanchor fit` arguments after --, e.g. -- --trainer.max_steps 50")

    p = sub.add_parser("demo", help="the built-in scenes comparison (pre-train, then LoRA-adapt "
                       "on other question kinds), end to end on a CPU")
    p.add_argument("--workdir", default=".", help="where data/, models/ and runs/ go")
    p.add_argument("--seeds", type=_csv(int), default=[0, 1])
    _strategies(p)
    # Defaults (None) are demo.py's PRETRAIN_STEPS / ADAPT_STEPS / EVAL_LIMIT; tiny values make
    # a smoke run (tests/test_install.py runs 2 / 2 / 4).
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="steps of the baseline pre-training (default: the demo's, see README)")
    p.add_argument("--adapt-steps", type=int, default=None,
                   help="LoRA adaptation steps of every arm (default: the demo's)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate each arm on the first N questions (default: the demo's)")
    p.add_argument("--pretrain-kinds", type=_csv(str), default=None,
                   help="question kinds of the pre-training stage (default: exist,size,relation,"
                        "count; kinds: exist,color,shape,size,relation,count)")
    p.add_argument("--adapt-kinds", type=_csv(str), default=None,
                   help="question kinds of the adaptation stage, evaluated as vqa (default: "
                        "color,shape)")

    p = sub.add_parser("calibrate", help="best-match similarity histogram + tau for a fraction")
    p.add_argument("--config", required=True)
    p.add_argument("--target-fraction", type=float, default=0.1)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--out", default=None, help="PNG path (default: <run dir>/calibrate.png)")
    _device(p)

    p = sub.add_parser("visualize", help="draw anchored words on their image patches")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=16)
    _device(p)
    _render(p)
    _anchor_overrides(p)
    return ap


def _eval(args: argparse.Namespace) -> int:
    from attanchor.eval.device import resolve_device
    from attanchor.eval.evaluate import evaluate
    from attanchor.eval.ranks import eval_world
    from attanchor.train.checkpoint import load_anchored

    device = resolve_device(args.device)  # before loading: a bad --device fails at once
    rank, _ = eval_world()
    loaded = load_anchored(args.checkpoint, device=device, **render_overrides(args))
    anchored, render = loaded.anchored, loaded.render
    override = _anchor_config(args, anchored.config)
    if override is not None:  # the same weights, regrouped another way
        anchored = AnchoredVLM(anchored.model, override).eval()
    out = args.out or Path(args.checkpoint).resolve().parent.parent / "eval" / args.task
    metrics = evaluate(anchored, loaded.processor, args.data, args.task,
                       image_root=args.image_root, out_dir=out, template=render.template,
                       scope=render.scope, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, limit=args.limit,
                       format=args.format or render.format)
    if rank == 0:
        print(json.dumps(metrics, indent=2))
        template = render.template or "the model's own"
        print(f"predictions and metrics: {out} (template {template}, scope {render.scope}, "
              f"device {device})")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from attanchor.eval.compare import compare

    evals = {k: v for k, v in (("pope", args.pope), ("vqa", args.vqa)) if v}
    if not evals:
        print("attanchor compare: give --pope FILE and/or --vqa FILE to evaluate on",
              file=sys.stderr)
        return 2
    overrides = [a for a in args.overrides if a != "--"]
    bad = [x for x in args.strategies if x not in STRATEGIES]
    if bad:
        print(f"attanchor compare: unknown strategies {bad}; choose among {list(STRATEGIES)}",
              file=sys.stderr)
        return 2
    res = compare(args.config, seeds=args.seeds, strategies=args.strategies, evals=evals,
                  image_root=args.image_root, overrides=overrides, limit=args.limit,
                  out_dir=args.out, device=args.device, reference=args.reference,
                  pause_tokens=args.pause_tokens)
    if res["rank"] == 0:
        print(res["table"])
        print(f"report: {res['paths']['report_md']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "eval":
        return _eval(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "demo":
        from attanchor.eval.demo import run_demo

        return run_demo(workdir=args.workdir, seeds=args.seeds, strategies=args.strategies,
                        pretrain_steps=args.pretrain_steps, adapt_steps=args.adapt_steps,
                        eval_limit=args.eval_limit, pause_tokens=args.pause_tokens,
                        pretrain_kinds=args.pretrain_kinds, adapt_kinds=args.adapt_kinds)
    if args.command == "calibrate":
        from attanchor.eval.calibrate_run import run_calibrate

        return run_calibrate(args.config, target_fraction=args.target_fraction,
                             batches=args.batches, out_png=args.out, device=args.device)
    from attanchor.eval.visualize_run import run_visualize

    return run_visualize(args.checkpoint, args.image, args.prompt, args.out,
                         max_new_tokens=args.max_new_tokens, device=args.device,
                         anchor_override=lambda stored: _anchor_config(args, stored),
                         **render_overrides(args))
