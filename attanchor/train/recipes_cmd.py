"""`attanchor recipes list | copy NAME DIR`: the recipes shipped inside the package.

As torchtune's ``tune ls`` / ``tune cp``: ``list`` prints every recipe's name with a one-line
description; ``copy`` writes a recipe and every file it ``extends`` (transitively) into a
directory of your own, so you edit a copy rather than the installed package. The copies keep
their layout relative to each other, so each ``extends: base.yaml`` (or ``../x/base.yaml``)
still names the copied parent, and ``attanchor fit --config DIR/NAME.yaml`` runs the copy.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from attanchor.train.recipe import (
    describe_recipe,
    extends_chain,
    find_recipe,
    recipe_names,
    recipes_dir,
)


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of every shipped recipe, sorted by name."""
    return [(name, describe_recipe(find_recipe(name), width=72)) for name in recipe_names()]


def copy_plan(name: str, dest: str | Path, root: Path | None = None) -> list[tuple[Path, Path]]:
    """(source, target) pairs for copying recipe ``name`` (under ``root``, default the shipped
    recipes) and its ``extends`` chain to ``dest``, the named recipe first.

    Targets keep the sources' paths relative to their deepest common directory, so relative
    ``extends`` values stay valid. Raises ValueError for an unknown name or a chain that leaves
    the recipes directory.
    """
    root = (recipes_dir() if root is None else root).resolve()
    chain = extends_chain(find_recipe(name, root))
    for path in chain:
        if not path.is_relative_to(root):
            raise ValueError(f"recipes: {path} (extended by {name!r}) is outside {root}")
    common = Path(*_common_parts([p.parent.parts for p in chain]))
    dest = Path(dest)
    return [(p, dest / p.relative_to(common)) for p in chain]


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    out: list[str] = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        out.append(column[0])
    return tuple(out)


def copy_recipe(name: str, dest: str | Path, force: bool = False,
                root: Path | None = None) -> list[Path]:
    """Copy recipe ``name`` and everything it extends into ``dest``; return the targets, the
    named recipe first. Refuses (FileExistsError naming every clash, nothing written) to
    overwrite an existing file unless ``force``."""
    plan = copy_plan(name, dest, root)
    clashes = [target for _, target in plan if target.exists()]
    if clashes and not force:
        raise FileExistsError("recipes: would overwrite " + ", ".join(map(str, clashes)) +
                              "; pass --force to overwrite or choose another directory")
    for source, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return [target for _, target in plan]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attanchor recipes", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every shipped recipe with a one-line description")
    c = sub.add_parser("copy", help="copy a recipe and the files it extends into DIR")
    c.add_argument("name", help="a name from `attanchor recipes list`, e.g. demo/anchored")
    c.add_argument("dir", help="destination directory (created if missing)")
    c.add_argument("--force", action="store_true", help="overwrite existing files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.action == "list":
        rows = list_recipes()
        width = max(len(name) for name, _ in rows)
        print(f"recipes shipped in {recipes_dir()} (use one as --config NAME, or "
              "`attanchor recipes copy NAME DIR` to edit a copy):")
        for name, description in rows:
            print(f"  {name:<{width}}  {description}".rstrip())
        return 0
    try:
        targets = copy_recipe(args.name, args.dir, force=args.force)
    except (ValueError, FileExistsError) as err:
        print(f"attanchor {err}", file=sys.stderr)
        return 1
    for target in targets:
        print(f"wrote {target}")
    print(f"run it with: attanchor fit --config {targets[0]}")
    return 0
