"""Host syncs of one anchored forward, dynamic vs static shape (``bench/gpu_smoke.py --sync-debug``).

Counts on any device with ``attanchor.anchoring.syncs.count_host_syncs`` (scalar reads and
value-dependent shapes, at the aten level, with the line that caused each), for the whole
anchored forward and for the regroup plus ``AnchoredVLM._record`` alone. On CUDA it also runs
the static regroup under ``torch.cuda.set_sync_debug_mode("error")`` (any sync raises) and the
static forward under ``"warn"`` (every sync the driver sees, with its line). Example result::

    {"dynamic": {"forward_syncs": 13, "regroup_syncs": 9, ...},
     "static": {"forward_syncs": 4, "regroup_syncs": 0, ...},
     "cuda_error_mode_regroup": "passed", ...}

The syncs left in the static forward are outside the regroup: the family's placeholder-count
check and Hugging Face's sdpa mask (``masking_utils``: it reads the mask to skip it).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from attanchor.anchoring import AnchoredVLM, regroup
from attanchor.anchoring.syncs import count_host_syncs


def _regroup_and_record(vlm: AnchoredVLM, inputs: dict[str, Any]) -> None:
    """The regroup and the statistics on the text embeddings (the values do not matter for
    syncs; the image features are left out so the tower's own reads are not counted)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = vlm.model.get_input_embeddings()(ids)  # (B, L, d)
    image_mask = ids == int(vlm.model.config.image_token_id)
    out = regroup(embeds, mask, image_mask, inputs["candidate_mask"].bool(), inputs["labels"],
                  vlm.config)
    vlm._record(out, mask)


def sync_debug(model: AnchoredVLM, inputs: dict[str, Any], autocast: Callable[[], Any],
               max_anchors: int = 16) -> dict[str, Any]:
    """Syncs of one anchored forward of ``inputs`` (on the model's device), in the model's
    configuration and in its static-shape twin (``max_anchors``, ``static_shape=True``)."""
    device = inputs["input_ids"].device
    static_cfg = dataclasses.replace(model.config, max_anchors=max_anchors, static_shape=True)
    result: dict[str, Any] = {"max_anchors": max_anchors}
    for name, cfg in (("dynamic", model.config), ("static", static_cfg)):
        vlm = AnchoredVLM(model.model, cfg)
        with torch.no_grad(), autocast():
            vlm(**inputs)  # warm-up: lazy initialisation is not a per-forward cost
            with count_host_syncs() as fwd:
                vlm(**inputs)
            with count_host_syncs() as reg:
                _regroup_and_record(vlm, inputs)
        result[name] = {"forward_syncs": fwd.total, "forward_sites": dict(fwd.by_site),
                        "regroup_syncs": reg.total, "regroup_sites": dict(reg.by_site)}
    if device.type != "cuda":
        result["cuda"] = "skipped: no CUDA device (torch.cuda.set_sync_debug_mode needs one)"
        return result
    vlm = AnchoredVLM(model.model, static_cfg)
    torch.cuda.synchronize(device)
    with torch.no_grad(), autocast():
        torch.cuda.set_sync_debug_mode("error")
        try:
            _regroup_and_record(vlm, inputs)
            result["cuda_error_mode_regroup"] = "passed"
        except RuntimeError as err:  # the first sync, with its message
            result["cuda_error_mode_regroup"] = f"failed: {str(err)[:300]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                vlm(**inputs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    result["cuda_warn_mode_static_forward"] = {
        "warnings": len(syncs),
        "sites": dict(Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)),
    }
    return result


def describe(debug: dict[str, Any]) -> str:
    """One line for the smoke script's table."""
    d, s = debug["dynamic"], debug["static"]
    line = (f"host syncs per anchored forward: dynamic {d['forward_syncs']} (regroup + stats "
            f"{d['regroup_syncs']}), static {s['forward_syncs']} (regroup + stats "
            f"{s['regroup_syncs']}); static sites {sorted(s['forward_sites'])}")
    if "cuda_error_mode_regroup" in debug:
        line += (f"; CUDA error mode on the static regroup: {debug['cuda_error_mode_regroup']}"
                 f"; warn mode, static forward: "
                 f"{debug['cuda_warn_mode_static_forward']['warnings']} warnings")
    return line
