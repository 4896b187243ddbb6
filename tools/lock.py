"""Refresh `requirements-lock.txt`: what a fresh test install resolves to today, tested.

    python -m tools.lock                 # newest allowed by pyproject's ranges, torch and
                                         # lmms-eval kept at the lock's versions
    python -m tools.lock --torch 2.14.1 --lmms-eval 0.7.4   # move those two on purpose

Steps: a fresh venv; the README's test install without the lock (``install_project``); ``pip
freeze``; the fast tests in that venv; only if they pass, the freeze is written as the new lock
(pip itself included, so `.ci/run` installs the same pip). A lock that fails its own tests is
never written: the failing tests are printed instead (`python -m tools.drift` names the package).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

from tools.envtools import FAST_TESTS, LOCK, ROOT, Venv, install_project, read_lock, render_lock


def header(torch: str, lmms_eval: str) -> list[str]:
    today = datetime.date.today().isoformat()
    py = ".".join(platform.python_version_tuple()[:2])
    return [
        "The tested environment of the README's commands and CI: pip constraints, one pin a line.",
        f"Resolved {today} on Python {py} ({platform.machine()}) by `python -m tools.lock`;",
        "do not edit by hand. Install through it:",
        '  pip install -c requirements-lock.txt -e ".[test]"',
        "  pip install -c requirements-lock.txt --no-deps lmms-eval",
        f"torch {torch} and lmms-eval {lmms_eval} are held (tools.lock --torch/--lmms-eval).",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.lock", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=LOCK)
    ap.add_argument("--torch", help="torch version to hold (default: the lock's)")
    ap.add_argument("--lmms-eval", dest="lmms_eval", help="lmms-eval version (default: the lock's)")
    ap.add_argument("--no-test", action="store_true", help="write without running the fast tests")
    ap.add_argument("--venv", type=Path, help="where to build the venv (default: a temp dir)")
    args = ap.parse_args(argv)

    held = read_lock(args.out) if args.out.exists() else {}
    torch = args.torch or held.get("torch")
    lmms_eval = args.lmms_eval or held.get("lmms-eval")
    if not torch or not lmms_eval:
        ap.error("no lock to read torch / lmms-eval from: pass --torch and --lmms-eval")

    with tempfile.TemporaryDirectory(prefix="attanchor-lock-") as tmp:
        venv = Venv(args.venv or Path(tmp) / "venv")
        venv.pip("install", "--quiet", "--upgrade", "pip")
        install_project(venv, torch=torch, lmms_eval=lmms_eval)
        pins = venv.freeze()
        pins["pip"] = venv.pip("--version").stdout.split()[1]
        text = render_lock(pins, header(torch, lmms_eval))
        previous = args.out.read_text() if args.out.exists() else None
        # The candidate is in place while the tests run: they check the lock against
        # pyproject.toml, and that must be the new lock, not the one it replaces.
        args.out.write_text(text)
        if not args.no_test:
            code, failures, summary = venv.pytest(Path(tmp) / "junit.xml", *FAST_TESTS)
            print(summary)
            if code != 0:
                if previous is None:
                    args.out.unlink()
                else:
                    args.out.write_text(previous)
                for f in failures:
                    print(f"FAILED {f.test}: {f.message.strip().splitlines()[0][:200]}")
                print("lock NOT written (the previous one is back): the resolved environment "
                      "fails the fast tests; `python -m tools.drift` names the package that "
                      "broke them", file=sys.stderr)
                return 1
    changed = sorted(k for k in pins if held.get(k) != pins[k])
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}: "
          f"{len(pins)} pins, {len(changed)} changed" + (f" ({', '.join(changed)})" if changed
                                                         else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
