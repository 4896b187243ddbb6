"""Recipes: YAML files with one optional ``extends`` key, resolved before LightningCLI parses.

A baseline recipe differs from its anchored twin only in the anchor block, so both extend a
shared base and carry just that block::

    # recipes/demo/baseline.yaml
    extends: base.yaml
    model:
      anchor: {strategy: none}

``extends`` paths are relative to the file that names them; mappings merge key by key (the
extending file wins), every other value is replaced whole. Loading is ``yaml.safe_load`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

EXTENDS = "extends"


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


def resolve_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a recipe and everything it extends into one mapping.

    Raises ValueError for a cycle, a missing file, or a file that is not a mapping.
    """
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ValueError(f"recipe: 'extends' cycle: {chain}")
    if not path.is_file():
        raise ValueError(f"recipe: {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe: {path} must hold a mapping, got {type(data).__name__}")
    parent = data.pop(EXTENDS, None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ValueError(f"recipe: {path}: 'extends' must be one relative path")
    return deep_merge(resolve_recipe(path.parent / parent, (*_seen, path)), data)


def expand_config_args(argv: list[str]) -> list[str]:
    """Replace each ``--config PATH`` with the resolved recipe as a YAML string.

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
        if Path(value).suffix in (".yaml", ".yml") and Path(value).is_file():
            value = yaml.safe_dump(resolve_recipe(value), sort_keys=False)
        out += ["--config", value]
    return out
