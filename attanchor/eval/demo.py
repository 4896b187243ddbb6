"""`attanchor demo`: the whole product on the built-in scenes world, on a CPU, in minutes.

LLaVA's two stages on question kinds the stages do not share, so the adaptation has real work:

1. draw the scenes world (``attanchor.data.scenes``: several objects per 64x64 image) with two
   stage files: ``pretrain/`` holds existence, size, relation and counting questions,
   ``adapt/`` attribute binding ("what color is the triangle?", "what shape is the red
   object?"), which pre-training never asks and no answer prior solves: the adapted model
   has to look at the object the question names;
2. build the tiny LLaVA from config (tokenizer over the world's words) and pre-train it on
   ``pretrain/`` (full fine-tune, no anchoring), exported as a Hugging Face directory: the
   "existing checkpoint" that the paper LoRA-adapts;
3. compare LoRA adaptation on ``adapt/`` with ``none``, ``text_into_image`` and ``random``
   over 2 seeds (``--strategies`` adds ``image_into_text`` with pause tokens or ``append``),
   each evaluated on the adaptation kinds (``vqa``: adapt/test.json) and the POPE file; the
   pre-trained checkpoint is evaluated too, unadapted, as the ``pretrained`` reference row;
4. print the report's table and the acceptance lines: adaptation vs the pre-trained row, and
   how many predictions differ between arms (report.md / report.png / metrics.json beside).

Every step is skipped when its output exists, so a second run only re-prints the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attanchor.train.logging_faults import finish_wandb
from attanchor.train.recipe import recipes_dir

# Sized for under 10 minutes on 2 CPU cores (measured in the README).
PRETRAIN_STEPS = 1500
ADAPT_STEPS = 300
EVAL_LIMIT = 400
# LLaVA's two stages as question kinds (attanchor.data.scenes.QUESTION_KINDS).
# Adapting on attribute binding: measured, the arms learn beyond the answer priors and the
# design's minimum detectable effect is under 2 points (README); relation/count adaptation
# (`--pretrain-kinds exist,color,shape,size --adapt-kinds relation,count`) learns priors only.
STAGES = {"pretrain": ("exist", "size", "relation", "count"), "adapt": ("color", "shape")}


def demo_recipes() -> Path:
    """The demo's recipes (anchored.yaml, pretrain.yaml, ...): shipped in the package, so the
    demo runs from any directory of a wheel install as well as from a checkout."""
    return recipes_dir() / "demo"


def _paths(workdir: Path, stages: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """Where the demo writes; another split of the kinds gets its own data, model and runs
    (suffix "-pre-<kinds>-adapt-<kinds>"), so two splits never mix in one directory."""
    stages = stages or STAGES
    tag = "" if stages == STAGES else \
        f"-pre-{'-'.join(stages['pretrain'])}-adapt-{'-'.join(stages['adapt'])}"
    return {"data": workdir / "data" / f"scenes{tag}",
            "init": workdir / "models" / "tiny-init-scenes",
            "pretrained": workdir / "models" / f"tiny-scenes{tag}", "runs": workdir / f"runs{tag}",
            "stages": stages}


def _data_overrides(p: dict[str, Path], stage: str) -> list[str]:
    d = p["data"]
    return ["--data.train_file", str(d / stage / "train.json"),
            "--data.val_file", str(d / stage / "val.json"),
            "--data.test_file", str(d / stage / "test.json"),
            "--data.image_root", str(d / "images"), "--run.root", str(p["runs"])]


def pretrain(p: dict[str, Any], steps: int, log=print) -> Path:
    """Baseline full fine-tune of the tiny model from scratch, exported to p["pretrained"]."""
    from attanchor.anchoring import AnchorConfig
    from attanchor.train.checkpoint import load_module, render_settings_of
    from attanchor.train.cli import build_cli
    from attanchor.train.export import export_model

    if (p["pretrained"] / "config.json").exists():
        log(f"[demo] pre-trained model found: {p['pretrained']}")
        return p["pretrained"]
    if not (p["init"] / "config.json").exists():
        from attanchor.data.scenes import scenes_vocab
        from attanchor.data.tiny import build_tiny_llava

        build_tiny_llava(p["init"], vocab=scenes_vocab(), seed=0)
    log(f"[demo] pre-training the tiny model for {steps} steps on "
        f"{', '.join(p['stages']['pretrain'])}"
        " questions (baseline, full fine-tune)")
    cli = build_cli(["fit", "--config", str(demo_recipes() / "pretrain.yaml"),
                     *_data_overrides(p, "pretrain"), "--model.model_path", str(p["init"]),
                     "--trainer.max_steps", str(steps)])
    finish_wandb()
    if cli.trainer.global_step < steps:  # stopped early (pre-empted, interrupted): no export
        raise RuntimeError(f"pre-training stopped at step {cli.trainer.global_step} of {steps};"
                           f" {p['pretrained']} was not written. Run `attanchor demo` again.")
    ckpt = Path(cli.trainer.checkpoint_callback.best_model_path or
                cli.trainer.checkpoint_callback.last_model_path)
    module = load_module(ckpt)
    from transformers import AutoProcessor

    # Trained as a baseline: its anchor config says so, so evaluation never has to guess.
    export_model(module.hf_model, p["pretrained"], merge=False,
                 anchor_config=AnchorConfig(strategy="none"),
                 processor=AutoProcessor.from_pretrained(p["init"]),
                 render=render_settings_of(ckpt))
    return p["pretrained"]


def _question_form(record: dict) -> str:
    """The question's first two words ("how many", "is the", "what color"): its kind."""
    text = record["conversations"][0]["value"].replace("<image>", "").strip()
    return " ".join(text.split()[:2])


def prior_only(train_json: str | Path, test_json: str | Path, limit: int | None
               ) -> tuple[float, dict[str, str]]:
    """The accuracy of answering without looking: every test question (the first ``limit``,
    as evaluated) gets the most frequent train answer of its form (``_question_form``).

    Returns (accuracy, {form: that answer}). An adapted arm that scores no better has learned
    the answer priors of the new kinds, not to look. Example: if "how many" is answered "one"
    in 68% of the train questions and the test questions mirror them, counting alone scores
    about 0.68 this way.
    """
    from collections import Counter

    from attanchor.eval.metrics import question_scores

    by_form: dict[str, Counter] = {}
    for r in json.loads(Path(train_json).read_text()):
        by_form.setdefault(_question_form(r), Counter())[r["conversations"][1]["value"]] += 1
    majority = {f: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for f, c in by_form.items()}
    test = json.loads(Path(test_json).read_text())
    test = test[:limit] if limit else test
    preds = [majority.get(_question_form(r), "") for r in test]
    scores = question_scores("vqa", preds, [r["conversations"][1]["value"] for r in test])
    return sum(scores) / len(scores), majority


def acceptance(res: dict, metric: str = "vqa/accuracy", task: str = "vqa",
               margin_sds: float = 3.0) -> tuple[list[str], bool]:
    """The demo's acceptance lines from ``compare``'s result, and whether both hold.

    1. Adaptation learns: for every arm, its mean ``metric`` minus the ``pretrained`` row's is
       positive, larger than ``margin_sds`` times the largest sd over seeds of any arm (seed
       spread), and the cluster-bootstrap interval vs ``pretrained`` (seeds x questions)
       excludes 0.
    2. Arms differ: some pair of adapted arms gives different predictions on ``task``.
    Example line: "none: +0.6125 over pretrained (0.0225 -> 0.6350); seed sd 0.0120, margin
    = 51.0 sd; cluster 95% CI [+0.56, +0.66]".
    """
    from attanchor.eval.compare import REFERENCE

    per_arm = res["summary"]["metrics"].get(metric)
    if per_arm is None or REFERENCE not in per_arm:
        return [f"acceptance: no {metric} or no {REFERENCE} row: cannot judge"], False
    ref = per_arm[REFERENCE]["mean"]
    arms = [a for a in per_arm if a != REFERENCE]
    spread = max((per_arm[a]["sd"] or 0.0) for a in arms) if arms else 0.0
    lines, learns = [f"acceptance 1, adaptation learns ({metric} vs the {REFERENCE} row, seed "
                     f"spread = largest sd over seeds {spread:.4f}):"], bool(arms)
    for a in arms:
        gain = per_arm[a]["mean"] - ref
        cluster = res["per_question_reference"].get(task, {}).get(a, {}).get("cluster")
        ci = "-" if cluster is None else f"[{cluster['ci_low']:+.4f}, {cluster['ci_high']:+.4f}]"
        margin = f"{gain / spread:.1f} sd" if spread > 0 else "n/a (sd 0 or 1 seed)"
        ok = gain > 0 and (spread == 0 or gain > margin_sds * spread) and \
            cluster is not None and cluster["ci_low"] > 0
        learns &= ok
        lines.append(f"  {a}: {gain:+.4f} over {REFERENCE} ({ref:.4f} -> "
                     f"{per_arm[a]['mean']:.4f}); margin {margin}; cluster CI {ci}: "
                     + ("yes" if ok else "NO"))
    pairs = {k: v for k, v in res["differences"].get(task, {}).items() if REFERENCE not in k}
    differ = any(d > 0 for by_seed in pairs.values() for d, _ in by_seed.values())
    lines.append(f"acceptance 2, arms give different predictions ({task}, same seed, same "
                 "questions):")
    lines += [f"  {k}: " + ", ".join(f"seed {s} {d}/{n}" for s, (d, n) in v.items())
              for k, v in pairs.items()]
    lines.append("  " + ("yes" if differ else "NO: every pair of arms answers alike"))
    return lines, learns and differ


def run_demo(workdir: str | Path = ".", seeds: Sequence[int] = (0, 1),
             strategies: Sequence[str] = ("none", "text_into_image", "random"),
             pretrain_steps: int | None = None, adapt_steps: int | None = None,
             eval_limit: int | None = None, pause_tokens: int | None = None,
             pretrain_kinds: Sequence[str] | None = None,
             adapt_kinds: Sequence[str] | None = None, log=print) -> int:
    """The demo (module docstring); returns 0 (the acceptance verdict is printed, not
    enforced: the demo reports what it measured, whatever that is). ``pretrain_kinds`` /
    ``adapt_kinds`` replace ``STAGES``' split of the question kinds."""
    from attanchor.data.scenes import prepare_scenes
    from attanchor.eval.compare import compare

    recipes = demo_recipes()
    if not (recipes / "anchored.yaml").is_file():
        raise FileNotFoundError(f"the demo recipes are not at {recipes}: the installation is "
                                "incomplete; reinstall attanchor")
    t0 = time.perf_counter()
    stages = {"pretrain": tuple(pretrain_kinds or STAGES["pretrain"]),
              "adapt": tuple(adapt_kinds or STAGES["adapt"])}
    p = _paths(Path(workdir), stages)
    log(f"[demo] preparing the scenes world in {p['data']} (pre-training kinds: "
        f"{', '.join(stages['pretrain'])}; adaptation kinds: {', '.join(stages['adapt'])})")
    prepare_scenes(p["data"], stages=stages, progress=False)
    pretrain(p, pretrain_steps or PRETRAIN_STEPS, log)
    t1 = time.perf_counter()
    limit = eval_limit or EVAL_LIMIT
    d = p["data"]
    res = compare(
        str(recipes / "anchored.yaml"), seeds=list(seeds), strategies=list(strategies),
        evals={"pope": str(d / "pope.jsonl"), "vqa": str(d / "adapt" / "test.json")},
        image_root=str(d / "images"), limit=limit, reference=str(p["pretrained"]),
        pause_tokens=pause_tokens,
        overrides=[*_data_overrides(p, "adapt"), "--model.model_path", str(p["pretrained"]),
                   "--trainer.max_steps", str(adapt_steps or ADAPT_STEPS)],
        log=log)
    t2 = time.perf_counter()
    log("")
    log(f"vqa = the adaptation kinds ({', '.join(stages['adapt'])}; adapt/test.json), pope = "
        "existence, a pre-training kind; pretrained = the checkpoint before adaptation")
    log(res["table"])
    log("")
    lines, ok = acceptance(res)
    for line in lines:
        log(line)
    prior, majority = prior_only(d / "adapt" / "train.json", d / "adapt" / "test.json", limit)
    best = max(res["summary"]["metrics"]["vqa/accuracy"][a]["mean"] for a in res["results"])
    log(f"answering without looking ({', '.join(f'{f!r}: {a!r}' for f, a in majority.items())},"
        f" the most frequent train answers) scores {prior:.4f} on these vqa questions; the "
        f"best row scores {best:.4f}: " + ("the adaptation learned more than the answer "
                                          "priors" if best > prior + 0.02 else
                                          "the adaptation learned the answer priors, not to "
                                          "look"))
    log(f"[demo] acceptance: {'met' if ok else 'NOT met'}")
    log(f"[demo] report: {res['paths']['report_md']} (+ report.png, metrics.json)")
    log(f"[demo] time: data + pre-training {t1 - t0:.0f} s, adaptation + evaluation "
        f"{t2 - t1:.0f} s, total {t2 - t0:.0f} s")
    return 0
