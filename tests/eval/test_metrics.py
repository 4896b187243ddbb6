"""Metric functions against hand-computed values."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from attanchor.eval.metrics import (
    normalize_answer,
    parse_yes_no,
    pope_correct,
    pope_metrics,
    question_scores,
    vqa_accuracy,
    vqa_scores,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # number word, trailing period, lowercase
        ("The Red-Ball", "red ball"),  # article; "-" not next to a space -> space
        ("red - ball", "red ball"),  # "-" next to a space -> deleted
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted
        ("yes, it is", "yes it is"),  # ", " -> comma deleted
        ("red/blue", "red blue"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("a.m.", "am"),
        ("Dont know", "don't know"),
        ("couldntve", "couldntve"),  # not in the official contraction table
        ("couldn'tve", "couldn't've"),
        ("don't", "don't"),  # the apostrophe is not punctuation
        ("  an  apple\tand\nten pears ", "apple and 10 pears"),
        ("None", "0"),
        ("well", "well"),  # a real word, not "we'll"
        ("What?!", "what"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@given(st.text(max_size=40))
def test_normalize_answer_is_idempotent(s: str) -> None:
    assume(s.count(".") <= 32)  # the official script deletes at most 32 periods per pass
    once = normalize_answer(s)
    assert normalize_answer(once) == once


def test_normalize_answer_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="expects a str"):
        normalize_answer(3)  # type: ignore[arg-type]


def test_vqa_accuracy_single_references() -> None:
    assert vqa_accuracy(["Two", "red"], ["2", "blue"]) == 0.5
    assert vqa_accuracy(["The circle."], ["circle"]) == 1.0


def test_vqa_accuracy_ten_human_answers_official() -> None:
    # m answers out of 10 equal "2"; leave-one-out average of min(others / 3, 1):
    # m=1: (9 * 1/3 + 1 * 0) / 10 = 0.3; m=2: (8*2/3 + 2*1/3)/10 = 0.6;
    # m=3: (7*1 + 3*2/3)/10 = 0.9; m=4: every subset keeps >= 3 matches -> 1.
    def refs(m: int) -> list[str]:
        return ["two"] * m + ["three"] * (10 - m)

    for m, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        assert vqa_accuracy(["2"], [refs(m)]) == pytest.approx(expected), m


def test_vqa_accuracy_ten_human_answers_simple() -> None:
    refs = ["2"] * 1 + ["3"] * 9
    assert vqa_accuracy(["2"], [refs], average_subsets=False) == pytest.approx(1 / 3)
    refs = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy(["2"], [refs], average_subsets=False) == 1.0
    # Mean over items: (1/3 + 0) / 2.
    assert vqa_accuracy(["2", "5"], [["2"] + ["3"] * 9, ["6"] * 10],
                        average_subsets=False) == pytest.approx(1 / 6)


def test_vqa_accuracy_bad_input() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        vqa_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="reference 0"):
        vqa_accuracy(["a"], [[]])
    with pytest.raises(ValueError, match="no predictions"):
        vqa_accuracy([], [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("yes", "yes"),
        ("No.", "no"),
        ("no", "no"),
        ("There is not a dog.", "no"),
        ("There isn't a dog", "no"),
        ("NO!", "no"),
        ("Yes. No other animals are there.", "yes"),  # first sentence only
        ("No, there is no dog", "no"),
        ("I see a dog", "yes"),  # POPE: anything without a negation is "yes"
        ("nothing", "yes"),  # only the words no/not/n't count
        ("", None),
        ("  ?! ", None),
    ],
)
def test_parse_yes_no(text: str, expected: str | None) -> None:
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("NO!", "yes"), ("No!", "yes"), ("There isn't a dog", "yes"), ("No, it is not", "no"),
     ("", "yes"), ("There is not.", "no")],
)
def test_parse_yes_no_pope_compatible(text: str, expected: str) -> None:
    assert parse_yes_no(text, pope_compatible=True) == expected


def test_pope_metrics_hand_computed() -> None:
    # labels:  y  y  y  y  n  n  n  n  y   n
    # answers: y  y  y  n  y  n  n  n  -   -      (- = unparsed)
    # tp=3 fn=1 fp=1 tn=3 unparsed=2 (one on a yes label, one on a no label); n=10
    preds = ["Yes", "yes, it is", "Yes.", "No", "yes", "no", "There is not", "no.", "", None]
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "yes", "no"]
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unparsed"], m["n"]) == (3, 1, 3, 1, 2, 10)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)  # 5 yes labels, the unparsed one is a miss
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["yes_ratio"] == pytest.approx(4 / 10)
    assert "per_category" not in m


def test_pope_metrics_per_category() -> None:
    preds = ["yes", "no", "yes", "yes", "no", "no"]
    labels = ["yes", "yes", "no", True, False, "No"]
    cats = ["random", "random", "random", "adversarial", "adversarial", "adversarial"]
    m = pope_metrics(preds, labels, cats)
    assert sorted(m["per_category"]) == ["adversarial", "random"]
    rnd = m["per_category"]["random"]  # tp=1 fn=1 fp=1
    assert (rnd["tp"], rnd["fn"], rnd["fp"], rnd["tn"]) == (1, 1, 1, 0)
    assert rnd["accuracy"] == pytest.approx(1 / 3)
    assert rnd["precision"] == pytest.approx(0.5)
    assert rnd["recall"] == pytest.approx(0.5)
    adv = m["per_category"]["adversarial"]  # all right
    assert (adv["accuracy"], adv["precision"], adv["recall"], adv["f1"]) == (1.0, 1.0, 1.0, 1.0)
    assert adv["yes_ratio"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_pope_metrics_no_yes_answers_gives_zero_precision() -> None:
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


def test_pope_metrics_bad_input() -> None:
    with pytest.raises(ValueError, match="label 1 is 'maybe'"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="1 categories for 2"):
        pope_metrics(["yes", "no"], ["yes", "no"], ["a"])
    with pytest.raises(ValueError, match="prediction 0 is 1"):
        pope_metrics([1], ["yes"])  # type: ignore[list-item]


# ------------------------------------------------- agreement with lmms-eval's implementations

# Hand-picked strings where VQA normalisations commonly differ: punctuation next to / away from
# spaces, digit-comma-digit, periods before digits, articles, number words, contractions (with
# and without apostrophes, capitalised, the table's oddities), possessives, whitespace.
TRICKY = [
    "Two dogs.", "The Red-Ball", "red - ball", "1,000", "1,,000 people", "yes, it is",
    "red,blue", "red/blue", "3.5", "3.5.", "a.m.", "e.g. cats", "Dont know", "couldntve",
    "couldn'tve", "couldnt've", "don't", "Im here", "Ive", "I'm", "somebody'd", "lets go",
    "let's", "twas", "ow's'at", "  an  apple\tand\nten pears ", "None", "none of the above",
    "well", "What?!", "What ?", "", "   ", "dog's bone", "the man's hat, the woman's bag",
    "(left)", "left (of the table)", "[2]", "x=1+2", "a_b", "C:\\path", "<b>bold</b>",
    "email@site", "`code`", "semi;colon", "semi ; colon", '"quoted"', "one two three four five",
    "six, seven, eight", "nine-ten", "zero.", "10.", "5 . 5", "It's red", "yes!!!", "No.",
    "A", "An", "THE END", "." * 40, "..5", "1,2,3", "$1,000.50", "50%", "Yes, 2",
]


def test_normalize_answer_matches_lmms_eval_on_tricky_strings() -> None:
    pytest.importorskip("lmms_eval")  # the `lmms` extra, part of `test`
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    proc = EvalAIAnswerProcessor()

    def lmms_vqav2(s: str) -> str:  # the steps of lmms_eval/tasks/vqav2/utils.py, in order
        s = s.replace("\n", " ").replace("\t", " ").strip()
        return proc.process_digit_article(proc.process_punctuation(s))

    assert len(TRICKY) >= 30
    ours = [normalize_answer(s) for s in TRICKY]
    assert ours == [lmms_vqav2(s) for s in TRICKY]
    assert [normalize_answer(s, eval_ai=True) for s in TRICKY] == [proc(s) for s in TRICKY]
    # A few of them by hand, so the comparison cannot pass by both sides being wrong alike.
    by_hand = dict(zip(TRICKY, ours, strict=True))
    assert by_hand["1,,000 people"] == "1000 people"
    assert by_hand["Im here"] == "im here"  # the table's key is "Im": never matches
    assert by_hand["somebody'd"] == "somebodyd"
    assert by_hand["." * 40] == "." * 8  # only 32 periods deleted (re.UNICODE as count)
    assert by_hand["$1,000.50"] == "$1000.50"
    assert normalize_answer("dog's bone", eval_ai=True) == "dog 's bone"
    assert normalize_answer("red,blue", eval_ai=True) == "redblue"


def _lmms_pope(preds: list[str], labels: list[str]) -> dict[str, float]:
    pytest.importorskip("lmms_eval")  # the `lmms` extra, part of `test`
    from lmms_eval.tasks.pope import utils as pope

    docs = [{"question_id": i, "answer": y} for i, y in enumerate(labels)]
    rows = [pope.pope_process_results(d, [p])["pope_accuracy"] for d, p in zip(docs, preds,
                                                                             strict=True)]
    return {"accuracy": pope.pope_aggregate_accuracy(rows),
            "precision": pope.pope_aggregate_precision(rows),
            "recall": pope.pope_aggregate_recall(rows),
            "f1": pope.pope_aggregate_f1_score(rows),
            "label_yes_ratio": pope.pope_aggregate_yes_ratio(rows)}


def test_pope_metrics_match_lmms_eval_per_sampling_setting() -> None:
    # 12 questions, 4 per setting; answers as lmms-eval needs them (yes/no, any case/space).
    labels = ["yes", "no", "yes", "no"] * 3
    preds = ["Yes", "no", "yes ", "yes",  # random: tp 2, fp 1, tn 1
             "no", "No", "yes", "no",  # popular: tp 1, fn 1, tn 2
             "yes", "yes", "YES", "yes"]  # adversarial: tp 2, fp 2
    cats = ["random"] * 4 + ["popular"] * 4 + ["adversarial"] * 4
    ours = pope_metrics(preds, labels, cats)
    keys = ("accuracy", "precision", "recall", "f1", "label_yes_ratio")
    for cat in ("random", "popular", "adversarial"):
        idx = [i for i, c in enumerate(cats) if c == cat]
        theirs = _lmms_pope([preds[i] for i in idx], [labels[i] for i in idx])
        assert {k: ours["per_category"][cat][k] for k in keys} == pytest.approx(theirs), cat
    assert {k: ours[k] for k in keys} == pytest.approx(_lmms_pope(preds, labels))
    # By hand (random): accuracy 3/4, precision 2/3, recall 1, f1 0.8, yes-ratio 3/4.
    rnd = ours["per_category"]["random"]
    assert (rnd["accuracy"], rnd["recall"], rnd["yes_ratio"]) == (0.75, 1.0, 0.75)
    assert rnd["precision"] == pytest.approx(2 / 3) and rnd["f1"] == pytest.approx(0.8)
    # POPE's yes-ratio is the share of yes *answers* (adversarial: 4/4); lmms-eval's
    # pope_yes_ratio is the share of yes labels (1/2): we report both, under their own names.
    assert ours["per_category"]["adversarial"]["yes_ratio"] == 1.0
    assert ours["per_category"]["adversarial"]["label_yes_ratio"] == 0.5


def test_per_question_scores_average_to_the_accuracies() -> None:
    preds = ["Yes, there is.", "no", None, "There isn't"]
    labels = ["yes", "yes", "no", "no"]
    assert pope_correct(preds, labels) == [1.0, 0.0, 0.0, 1.0]
    assert sum(pope_correct(preds, labels)) / 4 == pope_metrics(preds, labels)["accuracy"]
    assert question_scores("vqa", ["2", "red"], [["two"] * 2 + ["3"] * 8, "Red."]) == \
        pytest.approx([0.6, 1.0])
    assert vqa_scores(["Two", "red"], ["2", "blue"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="task='gqa'"):
        question_scores("gqa", ["a"], ["a"])
