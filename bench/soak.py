"""Soak: the demo recipe for thousands of steps; does resident memory (RSS) stay flat?

    python bench/soak.py [--steps 2000] [--batch-size 8] [--strategy text_into_image]
        [--sample-every 20] [--warmup-fraction 0.25] [--max-growth-pct 5] [--out DIR]

Builds the tiny LLaVA and a small easy-vqa world (as the tests do; nothing is downloaded),
then runs ``attanchor fit`` on ``recipes/demo/anchored.yaml`` in this process with the demo's
settings (validation every 100 steps, checkpoints, metrics.csv; W&B off unless ``--wandb``,
its writer is another process) except ``--steps``, the batch size, and no early stopping (a
soak must run its steps). Many epochs pass over the small world, so epoch boundaries, the
sampler, validation and checkpoint rewrites all repeat. A callback samples this process's
RSS every ``--sample-every`` steps.

Figure: RSS growth after warm-up = (median RSS of the last 10 % of the samples) / (median RSS
of the samples in the 10 % of the run just after warm-up) - 1, in percent (``rss_growth``).
Medians, so a single sample taken during a checkpoint write does not decide it. Target: flat
within 5 %. Writes ``DIR/soak.json`` (all samples, the figure) and exits 1 above
``--max-growth-pct``.

Worked example of the figure: samples ``[(0, 100), (10, 150), (20, 150), (30, 151),
(40, 152)]`` (step, MiB) with warm-up step 10: windows of 10 % of the 30 steps after it (3
steps); steps 10..12 hold the sample 150, steps 38..40 the sample 152; growth 1.33 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo" / "anchored.yaml"


def rss_growth(samples: list[tuple[int, int]], warmup_step: int,
               window_fraction: float = 0.1) -> dict[str, float]:
    """``{"warm_rss", "final_rss", "growth_pct"}`` from ``(step, rss)`` samples (module doc).

    ``warm_rss``: median of the samples with ``warmup_step <= step < warmup_step + w``;
    ``final_rss``: median of those with ``step > last - w``, where ``w`` is
    ``window_fraction`` of the steps after warm-up (at least 1). Raises when a window is empty.
    Example: ``rss_growth([(0, 100), (10, 150), (20, 150), (30, 151), (40, 152)], 10)``
    -> ``{"warm_rss": 150, "final_rss": 152, "growth_pct": 1.333...}``.
    """
    last = max(step for step, _ in samples)
    w = max(1, int((last - warmup_step) * window_fraction))
    warm = [rss for step, rss in samples if warmup_step <= step < warmup_step + w]
    final = [rss for step, rss in samples if step > last - w]
    if not warm or not final:
        raise ValueError(f"no RSS sample in a window (warm-up step {warmup_step}, window {w} "
                         f"steps, last step {last}): sample more often")
    a, b = statistics.median(warm), statistics.median(final)
    return {"warm_rss": a, "final_rss": b, "growth_pct": 100.0 * (b - a) / a}


def build_world(root: Path) -> dict[str, Path]:
    """The tests' world: easy-vqa (40 train / 20 test images) and the tiny LLaVA."""
    from attanchor.data.easyvqa import prepare_easy_vqa
    from attanchor.data.tiny import build_tiny_llava

    data = root / "data" / "easy-vqa"
    prepare_easy_vqa(data, max_train_images=40, max_test_images=20, progress=False)
    return {"data": data, "model": build_tiny_llava(root / "models" / "tiny", seed=0)}


def rss_sampler(every: int) -> Any:
    """A Lightning callback recording ``(global_step, RSS bytes)`` every ``every`` steps."""
    from lightning.pytorch.callbacks import Callback

    class RSSSampler(Callback):
        def __init__(self) -> None:
            self.samples: list[tuple[int, int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = int(trainer.global_step)
            if step % every == 0:
                self.samples.append((step, current_rss()))

    return RSSSampler()


def current_rss() -> int:
    """This process's resident set size in bytes (psutil when installed, else Linux /proc;
    psutil is no declared dependency of attanchor)."""
    try:
        import psutil
    except ImportError:
        import os

        with open("/proc/self/statm") as f:  # pages: size resident shared ...
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


def soak(steps: int, batch_size: int, strategy: str, sample_every: int, out: Path,
         warmup_fraction: float, wandb: bool = False, world_root: Path | None = None
         ) -> dict[str, Any]:
    """Run the soak (module doc) and return its result (also written to ``out/soak.json``)."""
    from attanchor.data.datamodule import VLMDataModule
    from attanchor.train.cli import AttanchorCLI
    from attanchor.train.module import AnchorModule
    from attanchor.train.recipe import expand_config_args

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=world_root) as tmp:
        world = build_world(Path(tmp))
        d = world["data"]
        sampler = rss_sampler(sample_every)
        argv = ["fit", "--config", str(DEMO), "--model.model_path", str(world["model"]),
                "--data.train_file", str(d / "train.json"), "--data.val_file",
                str(d / "val.json"), "--data.test_file", str(d / "test.json"),
                "--data.image_root", str(d / "images"), "--run.root", str(out / "runs"),
                "--run.name", "soak", "--run.wandb", str(wandb).lower(),
                "--run.early_stopping_patience", "null", "--model.anchor.strategy", strategy,
                "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
                "--data.batch_size", str(batch_size),
                "--data.eval_batch_size", str(batch_size)]
        cli = AttanchorCLI(AnchorModule, VLMDataModule, args=expand_config_args(argv),
                           save_config_callback=None, seed_everything_default=0,
                           trainer_defaults={"deterministic": "warn", "callbacks": [sampler]},
                           parser_kwargs={"default_env": False})
        trainer = cli.trainer
    warmup = int(steps * warmup_fraction)
    mib = [(s, r / 2**20) for s, r in sampler.samples]
    growth = rss_growth(mib, warmup)
    result = {"steps": int(trainer.global_step), "epochs": int(trainer.current_epoch) + 1,
              "batch_size": batch_size, "strategy": strategy, "warmup_step": warmup,
              "warm_rss_mib": round(growth["warm_rss"], 1),
              "final_rss_mib": round(growth["final_rss"], 1),
              "peak_rss_mib": round(max(r for _, r in mib), 1),
              "growth_pct": round(growth["growth_pct"], 2),
              "samples_mib": [(s, round(r, 1)) for s, r in mib]}
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--strategy", default="text_into_image")
    p.add_argument("--sample-every", type=int, default=20)
    p.add_argument("--warmup-fraction", type=float, default=0.25)
    p.add_argument("--max-growth-pct", type=float, default=5.0)
    p.add_argument("--wandb", action="store_true", help="keep the demo's offline W&B logging")
    p.add_argument("--out", default="runs/soak")
    args = p.parse_args(argv)
    r = soak(args.steps, args.batch_size, args.strategy, args.sample_every, Path(args.out),
             args.warmup_fraction, wandb=args.wandb)
    print(f"soak: {r['steps']} steps ({r['epochs']} epochs, batch {r['batch_size']}, "
          f"{r['strategy']}): RSS {r['warm_rss_mib']} MiB after warm-up (step "
          f"{r['warmup_step']}) -> {r['final_rss_mib']} MiB at the end: "
          f"{r['growth_pct']:+.2f} % (peak {r['peak_rss_mib']} MiB; target within "
          f"{args.max_growth_pct} %); samples in {Path(args.out) / 'soak.json'}")
    return 0 if abs(r["growth_pct"]) <= args.max_growth_pct else 1


if __name__ == "__main__":
    sys.exit(main())
