"""Pieces shared by the lock refresher (`tools.lock`) and the drift check (`tools.drift`).

Both build a throw-away virtual environment, install the project into it, freeze what pip
resolved and run the fast tests there. The pure parts (reading a lock, diffing two freezes,
inverting an upper bound, finding which package a failing test points at) are plain functions
with tests in ``tests/tools/``; the parts that run pip stay thin.

A lock is a pip constraints file: one ``name==version`` per line, ``#`` comments, no local
version labels (``torch==2.13.0`` matches the CPU build ``2.13.0+cpu`` and a CUDA build alike).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
# Installed apart, without its dependencies: lmms-eval pins a torchvision that fails to import
# next to a CPU torch; its other requirements are the project's `lmms` extra, pinned by the lock.
NO_DEPS = ("lmms-eval",)
# What the lock always covers: the test install is a superset of the demo's (`[all]`).
EXTRAS = "test"
FAST_TESTS = ("-m", "not slow")


# ----------------------------------------------------------------------------- locks and freezes
def parse_pins(text: str, *, where: str = "lock") -> dict[str, str]:
    """``name==version`` lines -> {canonical name: version}; comments and blanks skipped.

    The local label is dropped (``2.13.0+cpu`` -> ``2.13.0``). A line that is not an exact pin
    (a range, a URL, an editable) raises naming it: a lock pins, it does not range.
    """
    pins: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;+]+)(\+[^\s;]+)?", line)
        if m is None:
            raise ValueError(f"{where} line {n}: {raw!r} is not an exact `name==version` pin "
                             "(refresh the lock with `python -m tools.lock`)")
        name = canonicalize_name(m.group(1))
        if name in pins:
            raise ValueError(f"{where} line {n}: {m.group(1)} is pinned twice")
        pins[name] = m.group(2)
    return pins


def read_lock(path: str | os.PathLike = LOCK) -> dict[str, str]:
    return parse_pins(Path(path).read_text(), where=str(path))


def render_lock(pins: Mapping[str, str], header: Iterable[str]) -> str:
    """The lock file's text: ``# header`` lines, then the pins sorted by name."""
    lines = [f"# {h}".rstrip() for h in header]
    lines += [f"{name}=={pins[name]}" for name in sorted(pins)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Change:
    name: str
    locked: str | None  # None: not in the lock
    now: str | None     # None: no longer installed


def diff_pins(locked: Mapping[str, str], now: Mapping[str, str]) -> list[Change]:
    """Every package whose version differs between two freezes, sorted by name."""
    names = sorted(set(locked) | set(now))
    return [Change(n, locked.get(n), now.get(n)) for n in names if locked.get(n) != now.get(n)]


# ----------------------------------------------------------------------------- upper bounds
@dataclass(frozen=True)
class Cap:
    """An upper bound in pyproject.toml: ``requirement`` as written, and where it stands."""

    name: str
    requirement: str
    where: str  # "dependencies" or "extra <name>"

    def beyond(self) -> str:
        """The specifier for releases past the cap: ``<4.3`` -> ``>=4.3``, ``<=2`` -> ``>2``."""
        flips = {"<": ">=", "<=": ">"}
        out = [f"{flips[s.operator]}{s.version}" for s in SpecifierSet(
            str(Requirement(self.requirement).specifier)) if s.operator in flips]
        return ",".join(out)


def upper_bounds(pyproject: Mapping) -> list[Cap]:
    """Every requirement of the project (core and extras) that carries ``<`` or ``<=``."""
    project = pyproject["project"]
    groups = [("dependencies", project.get("dependencies", []))]
    groups += [(f"extra {k}", v) for k, v in project.get("optional-dependencies", {}).items()]
    caps = []
    for where, reqs in groups:
        for text in reqs:
            req = Requirement(text)
            if any(s.operator in ("<", "<=") for s in req.specifier):
                caps.append(Cap(canonicalize_name(req.name), text, where))
    return caps


def requirements_of(pyproject: Mapping, extra: str) -> list[Requirement]:
    """The core requirements plus ``extra``'s, following ``attanchor[...]`` self-references."""
    project = pyproject["project"]
    own = canonicalize_name(project["name"])
    extras = project.get("optional-dependencies", {})
    out = [Requirement(r) for r in project.get("dependencies", [])]
    todo, seen = [extra], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in extras:
            raise KeyError(f"pyproject.toml has no extra {name!r}")
        for text in extras[name]:
            req = Requirement(text)
            if canonicalize_name(req.name) == own:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


# ----------------------------------------------------------------------------- failing tests
@dataclass(frozen=True)
class Failure:
    test: str      # pytest node id
    message: str   # the failure text (traceback included)


def read_junit(path: str | os.PathLike) -> list[Failure]:
    """Failed and errored test cases of a JUnit XML report (pytest ``--junitxml``)."""
    failures = []
    for case in ET.parse(path).iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                cls = case.get("classname", "").replace(".", "/")
                test = f"{cls}.py::{case.get('name')}" if cls else case.get("name", "?")
                failures.append(Failure(test, (node.get("message") or "") + "\n" +
                                        (node.text or "")))
    return failures


_SITE = re.compile(r"site-packages/([A-Za-z0-9_]+)")
_MISSING = re.compile(r"No module named '([A-Za-z0-9_]+)")
_FROM = re.compile(r"cannot import name '\w+' from '([A-Za-z0-9_]+)")


def suspects(failures: Iterable[Failure], changed: Iterable[str],
             distributions_of: Mapping[str, list[str]]) -> list[str]:
    """Changed packages that the failure texts point at, most mentioned first.

    ``distributions_of`` maps a top-level import name to its distributions
    (``importlib.metadata.packages_distributions()`` of the environment the tests ran in);
    a traceback frame inside ``site-packages/filelock/`` or ``No module named 'filelock._api'``
    points at the distribution ``filelock``.
    """
    changed = {canonicalize_name(c) for c in changed}
    counts: dict[str, int] = {}
    for f in failures:
        modules = set(_SITE.findall(f.message)) | set(_MISSING.findall(f.message)) | \
            set(_FROM.findall(f.message))
        for module in modules:
            for dist in distributions_of.get(module, []):
                d = canonicalize_name(dist)
                if d in changed:
                    counts[d] = counts.get(d, 0) + 1
    return sorted(counts, key=lambda d: (-counts[d], d))


# ----------------------------------------------------------------------------- running things
def run(cmd: list[str], *, cwd: Path = ROOT, env: Mapping[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=None if env is None else {**os.environ, **env},
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return proc


class Venv:
    """A fresh virtual environment at ``path`` (created by the running Python's venv)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        run([sys.executable, "-m", "venv", "--clear", str(self.path)])
        self.python = str(self.path / "bin" / "python")

    def pip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run([self.python, "-m", "pip", "--disable-pip-version-check", *args],
                   check=check)

    def freeze(self) -> dict[str, str]:
        """What is installed, the project's own editable install left out."""
        out = self.pip("freeze", "--exclude-editable").stdout
        own = canonicalize_name("attanchor")
        return {k: v for k, v in parse_pins(out, where="pip freeze").items() if k != own}

    def distributions_of(self) -> dict[str, list[str]]:
        code = "import json, importlib.metadata as m; print(json.dumps(m.packages_distributions()))"
        return json.loads(run([self.python, "-c", code]).stdout)

    def pytest(self, junit: Path, *args: str) -> tuple[int, list[Failure], str]:
        """Run pytest in this environment; (exit code, failures, summary line)."""
        proc = run([self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}", *args], check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        summary = lines[-1] if lines else proc.stderr.strip()[-300:]
        failures = read_junit(junit) if junit.exists() else []
        return proc.returncode, failures, summary


def install_project(venv: Venv, *, torch: str, lmms_eval: str | None,
                    constraints: Path | None = None) -> None:
    """The README's test install: torch pinned in the same command, then lmms-eval alone.

    With ``constraints`` every package resolves to the lock; without, to the newest release
    the project's ranges allow (torch stays at ``torch``: a newer torch means a CUDA download).
    """
    c = ["-c", str(constraints)] if constraints else []
    venv.pip("install", "--quiet", *c, f"torch=={torch}", "-e", f".[{EXTRAS}]")
    spec = f"lmms-eval=={lmms_eval}" if lmms_eval else "lmms-eval"
    venv.pip("install", "--quiet", *c, "--no-deps", spec)
