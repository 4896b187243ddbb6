"""Metric functions against hand-computed values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attanchor.eval.metrics import normalize_answer, parse_yes_no, pope_metrics, vqa_accuracy


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
        ("couldntve", "couldn't've"),
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
