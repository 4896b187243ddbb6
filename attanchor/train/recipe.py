"""Recipes: YAML files with one optional ``extends`` key, resolved before LightningCLI parses.

A baseline recipe differs from its anchored twin only in the anchor block, so both extend a
shared base and carry just that block::

    # recipes/demo/baseline.yaml
    extends: base.yaml
    model:
      anchor: {strategy: none}

``extends`` paths are relative to the file that names them; mappings merge key by key (the
extending file wins), every other value is replaced whole. Loading is ``yaml.safe_load`` only.

The recipes ship inside the package: the top-level ``recipes/`` folder of a checkout is the
source of truth, and a built wheel carries a copy as ``attanchor/recipes/`` (package data, see
pyproject.toml). ``recipes_dir()`` finds whichever this installation has; a recipe's *name* is
its path under that directory without the suffix (``demo/anchored``), and ``--config NAME``
resolves to it when no file of that name exists.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

EXTENDS = "extends"
RECIPE_SUFFIXES = (".yaml", ".yml")
# What a recipe name may look like: path segments of word characters, dots and dashes. A YAML
# string given to --config (LightningCLI accepts one) has a colon or a brace, so never matches.
_NAME = re.compile(r"[\w.-]+(/[\w.-]+)*")
_PACKAGE = Path(__file__).resolve().parents[1]  # .../attanchor


def recipes_dir() -> Path:
    """The directory holding the shipped recipes, for a wheel install and a checkout alike.

    A wheel has them at ``attanchor/recipes/`` (package data); a source checkout, installed
    editable or not at all, has the top-level ``recipes/`` beside ``attanchor/`` (recognised by
    the pyproject.toml next to it, so a stray ``recipes/`` folder in site-packages is not taken).
    """
    shipped = _PACKAGE / "recipes"
    if shipped.is_dir():
        return shipped
    checkout = _PACKAGE.parent
    if (checkout / "recipes").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "recipes"
    raise FileNotFoundError(
        f"recipes: neither {shipped} (a wheel install) nor {checkout / 'recipes'} (a source "
        "checkout) exists; reinstall attanchor (`pip install attanchor`) or run from a checkout")


def recipe_names(root: Path | None = None) -> list[str]:
    """Every recipe under ``root`` (default: the shipped ones) by name, sorted:
    ``demo/anchored`` for ``<root>/demo/anchored.yaml``."""
    root = recipes_dir() if root is None else root
    return sorted(str(p.relative_to(root).with_suffix("").as_posix())
                  for p in root.rglob("*") if p.suffix in RECIPE_SUFFIXES and p.is_file())


def find_recipe(name: str, root: Path | None = None) -> Path:
    """The recipe called ``name`` (``demo/anchored``, ``.yaml`` optional) under ``root``
    (default: the shipped recipes).

    Raises ValueError naming the closest names when there is none.
    """
    root = recipes_dir() if root is None else root
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in RECIPE_SUFFIXES else name
    for suffix in RECIPE_SUFFIXES:
        path = root / f"{stem}{suffix}"
        if path.is_file() and path.resolve().is_relative_to(root.resolve()):
            return path
    names = recipe_names(root)
    close = difflib.get_close_matches(stem, names, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else f"shipped: {', '.join(names)}"
    raise ValueError(f"recipe: {name!r} is neither a file nor a shipped recipe ({hint}); "
                     "`attanchor recipes list` lists them all")


def _load_chain(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(resolved path, its mapping without 'extends')`` for ``path`` and every file it
    ``extends``, transitively, child first. Each file is read once.

    Raises ValueError for a cycle, a missing file, a file that is not a mapping, or an
    ``extends`` that is not one relative path.
    """
    chain: list[tuple[Path, dict[str, Any]]] = []
    current: Path | None = Path(path).resolve()
    while current is not None:
        seen = [p for p, _ in chain]
        if current in seen:
            cycle = " -> ".join(str(p) for p in (*seen, current))
            raise ValueError(f"recipe: 'extends' cycle: {cycle}")
        if not current.is_file():
            raise ValueError(f"recipe: {current} does not exist")
        data = yaml.safe_load(current.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"recipe: {current} must hold a mapping, got {type(data).__name__}")
        parent = data.pop(EXTENDS, None)
        if parent is not None and not isinstance(parent, str):
            raise ValueError(f"recipe: {current}: 'extends' must be one relative path")
        chain.append((current, data))
        current = None if parent is None else (current.parent / parent).resolve()
    return chain


def extends_chain(path: str | Path) -> list[Path]:
    """``path`` and every file it ``extends``, transitively, child first (resolved paths).

    Raises ValueError as resolve_recipe does (cycle, missing file, non-mapping, bad extends).
    """
    return [p for p, _ in _load_chain(path)]


def describe_recipe(path: str | Path, width: int = 100) -> str:
    """A one-line description: the first sentence of the recipe's leading comment block (cut
    to ``width`` characters); for a recipe without one, what it extends and its own anchor
    strategy (``extends base.yaml; anchor none``)."""
    text = Path(path).read_text()
    comment: list[str] = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            if comment or line.strip():
                break
            continue
        comment.append(line.lstrip().lstrip("#").strip())
    if comment:
        joined = " ".join(part for part in comment if part)
        sentence = re.split(r"(?<=\.)\s", joined, maxsplit=1)[0]
        return sentence if len(sentence) <= width else sentence[: width - 3].rstrip() + "..."
    data = yaml.safe_load(text) or {}
    data = data if isinstance(data, dict) else {}
    parts = [f"extends {data[EXTENDS]}"] if isinstance(data.get(EXTENDS), str) else []
    model = data.get("model")
    anchor = model.get("anchor") if isinstance(model, dict) else None
    if isinstance(anchor, dict) and "strategy" in anchor:
        parts.append(f"anchor {anchor['strategy']}")
    return "; ".join(parts)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``: dicts recursively, anything else replaced.

    >>> deep_merge({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"y": 3}})
    {'a': {'x': 1, 'y': 3}, 'b': 1}
    """
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_recipe(path: str | Path) -> dict[str, Any]:
    """Load a recipe and everything it extends into one mapping (a child overrides its parent,
    ``deep_merge``).

    ``path`` may also be a shipped recipe's name (``demo/anchored``) when no such file exists;
    ``extends`` targets are always paths. Raises ValueError for a cycle, a missing file or
    unknown name, or a file that is not a mapping.
    """
    if not Path(path).is_file():
        path = find_recipe(str(path))
    merged: dict[str, Any] = {}
    for _, data in reversed(_load_chain(path)):  # the root first, each child over it
        merged = deep_merge(merged, data)
    return merged


def expand_config_args(argv: list[str]) -> list[str]:
    """Replace each ``--config PATH|NAME`` with the resolved recipe as a YAML string.

    LightningCLI's ``--config`` accepts a path or a YAML string; passing the resolved string
    keeps ``extends`` out of jsonargparse, which then validates every key of the merged recipe.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--config" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        path = config_path(value)
        if path is not None:
            value = yaml.safe_dump(resolve_recipe(path), sort_keys=False)
        out += ["--config", value]
    return out


def config_path(value: str) -> Path | None:
    """The recipe file a ``--config`` value names, or None for a YAML string.

    An existing ``.yaml``/``.yml`` file wins (any other existing file gives None: it goes to
    LightningCLI as it is); otherwise a value shaped like a name or a YAML path
    (``demo/anchored``, ``demo/anchored.yaml``) is looked up among the shipped recipes, and
    raises ValueError (with close names) when it is not one.
    """
    path = Path(value)
    if path.is_file():  # another file (a .json config) goes to LightningCLI untouched
        return path if path.suffix in RECIPE_SUFFIXES else None
    if path.suffix in RECIPE_SUFFIXES or _NAME.fullmatch(value):
        return find_recipe(value)
    return None
