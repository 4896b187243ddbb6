"""Installable as a product: a built wheel carries the recipes, and `attanchor recipes` and
`attanchor demo` work from it in a directory far from any checkout.

The slow test builds the wheel from a copy of the project (so the checkout gets no build/),
installs it with ``--no-deps --target`` (the test environment already holds the dependencies:
no multi-minute install) and runs the installed console script with only that target on
PYTHONPATH, checking that the installed package, not the checkout, is what runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_package_list_holds_every_package_and_the_recipes():
    # The list is explicit (a mapped package cannot be discovered): a new subpackage of
    # attanchor/ missing from it would be missing from the wheel.
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    assert sorted(packages) == sorted([*find_packages(str(ROOT), include=["attanchor*"]),
                                       "attanchor.recipes"])
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"attanchor.recipes": "recipes"}


def _build_wheel(src: Path, dist: Path) -> Path:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("attanchor", "recipes"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)]
    # Offline when this environment's setuptools satisfies [build-system]; else pip fetches it.
    needs = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    try:
        offline = all(r.specifier.contains(version(r.name)) for r in needs)
    except Exception:  # a build requirement not installed here
        offline = False
    if offline:
        cmd.insert(4, "--no-build-isolation")
    subprocess.run(cmd, check=True, cwd=src)
    (wheel,) = dist.glob("attanchor-*.whl")
    return wheel


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_ships_recipes_and_runs_the_demo_outside_the_checkout(tmp_path):
    (src := tmp_path / "src").mkdir()
    wheel = _build_wheel(src, tmp_path / "dist")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("attanchor/recipes/")}
    assert shipped == {f"attanchor/recipes/{p.relative_to(ROOT / 'recipes').as_posix()}"
                       for p in (ROOT / "recipes").rglob("*.yaml")}

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, cwd=tmp_path)
    (elsewhere := tmp_path / "elsewhere").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    where = _run([sys.executable, "-c", "import attanchor; print(attanchor.__file__)"],
                 elsewhere, env).stdout.strip()
    assert Path(where) == site / "attanchor" / "__init__.py"  # not the checkout's package

    script = str(site / "bin" / "attanchor")  # the console script of [project.scripts]
    listing = _run([script, "recipes", "list"], elsewhere, env).stdout
    assert listing.startswith(f"recipes shipped in {site / 'attanchor' / 'recipes'} ")
    assert any(line.split()[:1] == ["demo/anchored"] for line in listing.splitlines())
    copied = _run([script, "recipes", "copy", "demo/anchored", "mine"], elsewhere, env).stdout
    assert copied.splitlines()[:2] == ["wrote mine/anchored.yaml", "wrote mine/base.yaml"]

    # The demo with tiny step counts: data, pre-training, two arms, evaluation, report.
    demo = _run([script, "demo", "--workdir", "work", "--pretrain-steps", "2",
                 "--adapt-steps", "2", "--eval-limit", "4", "--seeds", "0",
                 "--strategies", "none,text_into_image"], elsewhere, env).stdout
    runs = elsewhere / "work" / "runs" / "demo"
    (report_line,) = [x for x in demo.splitlines() if x.startswith("[demo] report: ")]
    assert (elsewhere / report_line.split()[2]).resolve() == (runs / "report.md").resolve()
    assert (runs / "report.md").is_file() and (runs / "metrics.json").is_file()
    for arm in ("none", "text_into_image"):  # each arm trained from the shipped recipe
        config = yaml.safe_load((runs / f"{arm}-seed0" / "config.yaml").read_text())
        assert config["model"]["anchor"]["strategy"] == arm
        assert (runs / f"{arm}-seed0" / "eval").is_dir()
    assert (elsewhere / "work" / "models" / "tiny-scenes" / "config.json").is_file()
