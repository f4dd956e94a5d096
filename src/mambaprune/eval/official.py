"""One official scorer per dataset: each dataset's published evaluator, re-implemented rule by rule, quirks kept.

Every rule below names the upstream file and lines it follows. The sources read (their newest stored snapshots):

* VQAv2 and OK-VQA: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at commit a013f00
  (2021-03-11, "Fixed processing answers bug"), the VQA evaluation script as it stands now. OK-VQA publishes no
  evaluator of its own and points to this one. Cited below as "vqaEval.py L<n>".
* TextVQA: facebookresearch/mmf ``mmf/utils/m4c_evaluators.py`` (EvalAIAnswerProcessor and
  TextVQAAccuracyEvaluator), last changed in commit 2dc099a and unchanged at mmf HEAD b0ffc7f. Cited as
  "m4c_evaluators.py L<n>".
* VizWiz: the VizWiz-VQA API's ``vqaEval.py`` (Qing Li; class VQAEval, distributed by vizwiz.org, not in a GitHub
  repository of its authors; read in the public redistributed copies of the search index). Cited as
  "vizwiz vqaEval.py L<n>" with the line numbers of that file.
* GQA: ``eval.py`` of https://nlp.stanford.edu/data/gqa/eval.zip (not on GitHub from its authors; read in the
  redistribution xyang583/ARDS@4a97031 ``playground/data/eval/gqa/data/eval/eval.py``, which adds comments).
  Cited as "gqa eval.py L<n>" with that copy's line numbers.
* POPE: AoiDragon/POPE ``evaluate.py`` at commit 08d957b. Cited as "pope evaluate.py L<n>".
* VSR: cambridgeltl/visual-spatial-reasoning ``src/eval.py`` at commit b1cf884 (see
  :func:`mambaprune.eval.metrics.official_score`).

Every per-sample scorer has the signature ``score(prediction, answers) -> float`` like the lenient metrics in
:mod:`mambaprune.eval.metrics`, which re-exports this module's public names.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

__all__ = [
    "VIZWIZ_CONTRACTIONS",
    "VQA_CONTRACTIONS",
    "gqa_accuracy",
    "pope_official_parse",
    "pope_official_score",
    "pope_summary",
    "textvqa_accuracy",
    "textvqa_normalize",
    "vizwiz_accuracy",
    "vizwiz_normalize",
    "vizwiz_summary",
    "vqa_official_accuracy",
    "vqa_official_normalize",
]

# --- the tables shared by the VQA-family evaluators ------------------------------------------------------------

#: The contraction table of vqaEval.py L21-42, written here as ``key=value`` pairs (sorted, not in upstream order).
#: m4c_evaluators.py L12-133 holds the same 120 pairs. Kept as published: some keys carry capitals ("Im", "Ive",
#: "Id've", "I'dve"), which can never match because the words are lower-cased first (vqaEval.py L144); one pair
#: runs backwards ("somebody'd" -> "somebodyd"); "let's" and "she's" map to themselves.
_VQA_CONTRACTION_PAIRS = """
'ow'sat='ow's'at 'ows'at='ow's'at aint=ain't arent=aren't cant=can't couldn'tve=couldn't've couldnt=couldn't
couldnt've=couldn't've couldve=could've didnt=didn't doesnt=doesn't dont=don't hadn'tve=hadn't've hadnt=hadn't
hadnt've=hadn't've hasnt=hasn't havent=haven't he'dve=he'd've hed=he'd hed've=he'd've hes=he's howd=how'd
howll=how'll hows=how's I'dve=I'd've Id've=I'd've Im=I'm isnt=isn't it'dve=it'd've itd=it'd itd've=it'd've
itll=it'll Ive=I've let's=let's maam=ma'am mightn'tve=mightn't've mightnt=mightn't mightnt've=mightn't've
mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
ow's'at='ow's'at shant=shan't she'dve=she'd've she's=she's shed've=she'd've shouldn'tve=shouldn't've
shouldnt=shouldn't shouldnt've=shouldn't've shouldve=should've somebody'd=somebodyd somebody'dve=somebody'd've
somebodyd've=somebody'd've somebodyll=somebody'll somebodys=somebody's someone'dve=someone'd've
someoned=someone'd someoned've=someone'd've someonell=someone'll someones=someone's something'dve=something'd've
somethingd=something'd somethingd've=something'd've somethingll=something'll thats=that's there'dve=there'd've
thered=there'd thered've=there'd've therere=there're theres=there's they'dve=they'd've theyd=they'd
theyd've=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't we'dve=we'd've
wed've=we'd've werent=weren't weve=we've whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've who'dve=who'd've whod=who'd whod've=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldn'tve=wouldn't've wouldnt=wouldn't
wouldnt've=wouldn't've wouldve=would've y'all'dve=y'all'd've y'alld've=y'all'd've y'allll=y'all'll yall=y'all
yall'd've=y'all'd've yall'll=y'all'll you'dve=you'd've youd=you'd youd've=you'd've youll=you'll youre=you're
youve=you've
"""

VQA_CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _VQA_CONTRACTION_PAIRS.split())


def _vizwiz_contractions() -> dict[str, str]:
    """The VizWiz API's contraction table (vizwiz vqaEval.py L25-46).

    It is the VQA table with the ASCII apostrophe (U+0027) turned into the typographic one (U+2019) in keys and
    values, except where the VizWiz file kept the ASCII one: the keys "couldn'tve" (L26) and "hadn'tve" (L27), and
    the values of "aint", "arent", "cant", "couldve", "couldnt" (L25), "weve" (L40), "wheres" (L41) and "whove"
    (L42). Since the prediction is the only side processed (see :func:`vizwiz_accuracy`), "dont" becomes
    "don’t" (U+2019) and no longer equals a human "dont" or "don't".
    """
    ascii_keys = {"couldn'tve", "hadn'tve"}
    ascii_values = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
    curly = str.maketrans("'", "\u2019")
    return {(k if k in ascii_keys else k.translate(curly)): (v if k in ascii_values else v.translate(curly))
            for k, v in VQA_CONTRACTIONS.items()}


VIZWIZ_CONTRACTIONS: dict[str, str] = _vizwiz_contractions()

#: Number words (vqaEval.py L43-55; m4c_evaluators.py L135-148) and articles (vqaEval.py L56-59; L149).
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")

#: The punctuation list, in upstream order (vqaEval.py L64-66; m4c_evaluators.py L152-174). The period and the
#: apostrophe are not in it; the colon neither.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")

#: ``re.UNICODE`` is 32: the upstream calls ``period_pattern.sub("", text, re.UNICODE)`` (vqaEval.py L137-139,
#: m4c_evaluators.py L193, vizwiz vqaEval.py L174-176) pass it as the ``count`` argument, so at most the first 32
#: periods are removed.
_PERIOD_COUNT = int(re.UNICODE)

# The period pattern is written upstream as "(?!<=\d)(\.)(?!\d)": its first group is a negative *lookahead* for the
# literal text "<=" and a digit (a mistyped lookbehind), always true in front of a period, so the pattern amounts
# to "a period not followed by a digit" ("5." loses its period, "3.5" keeps it).
# vqaEval.py is Python 2 code (print statements) whose patterns are compiled without re.UNICODE, where \d is
# [0-9] only; the MMF and VizWiz files are Python 3, where \d is any Unicode decimal digit.
_PERIOD_PY2 = re.compile(r"\.(?![0-9])")
_PERIOD_PY3 = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT_PY2 = re.compile(r"[0-9],[0-9]")          # vqaEval.py L63
_DIGIT_COMMA_DIGIT_PY3 = re.compile(r"\d,\d")                 # vizwiz vqaEval.py L67
_DIGIT_COMMAS_DIGIT_PY3 = re.compile(r"(?<=\d),+(?=\d)")      # m4c_evaluators.py L151


def _process_punctuation(text: str, digit_comma_digit: re.Pattern, period: re.Pattern) -> str:
    """The VQA punctuation rule (vqaEval.py L130-140; m4c_evaluators.py L184-194; vizwiz vqaEval.py L167-177).

    Each mark of :data:`_PUNCTUATION` is deleted when the *original* text has it before or after a space, or when
    the original text holds a digit-comma-digit group anywhere (then every mark is deleted); otherwise it becomes a
    space. Then periods not followed by a digit are removed, at most :data:`_PERIOD_COUNT` of them.
    """
    out = text
    delete_all = digit_comma_digit.search(text) is not None
    for mark in _PUNCTUATION:
        if (mark + " ") in text or (" " + mark) in text or delete_all:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return period.sub("", out, count=_PERIOD_COUNT)


def _process_digit_article(text: str, contractions: dict[str, str]) -> str:
    """The VQA word rule (vqaEval.py L142-155; m4c_evaluators.py L196-209; vizwiz vqaEval.py L179-192).

    The text is lower-cased and split on whitespace; number words become digits, then the articles are dropped
    (so "none" -> "0" is kept and "a" is dropped), then each remaining word found in ``contractions`` is replaced;
    the words are joined with single spaces.
    """
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(contractions.get(w, w) for w in words if w not in _ARTICLES)


def _clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces, then surrounding whitespace is stripped (vqaEval.py L88-94)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out(matches: Sequence[bool]) -> float:
    """``mean_i min(1, #{j != i : matches[j]} / 3)``: the accuracy averaged over the leave-one-out subsets.

    vqaEval.py L105-112: for each human answer, the *other* answers that equal the prediction are counted. Upstream
    drops the left-out answer with ``item != gtAnsDatum`` on answer dicts, which differ by their ``answer_id``
    (1..10), so exactly one answer is left out each time; here it is left out by position.
    """
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(matches)


# --- VQAv2 and OK-VQA ------------------------------------------------------------------------------------------

def vqa_official_normalize(text: str) -> str:
    """The full VQA processing of one answer: whitespace, punctuation, then the word rule (vqaEval.py L91-103)."""
    cleaned = _process_punctuation(_clean_whitespace(text), _DIGIT_COMMA_DIGIT_PY2, _PERIOD_PY2)
    return _process_digit_article(cleaned, VQA_CONTRACTIONS)


def vqa_official_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy as vqaEval.py (commit a013f00) computes it, for VQAv2 and OK-VQA.

    * Every human answer and the prediction get newlines and tabs turned into spaces and are stripped
      (vqaEval.py L87-94).
    * Only when the stripped human answers are not all the same string (``len(set(gtAnswers)) > 1``, L96-98) do
      both the human answers and the prediction go through the punctuation and the word rule (L99-103). When all
      humans agree, the raw stripped strings are compared: "Yes" or "yes." scores 0 against ten "yes".
    * Leave-one-out accuracy over the human answers (L105-112), see :func:`_leave_one_out`.

    The issue's older description (prediction fully processed, humans only punctuation-cleaned, always) is the
    script before commit a013f00; this follows the script as it stands now.
    """
    if not answers:
        raise ValueError("vqa_official_accuracy needs at least one human answer")
    pred = _clean_whitespace(prediction)
    humans = [_clean_whitespace(a) for a in answers]
    if len(set(humans)) > 1:
        humans = [vqa_official_normalize(a) for a in humans]
        pred = vqa_official_normalize(pred)
    return _leave_one_out([h == pred for h in humans])


# --- TextVQA ---------------------------------------------------------------------------------------------------

def textvqa_normalize(text: str) -> str:
    """EvalAIAnswerProcessor (m4c_evaluators.py L179-216), applied to the prediction and to every human answer.

    1. ``word_tokenize`` (L179-182): lower-case, delete every "," and "?", write "'s" as " 's" ("macy's" ->
       "macy 's"), strip.
    2. Newlines and tabs become spaces, strip (L213).
    3. The punctuation rule (L184-194). Its digit-comma-digit test (L151, L188) can never fire, since step 1
       already deleted every comma: "1,000-2,000" gives "1000 2000" here where vqaEval.py gives "10002000".
    4. The word rule with the VQA contraction table (L196-209); "let's" was split in step 1, so its key never
       matches.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean_whitespace(text)
    text = _process_punctuation(text, _DIGIT_COMMAS_DIGIT_PY3, _PERIOD_PY3)
    return _process_digit_article(text, VQA_CONTRACTIONS)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQAAccuracyEvaluator (m4c_evaluators.py L219-255).

    Both sides go through :func:`textvqa_normalize` (L227, L249). Exactly 10 human answers are required (the
    ``assert`` of L228, a ValueError here). Upstream scores each unique processed human answer by the leave-one-out
    average over the 10 answers (L229-242) and gives the prediction the score of the unique answer it equals, 0
    when none (L251); that is the same number as :func:`_leave_one_out` on the prediction.
    """
    if len(answers) != 10:
        raise ValueError(f"TextVQA's evaluator needs exactly 10 human answers, got {len(answers)}")
    pred = textvqa_normalize(prediction)
    return _leave_one_out([textvqa_normalize(a) == pred for a in answers])


# --- VizWiz ----------------------------------------------------------------------------------------------------

def vizwiz_normalize(text: str) -> str:
    """The VizWiz API's processing of the prediction (vizwiz vqaEval.py L90-95): whitespace, punctuation (Python 3
    ``\\d``), the word rule with :data:`VIZWIZ_CONTRACTIONS`."""
    cleaned = _process_punctuation(_clean_whitespace(text), _DIGIT_COMMA_DIGIT_PY3, _PERIOD_PY3)
    return _process_digit_article(cleaned, VIZWIZ_CONTRACTIONS)


def vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VizWiz accuracy as the VizWiz API's VQAEval.evaluate computes it (vizwiz vqaEval.py L89-103).

    Only the prediction is processed (:func:`vizwiz_normalize`); the human answers are compared exactly as
    annotated, not stripped, not lower-cased (L100). Leave-one-out by position over the human answers (L98-103).
    """
    if not answers:
        raise ValueError("vizwiz_accuracy needs at least one human answer")
    pred = vizwiz_normalize(prediction)
    return _leave_one_out([a == pred for a in answers])


def vizwiz_summary(predictions: Sequence[str], answers: Sequence[Sequence[str]], answerable: Sequence,
                   answer_types: Sequence[str] | None = None) -> dict[str, float]:
    """VizWiz accuracy overall and on answerable / unanswerable questions apart.

    ``answerable`` is each annotation's ``answerable`` flag (1 / 0, or booleans), the field the VizWiz API reads
    for its unanswerability metrics (vizwiz vqaEval.py L153). Returns ``accuracy`` (mean of
    :func:`vizwiz_accuracy`, as ``setAccuracy`` averages it), ``answerable`` and ``unanswerable`` (the same mean
    over the questions flagged 1 / 0; a key is left out when no question has that flag), and, when
    ``answer_types`` (the annotation's ``answer_type``) are given, ``answer_type:<type>`` for each type, as the
    API's ``perAnswerType`` (accumulated at L106-109, averaged in ``setAccuracy``; the VizWiz answer types include
    "unanswerable"). Fractions in [0, 1].
    """
    n = len(predictions)
    if len(answers) != n or len(answerable) != n or (answer_types is not None and len(answer_types) != n):
        raise ValueError("vizwiz_summary needs as many answer lists, answerable flags (and answer types) as "
                         "predictions")
    if not n:
        raise ValueError("vizwiz_summary needs at least one prediction")
    scores = [vizwiz_accuracy(p, a) for p, a in zip(predictions, answers)]
    out = {"accuracy": sum(scores) / n}
    for key, flag in (("answerable", True), ("unanswerable", False)):
        group = [s for s, f in zip(scores, answerable) if bool(int(f)) is flag]
        if group:
            out[key] = sum(group) / len(group)
    if answer_types is not None:
        for t in sorted(set(answer_types)):
            group = [s for s, u in zip(scores, answer_types) if u == t]
            out[f"answer_type:{t}"] = sum(group) / len(group)
    return out


# --- GQA -------------------------------------------------------------------------------------------------------

def gqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """GQA's eval.py: ``correct = (predicted == gold)`` on the raw strings (gqa eval.py L366-370).

    eval.py applies no normalisation at all: predictions are read as given (L133-134), so "Yes", "yes." or " yes"
    score 0 against "yes". ``answers`` holds the one gold answer. Only balanced questions count towards the
    accuracy (L376-378); that selection is the reader's / summary's business, not this per-sample scorer's.
    """
    if len(answers) != 1:
        raise ValueError(f"GQA has one gold answer per question, got {len(answers)}")
    return float(prediction == answers[0])


# --- POPE ------------------------------------------------------------------------------------------------------

def pope_official_parse(prediction: str) -> str:
    """POPE's reading of an answer (pope evaluate.py L9-21).

    Only the text before the first "." counts (L13-14); commas are deleted (L16); the rest is split on single
    spaces, not on any whitespace (L17); the answer is "no" when one of the words is exactly "No", "not" or "no"
    (L18), else "yes". So "NO", "Not", "no!" and "no\\n" read as "yes", and so does "" (nothing answered).
    """
    first = prediction.split(".")[0] if "." in prediction else prediction
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _pope_label(answers: Sequence[str]) -> str:
    """The gold label ``answers[0]``, which must be exactly "yes" or "no".

    evaluate.py counts any label other than "no" as positive (L23-27); POPE's files only hold "yes" and "no", so
    anything else is refused here rather than silently counted as "yes".
    """
    label = answers[0] if len(answers) == 1 else None
    if label not in ("yes", "no"):
        raise ValueError(f"a POPE label must be 'yes' or 'no', got {answers!r}")
    return label


def pope_official_score(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when :func:`pope_official_parse` of the prediction equals the label, else 0.0."""
    return float(pope_official_parse(prediction) == _pope_label(answers))


def pope_summary(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """POPE's metrics as evaluate.py computes them (pope evaluate.py L29-57), positive class "yes".

    Predictions are read with :func:`pope_official_parse`; ``yes_ratio`` is the share of "yes" predictions (L38);
    ``accuracy`` = (TP + TN) / all (L57), ``precision`` = TP / (TP + FP) (L54), ``recall`` = TP / (TP + FN) (L55),
    ``f1`` = 2PR / (P + R) (L56). Upstream divides by zero there; here precision is 0 when nothing was answered
    "yes", recall is 0 when no label is "yes", and F1 is 0 when precision + recall is 0.
    """
    return yes_no_summary(predictions, answers, pope_official_parse, _pope_label, "pope_summary")


def yes_no_summary(predictions: Sequence[str], answers: Sequence[Sequence[str]], parse: Callable[[str], str],
                   label: Callable[[Sequence[str]], str], name: str = "yes_no_summary") -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes") and yes ratio of predictions read by ``parse``
    against labels read by ``label``, as POPE's evaluate.py counts them (L29-57); precision (recall) is 0 when
    nothing was predicted (labelled) "yes", F1 is 0 when both are 0. ``name`` is the caller's, for the errors."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} labels")
    if not predictions:
        raise ValueError(f"{name} needs at least one prediction")
    predicted_yes = [parse(p) == "yes" for p in predictions]
    labelled_yes = [label(a) == "yes" for a in answers]
    pairs = list(zip(predicted_yes, labelled_yes))
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    fn = sum(t and not p for p, t in pairs)
    tn = len(pairs) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(pairs),
    }
