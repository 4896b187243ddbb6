"""Answer metrics: VQA accuracy with the VQA answer normalisation, and POPE's yes/no metrics.

All functions are pure and return fractions in [0, 1] (not percentages).

VQA normalisation (the rules of the official VQA evaluation, applied in this order):
  1. newlines and tabs become spaces; surrounding whitespace is stripped;
  2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: when the character stands next to
     a space anywhere in the answer, or the answer holds a digit-comma-digit group ("1,000"),
     the character is deleted; otherwise it becomes a space ("red/blue" -> "red blue");
  3. a period is deleted unless a digit follows it ("3.5" stays, "yes." -> "yes");
  4. lowercase, split on whitespace; number words "none", "zero" .. "ten" become digits;
     the articles "a", "an", "the" are dropped; an apostrophe-less contraction gets its
     apostrophes back ("dont" -> "don't", "couldntve" -> "couldn't've");
  5. the words are joined with single spaces.
The apostrophe itself is not punctuation here ("don't" stays as it is), as in the official script.

POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models") turns a
free-form answer into yes/no like this: keep the text before the first period, delete commas,
split on spaces; the answer is "no" when one of the words is "No", "no" or "not", else "yes".
``parse_yes_no`` applies that rule with three fixes that only matter for answers POPE's script
misreads: words are compared lowercased and with surrounding punctuation removed ("NO!" is no),
and negated contractions ("isn't", "don't", ...) count as "not". An answer with no letters or
digits at all (empty, whitespace, punctuation only) gives None: there is nothing to read.
``parse_yes_no(text, pope_compatible=True)`` is POPE's rule exactly (never None), for comparing
with published numbers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations
from typing import Any

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions whose apostrophe-free spelling is not itself an English word ("well", "ill",
# "were", "its", "shed", "lets" are: "we'll", "i'll", "we're", "it's", "she'd", "let's" are
# left out).
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't",
    "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd",
    "how'll", "how's", "i'd've", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "ma'am",
    "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't", "not've",
    "o'clock", "oughtn't", "shan't", "she'd've", "should've", "shouldn't", "shouldn't've",
    "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's",
    "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're",
    "they've", "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's",
    "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll",
    "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're",
    "you've",
)


def _contraction_map() -> dict[str, str]:
    """Every spelling of a contraction with some of its apostrophes dropped -> the full form.

    "couldn't've" gives "couldnt've", "couldn'tve" and "couldntve"; the full form maps to itself.
    """
    table: dict[str, str] = {}
    for full in _CONTRACTIONS:
        spots = [i for i, ch in enumerate(full) if ch == "'"]
        for k in range(1, len(spots) + 1):
            for dropped in combinations(spots, k):
                table["".join(ch for i, ch in enumerate(full) if i not in dropped)] = full
    return table


_CONTRACTION_MAP = _contraction_map()


def normalize_answer(s: str) -> str:
    """Normalise an answer the way the VQA evaluation does (module docstring, steps 1-5).

    Invariant: idempotent (normalize_answer(normalize_answer(s)) == normalize_answer(s)).
    Examples: "Two dogs." -> "2 dogs"; "The Red-Ball" -> "red ball"; "1,000" -> "1000";
    "yes, it is" -> "yes it is"; "Dont know" -> "don't know"; "3.5" -> "3.5".
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer expects a str, got {type(s).__name__}: {s!r}")
    text = s.replace("\n", " ").replace("\t", " ").strip()
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTION_MAP.get(word, word))
    return " ".join(words)


def _one_vqa_score(pred: str, refs: Sequence[str], average_subsets: bool) -> float:
    matches = [normalize_answer(r) == pred for r in refs]
    if not average_subsets:
        return min(sum(matches) / 3.0, 1.0)
    # Official: average of min(#matches among the other answers / 3, 1) over leaving each out.
    total = sum(matches)
    return sum(min((total - int(m)) / 3.0, 1.0) for m in matches) / len(matches)


def vqa_accuracy(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    average_subsets: bool = True,
) -> float:
    """Mean VQA accuracy of `predictions` against `references`, in [0, 1].

    A reference is either one string (score 1 when the normalised prediction equals the
    normalised reference, else 0) or a list of human answers (VQAv2 has 10 per question).
    For a list, with m = number of human answers equal to the prediction after normalisation:
    ``average_subsets=True`` (default, the official VQA evaluation): the mean over leaving out
    each human answer in turn of min(matches among the others / 3, 1), so with 10 answers
    m=0 -> 0, m=1 -> 0.3, m=2 -> 0.6, m=3 -> 0.9, m>=4 -> 1; ``average_subsets=False``:
    min(m / 3, 1) (m=1 -> 1/3, m=3 -> 1).

    Example: vqa_accuracy(["Two", "red"], ["2", "blue"]) == 0.5.
    """
    if len(predictions) != len(references):
        raise ValueError(f"vqa_accuracy: {len(predictions)} predictions but "
                         f"{len(references)} references")
    if not predictions:
        raise ValueError("vqa_accuracy: no predictions to score")
    scores = []
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        p = normalize_answer(pred)
        if isinstance(ref, str):
            scores.append(float(p == normalize_answer(ref)))
        elif isinstance(ref, Sequence) and ref and all(isinstance(r, str) for r in ref):
            scores.append(_one_vqa_score(p, ref, average_subsets))
        else:
            raise ValueError(f"vqa_accuracy: reference {i} is {ref!r}; expected a string or a "
                             "non-empty list of strings")
    return sum(scores) / len(scores)


_HAS_CONTENT = re.compile(r"\w")
_STRIP = "!?;:\"'()[]{}*`"


def parse_yes_no(text: str, *, pope_compatible: bool = False) -> str | None:
    """POPE's yes/no reading of a free-form answer: "yes", "no" or None (module docstring).

    Examples: "Yes, there is a dog." -> "yes"; "No." -> "no"; "There is not a dog" -> "no";
    "There isn't one" -> "no"; "NO!" -> "no"; "Yes. No other animals." -> "yes" (first
    sentence only); "" -> None. With pope_compatible=True: "NO!" -> "yes", "" -> "yes".
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_yes_no expects a str, got {type(text).__name__}: {text!r}")
    first = text.split(".")[0].replace(",", "")
    if pope_compatible:
        words = first.split(" ")
        return "no" if ("No" in words or "no" in words or "not" in words) else "yes"
    if not _HAS_CONTENT.search(text):
        return None
    for word in first.lower().split():
        word = word.strip(_STRIP)
        if word in ("no", "not") or word.endswith("n't") or word.endswith("n\u2019t"):
            return "no"
    return "yes"


def _label(value: Any, i: int) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return value.strip().lower()
    raise ValueError(f"pope_metrics: label {i} is {value!r}; expected 'yes'/'no' or a bool")


def _binary_metrics(preds: list[str | None], labels: list[str]) -> dict[str, float]:
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels, strict=True))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels, strict=True))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels, strict=True))
    fn = sum(p == "no" and y == "yes" for p, y in zip(preds, labels, strict=True))
    unparsed = sum(p is None for p in preds)
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    # An unparsed answer to a "yes" question is a missed yes: it counts in recall's denominator.
    positives = sum(y == "yes" for y in labels)
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "unparsed": unparsed,
    }


def pope_metrics(
    predictions: Sequence[str | None],
    labels: Sequence[str | bool],
    categories: Sequence[str] | None = None,
) -> dict[str, Any]:
    """POPE's metrics with "yes" as the positive class, overall and per category.

    `predictions`: the model's raw answers (read with ``parse_yes_no``; "yes"/"no" pass through)
    or None for "no answer". `labels`: "yes"/"no" (any case) or bools. `categories`: optional,
    one per item (POPE's "random", "popular", "adversarial").

    Returns accuracy = (tp + tn) / n, precision = tp / (tp + fp) (0 when nothing was answered
    yes), recall = tp / #yes-labels, f1 (0 when precision + recall = 0), yes_ratio = #yes answers
    / n, and the counts n, tp, fp, tn, fn, unparsed. An unparsed answer (None) is wrong: it
    counts in n (so it lowers accuracy), lowers recall when the label is yes, and is neither a
    tp, fp, tn nor fn. With `categories`, "per_category" maps each category (sorted) to the same
    dict of its items.

    Example: predictions ["yes", "no", "yes", "no"], labels ["yes", "yes", "no", "no"] ->
    accuracy 0.5, precision 0.5, recall 0.5, f1 0.5, yes_ratio 0.5.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"pope_metrics: {len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("pope_metrics: no predictions to score")
    preds = []
    for i, p in enumerate(predictions):
        if p is not None and not isinstance(p, str):
            raise ValueError(f"pope_metrics: prediction {i} is {p!r}; expected a str or None")
        preds.append(None if p is None else parse_yes_no(p))
    gold = [_label(y, i) for i, y in enumerate(labels)]
    out: dict[str, Any] = _binary_metrics(preds, gold)
    if categories is not None:
        if len(categories) != len(preds):
            raise ValueError(f"pope_metrics: {len(categories)} categories for {len(preds)} "
                             "predictions")
        per: dict[str, Any] = {}
        for cat in sorted(set(categories), key=str):
            idx = [i for i, c in enumerate(categories) if c == cat]
            per[str(cat)] = _binary_metrics([preds[i] for i in idx], [gold[i] for i in idx])
        out["per_category"] = per
    return out

