"""The lmms-eval plugin: prompt/candidate building, anchored answers, and the harness itself.

The first tests need no lmms-eval. The harness tests run only where lmms-eval imports (it is an
optional dependency: see attanchor/eval/lmms_plugin.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import textwrap

import pytest
import torch
from PIL import Image

from attanchor.anchoring.config import AnchorConfig
from attanchor.data.tiny import build_tiny_llava
from attanchor.eval import lmms_plugin as lp

VOCAB = ["user", ":", "assistant", "is", "there", "a", "red", "blue", "shape", "?", "yes", "no"]
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
RED, BLUE = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = build_tiny_llava(tmp_path_factory.mktemp("ckpt"), vocab=VOCAB, seed=0)
    cfg = AnchorConfig(strategy="text_into_image", threshold=-1.0)  # every candidate anchors
    (path / "anchor_config.json").write_text(json.dumps(cfg.to_dict()))
    return path


def _words(processor, ids, mask):
    return processor.tokenizer.convert_ids_to_tokens(ids[mask].tolist())


def test_candidates_are_the_user_words(ckpt):
    _, proc = lp.load_anchored_checkpoint(ckpt)
    inp = lp.prompt_inputs(proc, ["Is there a red shape?", "red?"], [[RED], [BLUE]])
    ids, att, cand = inp["input_ids"], inp["attention_mask"], inp["candidate_mask"]
    # Row 0: <s> USER : 64 x <image> is there a red shape ? ASSISTANT :  -> 75 tokens.
    assert ids.shape == (2, 75) and inp["pixel_values"].shape == (2, 3, 64, 64)
    assert _words(proc, ids[0], cand[0]) == ["is", "there", "a", "red", "shape", "?"]
    assert cand[0].nonzero().flatten().tolist() == [67, 68, 69, 70, 71, 72]
    # Row 1 has 4 words fewer: 4 pads on the left, never candidates.
    assert _words(proc, ids[1], cand[1]) == ["red", "?"]
    assert att[1, :4].tolist() == [0, 0, 0, 0] and att[1, 4:].all() and att[0].all()
    assert cand[1, :4].sum() == 0
    assert (ids[cand] != proc.image_token_id).all()


def test_explicit_placeholder_inside_the_text(ckpt):
    _, proc = lp.load_anchored_checkpoint(ckpt)
    inp = lp.prompt_inputs(proc, ["is there a <image>\nred shape?"], [[RED]])
    ids, cand = inp["input_ids"][0], inp["candidate_mask"][0]
    # Rendered as training renders it (the Renderer, the model's own template: images first,
    # HF's content-parts order): <s> user : | 64 image tokens | is there a red shape ? ...
    assert _words(proc, ids, cand) == ["is", "there", "a", "red", "shape", "?"]
    assert cand.nonzero().flatten().tolist() == [67, 68, 69, 70, 71, 72]
    with pytest.raises(ValueError, match="1 <image> placeholders but the request brings 2"):
        lp.prompt_inputs(proc, ["<image> red?"], [[RED, BLUE]])
    with pytest.raises(ValueError, match="PIL images"):
        lp.prompt_inputs(proc, ["red?"], [["video.mp4"]])


def test_none_strategy_equals_hf_greedy(ckpt):
    vlm, proc = lp.load_anchored_checkpoint(ckpt, strategy="none")
    contexts, images = ["Is there a red shape?", "blue?"], [[RED], [BLUE]]
    got = lp.generate_answers(vlm, proc, contexts, images, {"max_new_tokens": 4})
    inp = lp.prompt_inputs(proc, contexts, images)
    ref = vlm.model.generate(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"],
                             attention_mask=inp["attention_mask"], max_new_tokens=4,
                             do_sample=False)
    want = proc.tokenizer.batch_decode(ref[:, inp["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
    assert got == [w.strip() for w in want]


def test_anchored_answers_anchor_every_candidate(ckpt):
    vlm, proc = lp.load_anchored_checkpoint(ckpt)  # threshold -1: all candidates anchor
    answers = lp.generate_answers(vlm, proc, ["Is there a red shape?", "red?"], [[RED], [BLUE]],
                                  {"max_new_tokens": 3, "until": ["?"]})
    assert len(answers) == 2 and all(isinstance(a, str) and "?" not in a for a in answers)
    assert vlm.last_anchor_counts.tolist() == [6, 2]  # the candidates counted above


def test_anchored_answer_for_a_single_unpadded_prompt(ckpt):
    vlm, proc = lp.load_anchored_checkpoint(ckpt)
    assert len(lp.generate_answers(vlm, proc, ["red?"], [[RED]], {"max_new_tokens": 2})) == 1


def test_loglikelihood_none_equals_manual(ckpt):
    vlm, proc = lp.load_anchored_checkpoint(ckpt, strategy="none")
    got, _ = lp.continuation_loglikelihood(vlm, proc, "Is there a red shape?", " red shape", [RED])
    inp = lp.prompt_inputs(proc, ["Is there a red shape?"], [[RED]], continuations=[" red shape"])
    assert _words(proc, inp["input_ids"][0], inp["continuation_mask"][0]) == ["red", "shape"]
    with torch.no_grad():
        logits = vlm.model(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"],
                           attention_mask=inp["attention_mask"]).logits[0].float()
    ids = inp["input_ids"][0]
    # The Renderer closes the answer with "</s>" (training's end of turn), not scored here:
    # "... assistant : red shape </s>" -> the continuation is at -3, -2.
    assert int(ids[-1]) == proc.tokenizer.eos_token_id
    assert inp["continuation_mask"][0].nonzero().flatten().tolist() == [len(ids) - 3, len(ids) - 2]
    logp = torch.log_softmax(logits, -1)
    want = float(logp[-4, ids[-3]] + logp[-3, ids[-2]])
    assert got == pytest.approx(want, abs=1e-5)


def test_loglikelihood_greedy_flag_matches_anchored_generation(ckpt):
    vlm, proc = lp.load_anchored_checkpoint(ckpt)
    inp = lp.prompt_inputs(proc, ["Is there a red shape?", "red?"], [[RED], [BLUE]])
    first = vlm.generate(inp["input_ids"], inp["pixel_values"], inp["attention_mask"],
                         candidate_mask=inp["candidate_mask"], max_new_tokens=1, do_sample=False)
    word = proc.tokenizer.convert_ids_to_tokens(int(first[0, 0]))
    other = next(w for w in VOCAB[3:] if w != word)
    ll_greedy, is_greedy = lp.continuation_loglikelihood(vlm, proc, "Is there a red shape?",
                                                         f" {word}", [RED])
    ll_other, not_greedy = lp.continuation_loglikelihood(vlm, proc, "Is there a red shape?",
                                                         f" {other}", [RED])
    assert is_greedy and not not_greedy
    assert math.isfinite(ll_other) and ll_greedy >= ll_other


def test_load_checkpoint_errors_and_overrides(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lp.load_anchored_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="anchor_config.json is missing"):
        lp.load_anchored_checkpoint(tmp_path)
    vlm, _ = lp.load_anchored_checkpoint(ckpt, threshold="none", top_fraction=0.5, dtype="float32")
    assert vlm.config == AnchorConfig(strategy="text_into_image", threshold=None, top_fraction=0.5)
    with pytest.raises(ValueError, match="dtype='float99'"):
        lp.load_anchored_checkpoint(ckpt, dtype="float99")


@pytest.mark.skipif(HAS_LMMS, reason="lmms-eval is installed here")
def test_clear_import_error_without_lmms_eval():
    with pytest.raises(ImportError, match="needs lmms-eval"):
        from attanchor.eval.lmms_plugin import AnchoredLlava  # noqa: F401


# ------------------------------------------------------------- through lmms-eval's own interface

DOCS = [  # pairs differ in length, so every batch of 2 is left-padded
    {"question_id": 0, "color": "red", "question": "is there a red shape?", "answer": "yes"},
    {"question_id": 1, "color": "blue", "question": "red?", "answer": "no"},
    {"question_id": 2, "color": "red", "question": "is there a blue shape?", "answer": "no"},
    {"question_id": 3, "color": "blue", "question": "blue shape?", "answer": "yes"},
]


def _visual(doc):
    return [Image.new("RGB", (64, 64), doc["color"])]


def test_instances_built_like_the_harness(ckpt):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance

    from attanchor.eval.lmms_plugin import AnchoredLlava

    model = AnchoredLlava(pretrained=str(ckpt), device="cpu", batch_size=2, max_new_tokens=3)
    model.task_dict = {"local": {"test": DOCS}}
    gen = {"max_new_tokens": 3, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    reqs = [Instance(request_type="generate_until", idx=0,
                     arguments=(d["question"], dict(gen), _visual, i, "local", "test"),
                     metadata={"task": "local", "doc_id": i, "repeats": 1})
            for i, d in enumerate(DOCS)]
    answers = model.generate_until(reqs)
    for k in (0, 2):  # the plugin batches requests in order, two at a time
        want = lp.generate_answers(model.vlm, model.processor,
                                   [DOCS[k]["question"], DOCS[k + 1]["question"]],
                                   [_visual(DOCS[k]), _visual(DOCS[k + 1])], gen, 3)
        assert answers[k:k + 2] == want
    ll_req = Instance(request_type="loglikelihood", idx=0,
                      arguments=(DOCS[0]["question"], " yes", _visual, 0, "local", "test"),
                      metadata={"task": "local", "doc_id": 0, "repeats": 1})
    (ll, greedy), = model.loglikelihood([ll_req])
    assert (ll, greedy) == lp.continuation_loglikelihood(model.vlm, model.processor,
                                                         DOCS[0]["question"], " yes", _visual(DOCS[0]))


def test_local_task_through_simple_evaluate(ckpt, tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from attanchor.eval.lmms_plugin import AnchoredLlava, register_with_lmms_eval

    task_dir = tmp_path / "task"
    task_dir.mkdir()
    rows = []
    for d in DOCS:
        image = tmp_path / f"{d['question_id']}.png"
        Image.new("RGB", (64, 64), d["color"]).save(image)
        rows.append({**d, "image": str(image)})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "utils.py").write_text(textwrap.dedent("""
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]

        def doc_to_text(doc):
            return doc["question"]

        def process_results(doc, results):
            return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
    """))
    (task_dir / "attanchor_local.yaml").write_text(textwrap.dedent(f"""
        task: attanchor_local
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 3
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
    """))
    tm = TaskManager(include_path=str(task_dir))
    model = AnchoredLlava(pretrained=str(ckpt), device="cpu", batch_size=2)
    out = simple_evaluate(model=model, tasks=["attanchor_local"], task_manager=tm,
                          log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["attanchor_local"], key=lambda s: s["doc_id"])
    got = [s["filtered_resps"][0] for s in samples]
    vlm, proc = lp.load_anchored_checkpoint(ckpt)  # the harness freed the model's modules
    want = []
    for k in (0, 2):
        want += lp.generate_answers(vlm, proc,
                                    [DOCS[k]["question"], DOCS[k + 1]["question"]],
                                    [_visual(DOCS[k]), _visual(DOCS[k + 1])],
                                    {"max_new_tokens": 3, "temperature": 0, "do_sample": False})
    assert got == want
    score = out["results"]["attanchor_local"]["exact_match,none"]
    assert score == pytest.approx(sum(g == d["answer"] for g, d in zip(got, DOCS)) / 4)

    # By name, as `--model anchored_llava --model_args pretrained=...,strategy=none` does.
    register_with_lmms_eval()
    out = simple_evaluate(model="anchored_llava", model_args=f"pretrained={ckpt},strategy=none",
                          tasks=["attanchor_local"], task_manager=tm, batch_size=1,
                          device="cpu", log_samples=True, bootstrap_iters=0)
    assert 0.0 <= out["results"]["attanchor_local"]["exact_match,none"] <= 1.0
    assert len(out["samples"]["attanchor_local"]) == 4
