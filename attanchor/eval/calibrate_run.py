"""`attanchor calibrate --config RECIPE --target-fraction RHO`: gather best-match similarities
of the recipe's training candidates over a few batches, plot them, and print the threshold tau
that makes a fraction RHO of candidates anchors (the paper tuned tau per model by hand)."""

from __future__ import annotations

from pathlib import Path

import torch

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.eval.calibrate import (
    best_match_similarities,
    fraction_at_threshold,
    similarity_histogram_png,
    threshold_for_fraction,
)
from attanchor.eval.device import place_model, resolve_device
from attanchor.train.recipe import resolve_recipe
from attanchor.train.runinfo import run_dir_for


@torch.no_grad()
def gather_similarities(recipe: dict, batches: int, device: str | torch.device = "auto"
                        ) -> torch.Tensor:
    """Best-match similarity of every candidate in the first ``batches`` training batches,
    computed on ``device`` (``resolve_device``) with the model in the recipe's dtype; returned
    on the CPU."""
    from attanchor.data.datamodule import VLMDataModule
    from attanchor.train.build import load_model

    model_cfg = recipe["model"]
    anchor = AnchorConfig.from_dict(model_cfg.get("anchor", {}))
    settings = model_cfg.get("model", {})
    hf = load_model(model_cfg["model_path"], dtype=settings.get("dtype", "float32"),
                    trust_remote_code=settings.get("trust_remote_code", False)).eval()
    wrapped = place_model(AnchoredVLM(hf, anchor), device)
    table = hf.get_input_embeddings().weight
    dm = VLMDataModule(model_path=model_cfg["model_path"], scope=anchor.scope,
                       **recipe.get("data", {}))
    dm.setup("fit")
    values = []
    for i, batch in enumerate(dm.train_dataloader()):
        if i >= batches:
            break
        pv = batch["pixel_values"]
        if pv is not None and pv.is_floating_point():
            pv = pv.to(table.device, table.dtype)
        # The family's other image keys (image_sizes, image_grid_thw, ...); its image mask
        # holds only the positions that can be matched (LLaVA-NeXT: no newline slots).
        extra = {k: batch[k].to(table.device) for k in wrapped.family.image_keys
                 if k != "pixel_values" and batch.get(k) is not None}
        embeds, image_mask = wrapped.baseline_embeds(
            batch["input_ids"].to(table.device), None if pv is None else pv.to(table.device),
            attention_mask=batch["attention_mask"].to(table.device), **extra)
        rows = image_mask.any(dim=1)  # text-only rows have nothing to match
        values.append(best_match_similarities(embeds[rows], image_mask[rows],
                                              batch["candidate_mask"].to(table.device)[rows]))
    return torch.cat(values).cpu()


def run_calibrate(config: str, *, target_fraction: float, batches: int,
                  out_png: str | None = None, device: str = "auto") -> int:
    target = resolve_device(device)  # before anything loads: a bad --device fails at once
    recipe = resolve_recipe(config)
    sims = gather_similarities(recipe, batches, target)
    tau = threshold_for_fraction(sims, target_fraction)
    paper_tau = 0.12
    run = recipe.get("run", {})
    out = Path(out_png) if out_png else \
        run_dir_for(run.get("root", "runs"), run.get("name", "default"), "calibrate", 0).parent \
        / "calibrate.png"
    similarity_histogram_png(sims, out, threshold=tau, paper_tau=paper_tau)
    print(f"candidates: {sims.numel()}  best-match similarity: mean {sims.mean():.4f}, "
          f"min {sims.min():.4f}, max {sims.max():.4f}")
    print(f"threshold for {target_fraction:.1%} anchors: tau = {tau:.4f}")
    print(f"the paper's tau {paper_tau} would anchor "
          f"{fraction_at_threshold(sims, paper_tau):.1%} of candidates")
    print(f"histogram: {out}")
    return 0
