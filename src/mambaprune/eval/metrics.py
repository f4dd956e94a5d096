"""Answer metrics as the standard evaluators compute them (see ``REFERENCE.md``, "Metrics").

* :func:`vqa_accuracy` (VQAv2, TextVQA, VizWiz, OK-VQA): both the prediction and the human answers go through
  :func:`normalize_answer`; then, for each of the n human answers, ``acc_i = min(1, #{other humans who gave the
  prediction} / 3)`` and the score is the mean of the ``acc_i`` (the official evaluator's leave-one-out average).
  With 10 answers: 0 matching humans give 0, 1 gives 0.3, 2 give 0.6, 3 or more give 1.
* :func:`gqa_exact_match` (GQA): lower-cased, surrounding whitespace and punctuation (a trailing period included)
  stripped, then string equality.
* :func:`pope_parse` / :func:`pope_summary_lenient` (POPE): a free-text prediction is "no" when its first sentence
  contains the word "no" or "not", else "yes"; accuracy, precision, recall, F1 (positive class "yes") and the yes ratio.
* :func:`vsr_parse` / :func:`vsr_accuracy` (VSR): binary accuracy on True/False.

Every per-sample metric has the signature ``score(prediction, answers) -> float`` and every summary returns
fractions in [0, 1] (the harness prints percent). :data:`METRICS` maps the metric names that
:class:`mambaprune.data.readers.Sample` carries to both.

One deliberate detail of the official VQA normalisation is kept: contractions written without their apostrophe
("dont", "youre") are mapped to the apostrophe form ("don't", "you're"), so both spellings match each other; a
contraction is not rewritten into two words. The official evaluator processes neither side when all humans gave
the same string and both sides otherwise; here both sides are always normalised in full (as lmms-eval does), which
can only make equal answers compare equal.

These lenient metrics are what :data:`METRICS` serves. The official scorers, one per dataset and each a
transcription of that dataset's published evaluator, live in :mod:`mambaprune.eval.official` and are re-exported
here: :func:`official_score` (``official_score(dataset, prediction, answers)``), :func:`pope_summary` (POPE's
``evaluate.py``; the lenient POPE summary is :func:`pope_summary_lenient`) and :func:`vizwiz_summary`.
"""
from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass
from typing import Callable, Sequence

from .official import (VIZWIZ_CONTRACTIONS, VQA_CONTRACTIONS, gqa_accuracy, pope_official_parse,
                       pope_official_score, pope_summary, textvqa_accuracy, textvqa_normalize, vizwiz_accuracy,
                       vizwiz_normalize, vizwiz_summary, vqa_official_accuracy, vqa_official_normalize,
                       yes_no_summary)

__all__ = [
    "METRICS",
    "Metric",
    "OFFICIAL_DATASETS",
    "OFFICIAL_SCORERS",
    "VIZWIZ_CONTRACTIONS",
    "VQA_CONTRACTIONS",
    "gqa_accuracy",
    "gqa_exact_match",
    "get_metric",
    "normalize_answer",
    "normalize_gqa",
    "official_score",
    "pope_official_parse",
    "pope_official_score",
    "pope_parse",
    "pope_summary",
    "pope_summary_lenient",
    "textvqa_accuracy",
    "textvqa_normalize",
    "vizwiz_accuracy",
    "vizwiz_normalize",
    "vizwiz_summary",
    "vqa_accuracy",
    "vqa_official_accuracy",
    "vqa_official_normalize",
    "vsr_accuracy",
    "vsr_parse",
]

# --- the VQA answer normalisation ------------------------------------------------------------------------------

#: Punctuation the VQA evaluator removes (or turns into a space); the period and the apostrophe are handled apart.
_VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

#: Canonical (apostrophe) spellings of English contractions; their apostrophe-less variants map onto them.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've she'll she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've wasn't we'd we'd've we'll we're we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'd've who'll who're who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
#: Apostrophe-less variants that are ordinary words and therefore must stay as they are.
_REAL_WORDS = frozenset({"hell", "ill", "id", "its", "lets", "shed", "shell", "wed", "well", "were", "whore"})


def _contraction_variants() -> dict[str, str]:
    """Map every spelling of each contraction with one or more apostrophes left out to its canonical form."""
    table: dict[str, str] = {}
    for canonical in _CONTRACTIONS:
        parts = canonical.split("'")
        gaps = len(parts) - 1
        for keep in itertools.product((True, False), repeat=gaps):
            if all(keep):
                continue  # the canonical spelling itself
            variant = parts[0] + "".join(("'" if k else "") + p for k, p in zip(keep, parts[1:]))
            if variant not in _REAL_WORDS:
                table[variant] = canonical
    return table


_CONTRACTION_MAP = _contraction_variants()


def _strip_vqa_punctuation(text: str) -> str:
    """The VQA evaluator's punctuation rule.

    A punctuation mark next to a space (or any mark at all when the text holds a digit-comma-digit group such as
    "1,000") is deleted; one inside a word ("t-shirt") becomes a space. Periods are deleted unless a digit follows
    ("3.5" keeps its decimal point).
    """
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _VQA_PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_answer(text: str) -> str:
    """The standard VQA answer normalisation.

    Newlines and tabs become spaces, the VQA punctuation rule is applied, the text is lower-cased and split into
    words; number words up to ten become digits ("two" -> "2", "none" -> "0"), the articles a / an / the are
    dropped and apostrophe-less contractions take their apostrophe ("dont" -> "don't"). Example:
    ``normalize_answer("Two Dogs.") == "2 dogs"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in _strip_vqa_punctuation(text).lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTION_MAP.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (usually 10).

    ``mean_i min(1, #{j != i : answer_j == prediction} / 3)`` after :func:`normalize_answer` on both sides; e.g.
    a prediction two of ten humans gave scores ``(2 * 1/3 + 8 * 2/3) / 10 = 0.6``.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(matches)


# --- GQA -------------------------------------------------------------------------------------------------------

_GQA_STRIP = string.whitespace + string.punctuation


def normalize_gqa(text: str) -> str:
    """GQA answer form: lower-cased, inner whitespace collapsed, surrounding whitespace and punctuation stripped."""
    return " ".join(text.lower().split()).strip(_GQA_STRIP)


def gqa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference answer (GQA has one), else 0.0."""
    if not answers:
        raise ValueError("gqa_exact_match needs a reference answer")
    pred = normalize_gqa(prediction)
    return float(any(pred == normalize_gqa(a) for a in answers))


# --- POPE ------------------------------------------------------------------------------------------------------

def _first_sentence_words(text: str) -> list[str]:
    """Lower-cased words of the text up to its first period, commas removed, surrounding punctuation stripped."""
    first = text.split(".", 1)[0].replace(",", "")
    return [w.strip(string.punctuation) for w in first.lower().split()]


def pope_parse(prediction: str) -> str:
    """POPE's reading of a free-text answer: "no" if the first sentence has the word "no" or "not", else "yes"."""
    words = _first_sentence_words(prediction)
    return "no" if ("no" in words or "not" in words) else "yes"


def _pope_score(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the parsed prediction equals the yes/no label (``answers[0]``)."""
    return float(pope_parse(prediction) == _yes_no_label(answers))


def _yes_no_label(answers: Sequence[str]) -> str:
    label = answers[0].strip().lower() if answers else ""
    if label not in ("yes", "no"):
        raise ValueError(f"a POPE label must be 'yes' or 'no', got {answers!r}")
    return label


def pope_summary_lenient(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """POPE's accuracy, precision, recall, F1 (positive = "yes") and yes ratio, predictions read by :func:`pope_parse`.

    Precision (recall) is 0 when nothing was predicted (labelled) "yes"; so is F1 when both are 0. This is the
    summary of the "pope" entry of :data:`METRICS`; :func:`pope_summary` is POPE's own ``evaluate.py``.
    """
    return yes_no_summary(predictions, answers, pope_parse, _yes_no_label, "pope_summary_lenient")


# --- VSR -------------------------------------------------------------------------------------------------------

def vsr_parse(prediction: str) -> bool | None:
    """True/False read from a free-text answer's first sentence.

    "false", "no" or "not" give False (checked first, so "not true" is False); "true" or "yes" give True; anything
    else gives None, which counts as wrong.
    """
    words = _first_sentence_words(prediction)
    if any(w in ("false", "no", "not") for w in words):
        return False
    if any(w in ("true", "yes") for w in words):
        return True
    return None


def _vsr_label(answers: Sequence[str]) -> bool:
    label = answers[0].strip().lower() if answers else ""
    if label not in ("true", "false"):
        raise ValueError(f"a VSR label must be 'true' or 'false', got {answers!r}")
    return label == "true"


def vsr_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when :func:`vsr_parse` of the prediction equals the label ``answers[0]`` ("true" / "false")."""
    return float(vsr_parse(prediction) is _vsr_label(answers))


# --- one table of metrics --------------------------------------------------------------------------------------

def _mean_summary(score: Callable[[str, Sequence[str]], float]):
    def summarize(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
        if len(predictions) != len(answers):
            raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
        if not predictions:
            raise ValueError("a summary needs at least one prediction")
        return {"accuracy": sum(score(p, a) for p, a in zip(predictions, answers)) / len(predictions)}

    return summarize


@dataclass(frozen=True)
class Metric:
    """A named metric: ``score(prediction, answers)`` per sample, ``summarize(predictions, answers)`` per set."""

    name: str
    score: Callable[[str, Sequence[str]], float]
    summarize: Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, float]]


METRICS: dict[str, Metric] = {
    "vqa_accuracy": Metric("vqa_accuracy", vqa_accuracy, _mean_summary(vqa_accuracy)),
    "exact_match": Metric("exact_match", gqa_exact_match, _mean_summary(gqa_exact_match)),
    "pope": Metric("pope", _pope_score, pope_summary_lenient),
    "vsr": Metric("vsr", vsr_accuracy, _mean_summary(vsr_accuracy)),
}


def get_metric(name: str) -> Metric:
    """The metric called ``name``; a ValueError lists the known names otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}") from None


# --- the official scorers, one per dataset ---------------------------------------------------------------------

#: The official per-sample scorer of each dataset (see :mod:`mambaprune.eval.official` for the upstream rules).
#: VSR's own evaluation (cambridgeltl/visual-spatial-reasoning ``src/eval.py`` L56-58, L67) is the accuracy of a
#: classifier's True/False against the label, with no rule for reading free text; a generated answer's True/False
#: is read by :func:`vsr_parse` and compared with the label (:func:`vsr_accuracy`).
OFFICIAL_SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "vqav2": vqa_official_accuracy,
    "okvqa": vqa_official_accuracy,
    "textvqa": textvqa_accuracy,
    "vizwiz": vizwiz_accuracy,
    "gqa": gqa_accuracy,
    "pope": pope_official_score,
    "vsr": vsr_accuracy,
}
OFFICIAL_DATASETS = tuple(OFFICIAL_SCORERS)


def official_score(dataset: str, prediction: str, answers: Sequence[str]) -> float:
    """The score of one prediction by ``dataset``'s official evaluator, in [0, 1].

    ``dataset`` is one of :data:`OFFICIAL_DATASETS`; ``answers`` are the human answers (VQAv2, OK-VQA, TextVQA,
    VizWiz) or the one label in a list (GQA: the gold answer; POPE: "yes" / "no"; VSR: "true" / "false").
    """
    try:
        scorer = OFFICIAL_SCORERS[dataset]
    except KeyError:
        raise ValueError(f"no official scorer for {dataset!r}; known: {', '.join(OFFICIAL_DATASETS)}") from None
    return scorer(prediction, answers)


# --- the protocols' scorers as metrics ----------------------------------------------------------------------------

#: official summaries beyond the mean score (POPE's evaluate.py: accuracy, precision, recall, F1, yes ratio)
OFFICIAL_SUMMARIES = {"pope": pope_summary}


def _register_protocol_scorers() -> None:
    """Every official scorer as ``<dataset>_official`` (POPE with its ``evaluate.py`` summary), the scorers of
    the models' own evaluation code (:mod:`mambaprune.eval.upstream_scorers`) under their names."""
    from .upstream_scorers import UPSTREAM_SCORERS

    for dataset, score in OFFICIAL_SCORERS.items():
        name = f"{dataset}_official"
        summarize = OFFICIAL_SUMMARIES.get(dataset) or _mean_summary(score)
        METRICS[name] = Metric(name, score, summarize)
    for name, score in UPSTREAM_SCORERS.items():
        METRICS[name] = Metric(name, score, _mean_summary(score))


_register_protocol_scorers()
