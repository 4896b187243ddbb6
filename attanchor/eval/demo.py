"""`attanchor demo`: the whole product on the built-in easy-vqa world, on a CPU, in minutes.

1. prepare easy-vqa (real 64x64 images, real questions) as LLaVA JSON + a POPE file;
2. build the tiny LLaVA from config and give it a short baseline pre-training (full fine-tune,
   no anchoring), exported as a Hugging Face directory: the "existing checkpoint" that the
   paper LoRA-adapts;
3. compare LoRA adaptation with ``none``, ``text_into_image`` and ``random`` over 2 seeds, each
   evaluated POPE-style on the yes/no questions and by VQA accuracy on the open ones;
4. print the report's table (report.md / report.png / metrics.json beside the arms).

Every step is skipped when its output exists, so a second run only re-prints the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from attanchor.train.recipe import recipes_dir

# Sized for under 10 minutes on 2 CPU cores (measured in the README).
PRETRAIN_STEPS = 1500
ADAPT_STEPS = 300
EVAL_LIMIT = 400


def demo_recipes() -> Path:
    """The demo's recipes (anchored.yaml, pretrain.yaml, ...): shipped in the package, so the
    demo runs from any directory of a wheel install as well as from a checkout."""
    return recipes_dir() / "demo"


def _paths(workdir: Path) -> dict[str, Path]:
    return {"data": workdir / "data" / "easy-vqa", "init": workdir / "models" / "tiny-init",
            "pretrained": workdir / "models" / "tiny-easy-vqa", "runs": workdir / "runs"}


def _data_overrides(p: dict[str, Path]) -> list[str]:
    d = p["data"]
    return ["--data.train_file", str(d / "train.json"), "--data.val_file", str(d / "val.json"),
            "--data.test_file", str(d / "test.json"), "--data.image_root", str(d / "images"),
            "--run.root", str(p["runs"])]


def pretrain(p: dict[str, Path], steps: int, log=print) -> Path:
    """Baseline full fine-tune of the tiny model from scratch, exported to p["pretrained"]."""
    from attanchor.train.checkpoint import load_module, render_settings_of
    from attanchor.train.cli import build_cli
    from attanchor.train.export import export_model

    if (p["pretrained"] / "config.json").exists():
        log(f"[demo] pre-trained model found: {p['pretrained']}")
        return p["pretrained"]
    if not (p["init"] / "config.json").exists():
        from attanchor.data.tiny import build_tiny_llava

        build_tiny_llava(p["init"], seed=0)
    log(f"[demo] pre-training the tiny model for {steps} steps (baseline, full fine-tune)")
    cli = build_cli(["fit", "--config", str(demo_recipes() / "pretrain.yaml"),
                     *_data_overrides(p), "--model.model_path", str(p["init"]),
                     "--trainer.max_steps", str(steps)])
    ckpt = Path(cli.trainer.checkpoint_callback.best_model_path or
                cli.trainer.checkpoint_callback.last_model_path)
    _finish_wandb()
    module = load_module(ckpt)
    from transformers import AutoProcessor

    export_model(module.hf_model, p["pretrained"], merge=False, anchor_config=None,
                 processor=AutoProcessor.from_pretrained(p["init"]),
                 render=render_settings_of(ckpt))
    return p["pretrained"]


def _finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


def run_demo(workdir: str | Path = ".", seeds: Sequence[int] = (0, 1),
             strategies: Sequence[str] = ("none", "text_into_image", "random"),
             pretrain_steps: int | None = None, adapt_steps: int | None = None,
             eval_limit: int | None = None, log=print) -> int:
    from attanchor.data.easyvqa import prepare_easy_vqa
    from attanchor.eval.compare import compare

    recipes = demo_recipes()
    if not (recipes / "anchored.yaml").is_file():
        raise FileNotFoundError(f"the demo recipes are not at {recipes}: the installation is "
                                "incomplete; reinstall attanchor")
    t0 = time.perf_counter()
    p = _paths(Path(workdir))
    log(f"[demo] preparing easy-vqa in {p['data']}")
    prepare_easy_vqa(p["data"])
    pretrain(p, pretrain_steps or PRETRAIN_STEPS, log)
    t1 = time.perf_counter()
    limit = eval_limit or EVAL_LIMIT
    res = compare(
        str(recipes / "anchored.yaml"), seeds=list(seeds), strategies=list(strategies),
        evals={"pope": str(p["data"] / "pope.jsonl"), "vqa": str(p["data"] / "vqa_test.json")},
        image_root=str(p["data"] / "images"), limit=limit,
        overrides=[*_data_overrides(p), "--model.model_path", str(p["pretrained"]),
                   "--trainer.max_steps", str(adapt_steps or ADAPT_STEPS)],
        log=log)
    t2 = time.perf_counter()
    log("")
    log(res["table"])
    log("")
    log(f"[demo] report: {res['paths']['report_md']} (+ report.png, metrics.json)")
    log(f"[demo] time: pre-training {t1 - t0:.0f} s, adaptation + evaluation {t2 - t1:.0f} s, "
        f"total {t2 - t0:.0f} s")
    return 0
