"""Answer metrics: VQA accuracy with the VQA answer normalisation, and POPE's yes/no metrics.

All functions are pure and return fractions in [0, 1] (not percentages).

VQA normalisation: the official VQA evaluation's (``vqaEval.py``; in lmms-eval the steps the
``vqav2`` task applies with ``EvalAIAnswerProcessor``), reproduced exactly, in this order:
  1. newlines and tabs become spaces; surrounding whitespace is stripped;
  2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: when the character stands next to
     a space anywhere in the answer, or the answer holds a digit-comma-digit group ("1,000"),
     the character is deleted; otherwise it becomes a space ("red/blue" -> "red blue");
  3. a period is deleted unless a digit follows it ("3.5" stays, "yes." -> "yes"); as in the
     official script (which passes ``re.UNICODE`` where ``re.sub`` expects its count), at most
     the first 32 such periods are deleted;
  4. lowercase, split on whitespace; number words "none", "zero" .. "ten" become digits;
     the articles "a", "an", "the" are dropped; a word found in the official contraction table
     is replaced ("dont" -> "don't"; the table is used as published, oddities included:
     "somebody'd" -> "somebodyd", and its capitalised keys "Im", "Ive" never match);
  5. the words are joined with single spaces.
The apostrophe itself is not punctuation here ("don't" stays as it is), as in the official script.
``normalize_answer(s, eval_ai=True)`` first applies the extra step lmms-eval's ``textvqa``,
``ok_vqa`` and ``vizwiz_vqa`` tasks add (``EvalAIAnswerProcessor.word_tokenize``): lowercase,
delete every "," and "?", and split "'s" off its word ("dog's" -> "dog 's").

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
from typing import Any

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,+\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in `count`.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The official VQA evaluation's contraction table, verbatim (vqaEval.py; lmms-eval's
# EvalAIAnswerProcessor.CONTRACTIONS): keys are looked up after lowercasing, so the capitalised
# ones never match, and "somebody'd" maps to "somebodyd"; kept so scores match published ones.
_CONTRACTION_MAP = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def normalize_answer(s: str, *, eval_ai: bool = False) -> str:
    """Normalise an answer the way the official VQA evaluation does (module docstring, 1-5).

    Invariant: the same output as lmms-eval's ``vqav2`` normalisation (``eval_ai=True``: as
    its ``EvalAIAnswerProcessor()(s)``), checked string by string in tests/eval/test_metrics.py;
    idempotent for answers with at most 32 periods.
    Examples: "Two dogs." -> "2 dogs"; "The Red-Ball" -> "red ball"; "1,000" -> "1000";
    "yes, it is" -> "yes it is"; "Dont know" -> "don't know"; "3.5" -> "3.5";
    with eval_ai=True: "red,blue" -> "redblue", "dog's" -> "dog 's".
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer expects a str, got {type(s).__name__}: {s!r}")
    text = s
    if eval_ai:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Whether a character is deleted or spaced is decided on the text as it was before any
    # punctuation was touched, as in the official script.
    original = text
    delete_all = _DIGIT_COMMA_DIGIT.search(original) is not None
    for p in _PUNCTUATION:
        if delete_all or (p + " ") in original or (" " + p) in original:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text, count=_OFFICIAL_PERIOD_COUNT)
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


def vqa_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    average_subsets: bool = True,
) -> list[float]:
    """Per-question VQA accuracy of `predictions` against `references`, each in [0, 1].

    A reference is either one string (score 1 when the normalised prediction equals the
    normalised reference, else 0) or a list of human answers (VQAv2 has 10 per question).
    For a list, with m = number of human answers equal to the prediction after normalisation:
    ``average_subsets=True`` (default, the official VQA evaluation): the mean over leaving out
    each human answer in turn of min(matches among the others / 3, 1), so with 10 answers
    m=0 -> 0, m=1 -> 0.3, m=2 -> 0.6, m=3 -> 0.9, m>=4 -> 1; ``average_subsets=False``:
    min(m / 3, 1) (m=1 -> 1/3, m=3 -> 1).

    Example: vqa_scores(["Two", "red"], ["2", "blue"]) == [1.0, 0.0].
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
    return scores


def vqa_accuracy(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    average_subsets: bool = True,
) -> float:
    """Mean of ``vqa_scores`` (same arguments), in [0, 1].

    Example: vqa_accuracy(["Two", "red"], ["2", "blue"]) == 0.5.
    """
    scores = vqa_scores(predictions, references, average_subsets=average_subsets)
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
        # lmms-eval's "pope_yes_ratio" is this one (the share of yes *labels*), not POPE's.
        "label_yes_ratio": positives / n,
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
    / n (POPE's definition: the share of answers that are yes), label_yes_ratio = #yes-labels /
    n (what lmms-eval reports as pope_yes_ratio), and the counts n, tp, fp, tn, fn, unparsed. An unparsed answer (None) is wrong: it
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



def pope_correct(predictions: Sequence[str | None], labels: Sequence[str | bool]) -> list[float]:
    """Per-question POPE correctness, 1.0 or 0.0, read exactly as ``pope_metrics`` reads it
    (``parse_yes_no``; None or an unparsed answer is wrong): its mean is pope_metrics' accuracy.

    Example: pope_correct(["Yes.", "no", None], ["yes", "yes", "no"]) == [1.0, 0.0, 0.0].
    """
    if len(predictions) != len(labels):
        raise ValueError(f"pope_correct: {len(predictions)} predictions but {len(labels)} "
                         "labels")
    out = []
    for i, (p, y) in enumerate(zip(predictions, labels, strict=True)):
        if p is not None and not isinstance(p, str):
            raise ValueError(f"pope_correct: prediction {i} is {p!r}; expected a str or None")
        out.append(float(p is not None and parse_yes_no(p) == _label(y, i)))
    return out


def question_scores(task: str, predictions: Sequence[str | None],
                    answers: Sequence[Any]) -> list[float]:
    """Per-question scores in [0, 1] whose mean is the task's accuracy: ``pope_correct`` for
    "pope", ``vqa_scores`` for "vqa" (fractional with several human answers)."""
    if task == "pope":
        return pope_correct(predictions, answers)
    if task == "vqa":
        return vqa_scores(predictions, answers)  # type: ignore[arg-type]
    raise ValueError(f"question_scores: task={task!r}; expected 'pope' or 'vqa'")
