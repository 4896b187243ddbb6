"""The demo's acceptance lines (hand-built comparison results) and, slow, the whole demo with
tiny step counts: the scenes world's two stages, the pretrained row, the paper's variant."""

from __future__ import annotations

import json

import pytest
import yaml

from attanchor.eval.demo import STAGES, _paths, acceptance, prior_only, run_demo
from attanchor.eval.report import summarize_arms


def _res(none=(0.6, 0.62), random=(0.58, 0.6), differ=(3, 0), ci_low=0.4):
    results = {"pretrained": {0: {"vqa/accuracy": 0.1}, 1: {"vqa/accuracy": 0.1}},
               "none": {s: {"vqa/accuracy": v} for s, v in enumerate(none)},
               "random": {s: {"vqa/accuracy": v} for s, v in enumerate(random)}}
    cluster = {"mean_diff": 0.5, "ci_low": ci_low, "ci_high": 0.6}
    return {"summary": summarize_arms(results, "none"),
            "per_question_reference": {"vqa": {"none": {"cluster": cluster},
                                               "random": {"cluster": cluster}}},
            "differences": {"vqa": {"pretrained vs none": {"0": (50, 60)},
                                    "none vs random": {"0": (differ[0], 60),
                                                       "1": (differ[1], 60)}}}}


def test_acceptance_lines_when_both_hold():
    lines, ok = acceptance(_res())
    assert ok
    assert lines == [
        "acceptance 1, adaptation learns (vqa/accuracy vs the pretrained row, seed spread = "
        "largest sd over seeds 0.0141):",
        "  none: +0.5100 over pretrained (0.1000 -> 0.6100); margin 36.1 sd; cluster CI "
        "[+0.4000, +0.6000]: yes",
        "  random: +0.4900 over pretrained (0.1000 -> 0.5900); margin 34.6 sd; cluster CI "
        "[+0.4000, +0.6000]: yes",
        "acceptance 2, arms give different predictions (vqa, same seed, same questions):",
        "  none vs random: seed 0 3/60, seed 1 0/60",
        "  yes"]


@pytest.mark.parametrize("kw, failing", [
    ({"differ": (0, 0)}, "  NO: every pair of arms answers alike"),
    ({"ci_low": -0.01}, "  none: +0.5100 over pretrained (0.1000 -> 0.6100); margin 36.1 sd; "
                        "cluster CI [-0.0100, +0.6000]: NO"),
    # a gain of 0.03 with seeds 0.1 apart: inside the seed spread
    ({"none": (0.08, 0.18)}, "  none: +0.0300 over pretrained (0.1000 -> 0.1300); margin "
                             "0.4 sd; cluster CI [+0.4000, +0.6000]: NO")])
def test_acceptance_fails_loudly_on_each_condition(kw, failing):
    lines, ok = acceptance(_res(**kw))
    assert not ok and failing in lines


@pytest.mark.slow
def test_demo_with_tiny_steps_runs_both_stages_and_the_papers_variant(tmp_path):
    logs: list[str] = []
    assert run_demo(tmp_path, seeds=[0], strategies=["none", "image_into_text"],
                    pretrain_steps=2, adapt_steps=2, eval_limit=4, pause_tokens=2,
                    log=logs.append) == 0
    data, runs = tmp_path / "data" / "scenes", tmp_path / "runs"
    meta = json.loads((data / "meta.json").read_text())
    assert meta["args"]["stages"] == {k: list(v) for k, v in STAGES.items()}
    # Pre-training saw only its kinds; the arms adapted on the others.
    pre = yaml.safe_load((runs / "demo-pretrain" / "none-seed0" / "config.yaml").read_text())
    assert pre["data"]["train_file"] == str(data / "pretrain" / "train.json")
    arm = yaml.safe_load((runs / "demo" / "image_into_text-seed0" / "config.yaml").read_text())
    assert arm["data"]["train_file"] == str(data / "adapt" / "train.json")
    assert arm["model"]["anchor"]["strategy"] == "image_into_text"
    assert arm["model"]["anchor"]["pause_tokens"] == 2
    base = yaml.safe_load((runs / "demo" / "none-seed0" / "config.yaml").read_text())
    assert base["model"]["anchor"]["pause_tokens"] == 0
    saved = json.loads((runs / "demo" / "metrics.json").read_text())
    assert set(saved["results"]) == {"pretrained", "none", "image_into_text"}
    assert saved["reference"] == "pretrained"
    assert (runs / "demo" / "pretrained" / "eval" / "vqa" / "predictions.jsonl").is_file()
    assert any(line.startswith("acceptance 1, adaptation learns") for line in logs)
    assert any(line.startswith("[demo] acceptance: ") for line in logs)


def _rec(question, answer):
    return {"id": question, "image": "x.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def test_prior_only_answers_each_form_with_its_most_frequent_train_answer(tmp_path):
    train = [_rec("how many circles are there?", "one"), _rec("how many squares are there?",
                                                             "one"),
             _rec("how many stars are there?", "two"), _rec("is the circle left of the square?",
                                                           "yes"),
             _rec("is the square above the circle?", "no")]  # a tie: "no" < "yes"
    test = [_rec("how many circles are there?", "one"), _rec("how many squares are there?",
                                                            "three"),
            _rec("is the circle above the square?", "no"), _rec("what color is it?", "red")]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    acc, majority = prior_only(tmp_path / "train.json", tmp_path / "test.json", None)
    assert majority == {"how many": "one", "is the": "no"}
    assert acc == 2 / 4  # "one" right once, "no" right once, an unseen form never
    assert prior_only(tmp_path / "train.json", tmp_path / "test.json", 1)[0] == 1.0


def test_another_split_of_the_kinds_gets_its_own_directories(tmp_path):
    assert _paths(tmp_path)["data"] == tmp_path / "data" / "scenes"
    other = _paths(tmp_path, {"pretrain": ("exist", "count"), "adapt": ("color", "shape")})
    assert other["data"] == tmp_path / "data" / "scenes-pre-exist-count-adapt-color-shape"
    assert other["pretrained"] == tmp_path / "models" / \
        "tiny-scenes-pre-exist-count-adapt-color-shape"
    assert other["runs"] == tmp_path / "runs-pre-exist-count-adapt-color-shape"
    # Two splits sharing their adaptation kinds still get two directories.
    same_adapt = _paths(tmp_path, {"pretrain": ("exist",), "adapt": ("color", "shape")})
    assert same_adapt["data"] != other["data"]


def test_the_papers_variant_is_one_flag_away_in_compare_and_demo(capsys):
    from attanchor.eval.cli import PAUSE_TOKENS, main, parser

    args = parser().parse_args(["demo", "--strategies", "none,image_into_text,append",
                                "--adapt-kinds", "color,shape"])
    assert args.strategies == ["none", "image_into_text", "append"]
    assert args.pause_tokens == PAUSE_TOKENS == 4 and args.adapt_kinds == ["color", "shape"]
    args = parser().parse_args(["compare", "--config", "r.yaml", "--strategies",
                                "none,image_into_text", "--pause-tokens", "2", "--reference",
                                "models/tiny-scenes"])
    assert (args.pause_tokens, args.reference) == (2, "models/tiny-scenes")
    # An unknown arm is refused before anything trains, naming it.
    assert main(["compare", "--config", "r.yaml", "--pope", "p.jsonl", "--strategies",
                 "none,image_to_text"]) == 2
    assert "unknown strategies ['image_to_text']" in capsys.readouterr().err
