"""Drift check: do the newest releases our ranges allow still pass the fast tests?

    python -m tools.drift                # or: bash .ci/drift (CI-optional, not part of .ci/run)
    python -m tools.drift --out drift/   # drift/report.json and drift/report.md

Three steps, each in one fresh venv:

1. **Newest allowed.** The README's test install without the lock: every package resolves to
   the newest release pyproject.toml's ranges allow (torch and lmms-eval move too, except that
   torch stays at the lock's version: a newer torch is a multi-GB CUDA download on a CPU
   machine). The report lists every package that moved past the lock.
2. **Culprits.** If fast tests fail, the failure texts name suspects (a traceback frame in
   ``site-packages/<pkg>/``, ``No module named '<pkg>...'``); each suspect, then every other moved
   package, is put back to its locked version alone and the failing tests rerun: the first
   whose pin makes them pass is named as the package that broke them.
3. **Caps.** For every upper bound in pyproject.toml the newest release past it is installed
   (``--no-deps``) and the fast tests run: "still needed" names the tests it breaks, "can be
   lifted" means it passes now.

Exit status: 1 when step 1 fails (the next fresh install of a user would break), else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tomllib
from dataclasses import asdict
from pathlib import Path

from tools.envtools import (
    FAST_TESTS,
    LOCK,
    ROOT,
    Cap,
    Failure,
    Venv,
    diff_pins,
    install_project,
    read_lock,
    suspects,
    upper_bounds,
)


def _brief(failures: list[Failure], limit: int = 5) -> list[dict[str, str]]:
    return [{"test": f.test, "error": f.message.strip().splitlines()[0][:300]}
            for f in failures[:limit]]


def find_culprit(venv: Venv, failures: list[Failure], moved: dict[str, tuple[str, str]],
                 junit: Path, max_tries: int) -> dict | None:
    """Pin moved packages back one at a time; the first that fixes the failing tests."""
    order = suspects(failures, moved, venv.distributions_of())
    order += [n for n in moved if n not in order]
    tests = sorted({f.test for f in failures})
    for name in order[:max_tries]:
        locked, now = moved[name]
        venv.pip("install", "--quiet", "--no-deps", f"{name}=={locked}")
        code, _, summary = venv.pytest(junit, *tests)
        venv.pip("install", "--quiet", "--no-deps", f"{name}=={now}")
        if code == 0:
            return {"package": name, "locked": locked, "newest": now,
                    "fixed_by_pinning": f"{name}=={locked}", "rerun": summary}
    return None


def probe_cap(venv: Venv, cap: Cap, junit: Path) -> dict:
    """Install the newest release past ``cap`` and run the fast tests."""
    before = venv.freeze().get(cap.name)
    proc = venv.pip("install", "--quiet", "--no-deps", f"{cap.name}{cap.beyond()}", check=False)
    if proc.returncode != 0:
        return {"cap": cap.requirement, "where": cap.where, "status": "no release past the cap"}
    newest = venv.freeze().get(cap.name)
    code, failures, summary = venv.pytest(junit, *FAST_TESTS)
    venv.pip("install", "--quiet", "--no-deps", f"{cap.name}=={before}")
    status = "can be lifted" if code == 0 else "still needed"
    return {"cap": cap.requirement, "where": cap.where, "newest": newest, "status": status,
            "summary": summary, "failures": _brief(failures)}


def render_markdown(report: dict) -> str:
    lines = ["# Drift check", "", f"Newest allowed: **{report['status']}** "
             f"({report['summary']})", ""]
    if report["moved"]:
        lines += ["| package | lock | newest allowed |", "|---|---|---|"]
        lines += [f"| {m['name']} | {m['locked']} | {m['now']} |" for m in report["moved"]]
        lines.append("")
    for f in report["failures"]:
        lines.append(f"- FAILED `{f['test']}`: {f['error']}")
    if report.get("culprit"):
        c = report["culprit"]
        lines += ["", f"**Culprit: {c['package']}** {c['locked']} -> {c['newest']} "
                  f"(pinning `{c['fixed_by_pinning']}` makes the failing tests pass)"]
    elif report["failures"]:
        lines += ["", "No single moved package explains the failures (try pinning several)."]
    lines += ["", "## Upper bounds", ""]
    for c in report["caps"]:
        lines.append(f"- `{c['cap']}` ({c['where']}): **{c['status']}**"
                     + (f", newest {c['newest']}: {c['summary']}" if c.get("newest") else ""))
        lines += [f"  - `{f['test']}`: {f['error']}" for f in c.get("failures", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.drift", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "drift-report")
    ap.add_argument("--venv", type=Path, help="where to build the venv (default: a temp dir)")
    ap.add_argument("--max-tries", type=int, default=8,
                    help="moved packages to pin back one by one when looking for a culprit")
    ap.add_argument("--skip-caps", action="store_true", help="do not probe upper bounds")
    args = ap.parse_args(argv)

    lock = read_lock(LOCK)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    with tempfile.TemporaryDirectory(prefix="attanchor-drift-") as tmp:
        junit = Path(tmp) / "junit.xml"
        venv = Venv(args.venv or Path(tmp) / "venv")
        venv.pip("install", "--quiet", "--upgrade", "pip")
        install_project(venv, torch=lock["torch"], lmms_eval=None)
        now = venv.freeze()
        moved = {c.name: (c.locked, c.now) for c in diff_pins(lock, now)
                 if c.locked and c.now and c.name != "pip"}
        code, failures, summary = venv.pytest(junit, *FAST_TESTS)
        print(summary)
        report = {
            "status": "pass" if code == 0 else "FAIL", "summary": summary,
            "moved": [asdict(c) for c in diff_pins(lock, now) if c.name != "pip"],
            "failures": _brief(failures, limit=20), "culprit": None, "caps": [],
        }
        if code != 0:
            report["culprit"] = find_culprit(venv, failures, moved, junit, args.max_tries)
        if not args.skip_caps:
            report["caps"] = [probe_cap(venv, cap, junit) for cap in upper_bounds(pyproject)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = render_markdown(report)
    (args.out / "report.md").write_text(md)
    print(md)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
