"""``attanchor data validate | prepare | show | split``.

- ``validate --data PATH --image-root DIR [--format llava|messages] [--model PATH]``: checks
  every record (with ``--model``, also the template mapping and ``--max-length``), prints the
  counts and every bad record as ``id<TAB>reason``; exit 1 if any record is bad. Every image
  is fully decoded under ``--max-image-pixels`` (default 50 MP): a decompression bomb, a
  truncated or unreadable file is one more named bad record, never a crash.
- ``prepare easy-vqa --out DIR``: writes the built-in easy-vqa world (LLaVA JSON + POPE file).
- ``prepare scenes --out DIR [--n-train N --n-val N --n-test N --image-size PX]``: draws the
  procedural multi-object scenes world (existence, attribute, relation and counting questions;
  POPE with random / popular / adversarial negatives); ``--vocab-model DIR`` also builds a tiny
  LLaVA whose tokenizer covers the world's words.
- ``show --data PATH --index I --model PATH``: one rendered sample, token by token, with its
  label (L) and candidate (C) flags, so anyone can see which tokens are trained on.
- ``split --data FILE --val-fraction F --out DIR``: writes ``DIR/train.<ext>`` and
  ``DIR/val.<ext>`` (the input's .json or .jsonl), split by record-id hash exactly as
  ``data.val_fraction=F`` splits ``FILE`` in memory; prints the counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from attanchor.data.formats import (
    DEFAULT_MAX_IMAGE_PIXELS,
    FORMATS,
    BadRecordError,
    read_records,
    set_max_image_pixels,
)
from attanchor.data.render import KINDS, SCOPES
from attanchor.data.templates import NAMED_TEMPLATES


def _template(value: str) -> str | None:
    if value in ("none", "own", ""):
        return None
    if value not in NAMED_TEMPLATES:
        raise argparse.ArgumentTypeError(f"{value!r}: use 'own' or one of {sorted(NAMED_TEMPLATES)}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attanchor data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, model_required: bool) -> None:
        sp.add_argument("--data", required=True, help="a .json or .jsonl data file")
        sp.add_argument("--image-root", default=None,
                        help="folder the image paths are relative to (default: the data's folder)")
        sp.add_argument("--format", choices=FORMATS, default="llava")
        sp.add_argument("--model", required=model_required, default=None,
                        help="model folder with the processor (tokenizer + image processor)")
        sp.add_argument("--template", type=_template, default=None,
                        help=f"'own' (the model's chat template, default) or one of "
                             f"{sorted(NAMED_TEMPLATES)}")
        sp.add_argument("--max-length", type=int, default=2048)
        sp.add_argument("--scope", choices=SCOPES, default="image_turn")
        sp.add_argument("--generation", action="store_true",
                        help="render prompts as for generation (no answer, no labels)")

    v = sub.add_parser("validate", help="check every record; exit 1 if any is bad")
    common(v, model_required=False)
    v.add_argument("--rejects", default=None, help="also write the bad records here (JSONL)")
    v.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="images with more pixels (width x height) are bad records, as with "
                        f"data.max_image_pixels in training (default {DEFAULT_MAX_IMAGE_PIXELS:,})")
    pr = sub.add_parser("prepare", help="write a built-in data set")
    pr.add_argument("name", choices=["easy-vqa", "scenes"])
    pr.add_argument("--out", required=True)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--val-fraction", type=float, default=0.1, help="easy-vqa")
    pr.add_argument("--max-train-images", type=int, default=None, help="easy-vqa")
    pr.add_argument("--max-test-images", type=int, default=None, help="easy-vqa")
    pr.add_argument("--overwrite", action="store_true", help="easy-vqa")
    pr.add_argument("--n-train", type=int, default=3000, help="scenes: train images")
    pr.add_argument("--n-val", type=int, default=300, help="scenes: validation images")
    pr.add_argument("--n-test", type=int, default=500, help="scenes: test images")
    pr.add_argument("--image-size", type=int, default=64, help="scenes: pixels per side")
    pr.add_argument("--vocab-model", default=None,
                    help="scenes: also build a tiny LLaVA here whose tokenizer knows the words")
    s = sub.add_parser("show", help="print one rendered sample with its label/candidate masks")
    common(s, model_required=True)
    s.add_argument("--index", type=int, required=True, help="record number in the file (0-based)")
    s.add_argument("--full", action="store_true", help="one row per image token, not one per image")
    sp = sub.add_parser("split", help="hold out a validation file, by record-id hash")
    sp.add_argument("--data", required=True, help="a .json or .jsonl data file with record ids")
    sp.add_argument("--val-fraction", type=float, required=True,
                    help="fraction held out (0 < F < 1); the same records as data.val_fraction")
    sp.add_argument("--out", required=True, help="folder for train.<ext> and val.<ext>")
    sp.add_argument("--overwrite", action="store_true")
    return p


def _processor(path: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, trust_remote_code=False)


def _validate(args: argparse.Namespace) -> int:
    from attanchor.data.records import index_records
    from attanchor.data.render import Renderer

    root = args.image_root or str(Path(args.data).parent)
    try:
        set_max_image_pixels(args.max_image_pixels)  # every image is decoded under this limit
    except ValueError as e:
        print(f"error: --max-image-pixels: {e}", file=sys.stderr)
        return 2
    renderer = None
    if args.model:
        renderer = Renderer(_processor(args.model), template=args.template, scope=args.scope,
                            max_length=args.max_length, image_root=root)
    try:
        index, bad, total = index_records(args.data, format=args.format, image_root=root,
                                          renderer=renderer, for_generation=args.generation)
    except (BadRecordError, FileNotFoundError) as e:  # a file that cannot be read at all
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.data}: {total} records, {len(index)} good, {len(bad)} bad"
          + ("" if renderer else " (format and images only; add --model to check rendering)"))
    for e in bad:
        print(f"{e.record_id}\t{e.reason}")
    if args.rejects:
        with open(args.rejects, "w", encoding="utf-8") as f:
            for e in bad:
                f.write(json.dumps({"file": args.data, "id": e.record_id, "reason": e.reason})
                        + "\n")
    return 1 if bad else 0


def _prepare(args: argparse.Namespace) -> int:
    if args.name == "scenes":
        return _prepare_scenes(args)
    from attanchor.data.easyvqa import prepare_easy_vqa

    info = prepare_easy_vqa(args.out, val_fraction=args.val_fraction, seed=args.seed,
                            max_train_images=args.max_train_images,
                            max_test_images=args.max_test_images, overwrite=args.overwrite,
                            progress=False)
    print(json.dumps(info, indent=2, sort_keys=True, default=str))
    return 0


def _prepare_scenes(args: argparse.Namespace) -> int:
    from attanchor.data.scenes import prepare_scenes, scenes_vocab

    info = prepare_scenes(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                          image_size=args.image_size, seed=args.seed, progress=False)
    print(json.dumps(info, indent=2, sort_keys=True))
    if args.vocab_model:
        from attanchor.data.tiny import build_tiny_llava

        build_tiny_llava(args.vocab_model, vocab=scenes_vocab(), seed=args.seed,
                         image_size=args.image_size)
        print(f"tiny LLaVA for the scenes vocabulary: {args.vocab_model}")
    return 0


def format_sample(tokens: list[str], input_ids: list[int], labels: list[int],
                  candidates: list[bool], kinds: list[int], full: bool = False) -> str:
    """A column table, one row per token: position, id, token, kind, L (label), C (candidate).
    Runs of image tokens fold into one row unless ``full``."""
    rows = [f"{'pos':>5} {'id':>6}  {'token':<20} {'kind':<9} L C"]
    i, n = 0, len(input_ids)
    while i < n:
        j = i + 1
        if not full and KINDS[kinds[i]] == "image":
            while j < n and KINDS[kinds[j]] == "image" and input_ids[j] == input_ids[i]:
                j += 1
        tok = tokens[i] if j == i + 1 else f"{tokens[i]} x{j - i}"
        pos = f"{i}" if j == i + 1 else f"{i}-{j - 1}"
        lab = "L" if labels[i] != -100 else "."
        cand = "C" if candidates[i] else "."
        rows.append(f"{pos:>5} {input_ids[i]:>6}  {tok!s:<20} {KINDS[kinds[i]]:<9} {lab} {cand}")
        i = j
    n_lab = sum(x != -100 for x in labels)
    rows.append(f"{n} tokens, {n_lab} labelled (L), {sum(candidates)} candidates (C)")
    return "\n".join(rows)


def _show(args: argparse.Namespace) -> int:
    from attanchor.data.render import Renderer

    root = args.image_root or str(Path(args.data).parent)
    conv = None
    for i, item in enumerate(read_records(args.data, args.format,
                                          require_answer=not args.generation, errors="yield")):
        if i == args.index:
            conv = item
            break
    if conv is None:
        print(f"error: {args.data} has no record {args.index}", file=sys.stderr)
        return 1
    try:
        if isinstance(conv, BadRecordError):
            raise conv
        renderer = Renderer(_processor(args.model), template=args.template, scope=args.scope,
                            max_length=args.max_length, image_root=root)
        _, counts = renderer.images(conv)
        tr = renderer.render_text(conv, counts, for_generation=args.generation)
    except BadRecordError as e:
        print(f"bad record: {e}", file=sys.stderr)
        return 1
    ids = tr.input_ids.tolist()
    tokens = renderer.tokenizer.convert_ids_to_tokens(ids)
    print(f"record {conv.id} ({args.data} #{args.index}), template "
          f"{args.template or 'own'}, scope {args.scope}, images {conv.images}")
    print(format_sample(tokens, ids, tr.labels.tolist(), tr.candidate_mask.tolist(),
                        tr.kinds.tolist(), full=args.full))
    return 0


def _split(args: argparse.Namespace) -> int:
    from attanchor.data.split import write_split

    try:
        info = write_split(args.data, args.val_fraction, args.out, overwrite=args.overwrite)
    except (BadRecordError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = info["train"] + info["val"]
    print(f"{args.data}: {total} records -> {info['train']} train ({info['train_file']}), "
          f"{info['val']} val ({info['val_file']})")
    src, out = Path(args.data).resolve().parent, Path(args.out).resolve()
    if src != out:  # the data module's default image root is each data file's folder
        print(f"note: image paths stay relative to {src}; give image_root={src} "
              "(or --image-root) when you use the new files")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``attanchor data ...``; returns the exit code."""
    args = _parser().parse_args(argv)
    return {"validate": _validate, "prepare": _prepare, "show": _show,
            "split": _split}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
