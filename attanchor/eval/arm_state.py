"""What `compare` knows about an arm on disk: did it train, is its evaluation current.

Three small records, each a JSON file in the arm's directory, so a re-run of ``compare`` never
reports an arm it cannot vouch for:

    <arm>/compare_status.json  {"status": "trained"} or {"status": "failed", "error": "..."}
    <arm>/eval/<task>/key.json what the evaluation in eval/<task>/metrics.json came from:
        {"checkpoint": "/abs/runs/demo/none-seed0/checkpoints/last.ckpt",
         "fingerprint": "1532817-1764590000123456789",   # bytes-mtime_ns (summed for a dir)
         "data": {"pope": "<sha256 of the POPE file>"}, "image_root": "/abs/images",
         "limit": 400, "anchor_override": null}

A task's evaluation is reused only when its key equals the key of the current call
(``stale_reason`` names the first field that differs); each task is keyed on its own, so
evaluating on fewer tasks reuses the others. A failure's message is the first line
of the exception (``first_line``), e.g. ``ValueError: AnchorConfig.static_shape=True needs
max_anchors ...``.

``prediction_differences`` counts, per task and pair of arms, the questions whose predictions
differ seed by seed: the direct check that two arms are not the same model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path
from typing import Any

from attanchor.train.runinfo import sha256_file

STATUS_FILE = "compare_status.json"


def first_line(err: BaseException) -> str:
    """``TypeName: first non-empty line of the message`` (``TypeName`` alone when empty).

    Example: first_line(ValueError("bad\\nmore")) == "ValueError: bad"."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def write_status(arm: Path, status: str, error: str | None = None) -> None:
    """Record that the arm ``trained`` or ``failed`` (with ``error``, its first line)."""
    if status not in ("trained", "failed"):
        raise ValueError(f"status {status!r}: expected 'trained' or 'failed'")
    arm.mkdir(parents=True, exist_ok=True)
    payload = {"status": status} if error is None else {"status": status, "error": error}
    (arm / STATUS_FILE).write_text(json.dumps(payload) + "\n")


def read_status(arm: Path) -> dict[str, str] | None:
    """The arm's recorded status, or None when compare never trained it."""
    path = arm / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def fingerprint(path: Path) -> str:
    """``bytes-mtime_ns`` of a file; for a directory (export, ZeRO checkpoint) the sums over
    its files. A rewritten checkpoint changes it (new mtime), so its evaluation is redone."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: no checkpoint file to fingerprint")
    stats = [f.stat() for f in files]
    return f"{sum(s.st_size for s in stats)}-{sum(s.st_mtime_ns for s in stats)}"


def eval_key(checkpoint: Path, evals: Mapping[str, str], image_root: str, limit: int | None,
             anchor_override: Mapping[str, Any] | None) -> dict[str, Any]:
    """The key of an evaluation (module docstring): checkpoint path and fingerprint, SHA-256
    of each data file, image root, limit and anchor override."""
    return {"checkpoint": str(Path(checkpoint).resolve()), "fingerprint": fingerprint(checkpoint),
            "data": {task: sha256_file(path) for task, path in sorted(evals.items())},
            "image_root": str(Path(image_root).resolve()), "limit": limit,
            "anchor_override": None if anchor_override is None else dict(anchor_override)}


def stale_reason(eval_dir: Path, key: Mapping[str, Any]) -> str | None:
    """None when ``eval_dir`` holds metrics.json computed with ``key``; else why not, e.g.
    "no evaluation yet" or "data changed (pope)"."""
    if not (eval_dir / "metrics.json").is_file():
        return "no evaluation yet"
    if not (eval_dir / "key.json").is_file():
        return "evaluated without a key (older attanchor)"
    old = json.loads((eval_dir / "key.json").read_text())
    for field in key:
        if old.get(field) != key[field]:
            if field == "data" and isinstance(old.get("data"), dict):
                changed = sorted(t for t in set(old["data"]) | set(key["data"])
                                 if old["data"].get(t) != key["data"].get(t))
                return f"data changed ({', '.join(changed)})"
            return f"{field} changed ({old.get(field)!r} -> {key[field]!r})"
    return None


def read_predictions(path: Path) -> dict[str, str]:
    """{question id: prediction} from an ``evaluate`` predictions.jsonl."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {str(r["id"]): str(r["prediction"]) for r in rows}


def prediction_differences(preds: Mapping[str, Mapping[str, Mapping[str, Path]]]
                           ) -> dict[str, dict[str, dict[str, tuple[int, int]]]]:
    """Per task and pair of arms "a vs b", per seed both have: (questions whose predictions
    differ, questions both answered). ``preds[task][arm][seed]`` is a predictions.jsonl path.

    Example: arms none and random answered the same 400 questions with seed 0 and 37 answers
    differ -> {"vqa": {"none vs random": {"0": (37, 400)}}}.
    """
    out: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
    for task, arms in preds.items():
        loaded = {a: {s: read_predictions(p) for s, p in seeds.items()}
                  for a, seeds in arms.items()}
        out[task] = {}
        for a, b in combinations(loaded, 2):
            pair: dict[str, tuple[int, int]] = {}
            for s in (s for s in loaded[a] if s in loaded[b]):
                shared = set(loaded[a][s]) & set(loaded[b][s])
                pair[s] = (sum(loaded[a][s][q] != loaded[b][s][q] for q in shared), len(shared))
            if pair:
                out[task][f"{a} vs {b}"] = pair
    return out


def format_differences(diffs: Mapping[str, Mapping[str, Mapping[str, tuple[int, int]]]]) -> str:
    """One line per task and pair, e.g. "vqa  none vs random: seed 0 37/400, seed 1 41/400"."""
    lines = []
    for task, pairs in diffs.items():
        for pair, seeds in pairs.items():
            per_seed = ", ".join(f"seed {s} {d}/{n}" for s, (d, n) in seeds.items())
            lines.append(f"{task}  {pair}: {per_seed}")
    return "\n".join(lines)
