"""Upstream scorers: how the models' own released evaluation code scores an answer (issue 25, protocols).

Two of the evaluation protocols reproduce a model's released evaluation rather than each dataset's official
evaluator (:mod:`mambaprune.eval.official`). The per-sample rules here are re-implemented from the two code bases,
read at these commits (cited as ``VE:<path>:<line>`` and ``RM:<path>:<line>``):

* **VE**: the Cobra authors' fork of vlm-evaluation, h-zhao1997/vlm-evaluation at b0a691f ("update cobra.py"),
  which Cobra's paper numbers come from. It covers VQAv2, GQA, VizWiz, TextVQA, POPE and VSR (no OK-VQA). The
  probability mode used for POPE and VSR lives in Cobra itself, h-zhao1997/cobra at 4b81082 (``CB:<path>:<line>``).
* **RM**: RoboMamba, lmzpai/roboMamba at c2f52c4 ("camera ready version"), ``src/test.py`` (its judges and the
  answer file round trip) and ``src/judger.py`` (its lenient VQA evaluator). It covers POPE, VQAv2, OK-VQA, GQA and
  VizWiz (no TextVQA, no VSR).

Every per-sample scorer has the signature ``score(prediction, answers) -> float`` in [0, 1], like the official
scorers: ``answers`` are the human answers (VQAv2, OK-VQA, VizWiz, TextVQA) or the one label in a list (GQA's gold
answer, POPE's "yes"/"no", VSR's label). :data:`UPSTREAM_SCORERS` maps ``"<protocol>_<dataset>"`` to them.

The shared building blocks (the punctuation rule with its 32-period ``count`` quirk, the number-word / article /
contraction rule, the VQA contraction table, the leave-one-out average) are imported from
:mod:`mambaprune.eval.official`. All upstream files here are Python 3, so ``\\d`` in their patterns matches any
Unicode decimal digit (the ``*_PY3`` patterns there).

Aggregation (percent rounding, POPE's mean of split accuracies, RoboMamba's pooled POPE accuracy) is not part of
these per-sample functions; each docstring says what the upstream does with the per-sample numbers.
"""
from __future__ import annotations

import math
import string
from typing import Callable, Sequence

from mambaprune.eval.official import (
    VIZWIZ_CONTRACTIONS,
    VQA_CONTRACTIONS,
    _DIGIT_COMMA_DIGIT_PY3,
    _PERIOD_PY3,
    _clean_whitespace,
    _leave_one_out,
    _pope_label,
    _process_digit_article,
    _process_punctuation,
    gqa_accuracy,
    textvqa_accuracy,
)

__all__ = [
    "COBRA_CHOICES",
    "COBRA_VIZWIZ_CONTRACTIONS",
    "ROBOMAMBA_DATASETS",
    "ROBOMAMBA_VIZWIZ_PUNCTUATION",
    "UPSTREAM_SCORERS",
    "choice_accuracy",
    "cobra_choice",
    "cobra_gqa",
    "cobra_gqa_clean",
    "cobra_textvqa",
    "cobra_vizwiz",
    "cobra_vizwiz_normalize",
    "cobra_vqav2",
    "cobra_vqav2_normalize",
    "robomamba_answer_text",
    "robomamba_gqa",
    "robomamba_pope",
    "robomamba_vizwiz",
    "robomamba_vizwiz_clean",
    "robomamba_vqa",
    "robomamba_vqa_normalize",
]


def _punctuation_py3(text: str) -> str:
    """The VQA punctuation rule with Python 3 patterns: comma test ``(\\d)(,)(\\d)``, at most 32 periods removed.

    VE:vlm_eval/util/evaluation/vqav2/eval.py:210, :214-221; VE:vlm_eval/util/evaluation/vizwiz/eval.py:166-167,
    :254-262; RM:src/judger.py:360-361, :449-459 all pass ``re.UNICODE`` (32) as the ``count`` of the period
    substitution, as the official script does.
    """
    return _process_punctuation(text, _DIGIT_COMMA_DIGIT_PY3, _PERIOD_PY3)


def _require_answers(answers: Sequence[str], who: str) -> None:
    if not answers:
        raise ValueError(f"{who} needs at least one human answer")


def _single_label(answers: Sequence[str], who: str) -> str:
    if len(answers) != 1:
        raise ValueError(f"{who} takes the one gold answer in a list, got {len(answers)} answers")
    return answers[0]


# =================================================================================================================
# Protocol "cobra": the vlm-evaluation fork (VE) the Cobra authors evaluated with
# =================================================================================================================

# --- VQAv2 -------------------------------------------------------------------------------------------------------

def cobra_vqav2_normalize(text: str) -> str:
    """VE's processing of a VQAv2 *prediction* (VE:vlm_eval/util/evaluation/vqav2/eval.py:427-430).

    Newlines and tabs become spaces and the text is stripped (:428), then the punctuation rule (:214-221), then
    lower-casing, number words to digits, articles dropped and the contraction table (:224-227; DIGIT_MAP :170-183,
    ARTICLES :184, CONTRACTIONS :48-169, the same 120 pairs as :data:`VQA_CONTRACTIONS`). VE filters the articles
    before mapping number words and the official script after; no number word is an article, so the two agree.
    """
    return _process_digit_article(_punctuation_py3(_clean_whitespace(text)), VQA_CONTRACTIONS)


def cobra_vqav2(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy as VE's ``VQAEvaluator.evaluate`` computes it (VE:vlm_eval/util/evaluation/vqav2/eval.py:420-456).

    * The prediction is always fully processed (:func:`cobra_vqav2_normalize`, eval.py:427-430); unlike the official
      script there is no "humans disagree" gate.
    * Each human answer goes through the punctuation rule *only* (:433-434): no lower-casing, no strip, no number
      words, no articles. So ten "Yes" never match any prediction (the prediction is lower-cased), and a human
      "two" never matches (the prediction's "two" became "2").
    * Leave-one-out (:437-444): for each human answer, ``min(1, #other humans equal to the prediction / 3)``; the
      "others" are the answer dicts ``!=`` the current one, and VQAv2's answer dicts carry a unique ``answer_id``
      (the harness keeps the raw annotation file, VE:vlm_eval/tasks/harnesses/vqav2.py:97-103), so exactly one is
      left out: by position here. The mean over the answers is the question's score (:448).

    Upstream reports ``round(100 * mean, 2)`` over all questions (:460). It also rewrites the human answers in
    place, so scoring the same annotation object twice would punctuation-process them twice; here the inputs are
    never mutated.
    """
    _require_answers(answers, "cobra_vqav2")
    pred = cobra_vqav2_normalize(prediction)
    return _leave_one_out([_punctuation_py3(a) == pred for a in answers])


# --- GQA ---------------------------------------------------------------------------------------------------------

_ASCII_PUNCTUATION_DELETE = str.maketrans("", "", string.punctuation)


def cobra_gqa_clean(prediction: str) -> str:
    """VE's GQA post-processing of the model output (VE:vlm_eval/tasks/harnesses/gqa.py:281).

    Every character of ``string.punctuation`` (the 32 ASCII marks ``!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~``) is deleted
    wherever it occurs, then the text is lower-cased. No strip, no whitespace collapsing.
    """
    return prediction.translate(_ASCII_PUNCTUATION_DELETE).lower()


def cobra_gqa(prediction: str, answers: Sequence[str]) -> float:
    """GQA under VE: the cleaned prediction (:func:`cobra_gqa_clean`) against the *raw* gold answer.

    The harness writes the cleaned prediction (VE:vlm_eval/tasks/harnesses/gqa.py:279-282) and runs GQA's own
    eval.py on it, which loads it as is (VE:vlm_eval/util/evaluation/gqa/eval.py:155) and scores
    ``predicted == gold`` (:405-408), i.e. :func:`mambaprune.eval.official.gqa_accuracy`. A gold answer that
    holds punctuation or capitals can therefore never be matched. Upstream reports the balanced-question mean in
    percent, printed with 2 decimals and parsed back (gqa.py:307).
    """
    return gqa_accuracy(cobra_gqa_clean(prediction), answers)


# --- VizWiz ------------------------------------------------------------------------------------------------------

#: VE's VizWiz contraction table (VE:vlm_eval/util/evaluation/vizwiz/eval.py:28-149). It is the VizWiz API's table
#: (:data:`mambaprune.eval.official.VIZWIZ_CONTRACTIONS`) with every typographic apostrophe (U+2019) written as a
#: backtick: "dont" -> "don`t", "couldnt`ve" -> "couldn`t`ve". The entries that keep the ASCII apostrophe are the
#: same ones: keys "couldn'tve" and "hadn'tve", values of "aint", "arent", "cant", "couldve", "couldnt", "weve",
#: "wheres", "whove". So :func:`mambaprune.eval.official.vizwiz_accuracy` is *not* VE's scorer. The keys that hold
#: a backtick ("couldnt`ve", "let`s", ...) are dead: the backtick is in the punctuation list, so the punctuation
#: rule has already turned it into a space (or deleted it) before the table is looked up.
COBRA_VIZWIZ_CONTRACTIONS: dict[str, str] = {
    k.replace("\u2019", "`"): v.replace("\u2019", "`") for k, v in VIZWIZ_CONTRACTIONS.items()
}


def cobra_vizwiz_normalize(text: str) -> str:
    """VE's processing of a VizWiz prediction (VE:vlm_eval/util/evaluation/vizwiz/eval.py:200-205).

    Newlines / tabs to spaces and strip (:201-203), the punctuation rule (:254-262), then number words, articles
    and :data:`COBRA_VIZWIZ_CONTRACTIONS` (:264-277). The contractions come after the punctuation rule, so the
    backticks they introduce stay.
    """
    return _process_digit_article(_punctuation_py3(_clean_whitespace(text)), COBRA_VIZWIZ_CONTRACTIONS)


def cobra_vizwiz(prediction: str, answers: Sequence[str]) -> float:
    """VizWiz accuracy as VE's ``VQAEval.evaluate`` computes it (VE:vlm_eval/util/evaluation/vizwiz/eval.py:192-223).

    Only the prediction is processed (:func:`cobra_vizwiz_normalize`); the human answers are compared exactly as
    annotated (:210). Leave-one-out by index (:208-213), mean over the answers (:214). Upstream reports
    ``round(100 * mean, 2)`` (:279-280) overall and on the answerable / unanswerable subsets
    (VE:vlm_eval/tasks/harnesses/vizwiz.py:313-342).
    """
    _require_answers(answers, "cobra_vizwiz")
    pred = cobra_vizwiz_normalize(prediction)
    return _leave_one_out([a == pred for a in answers])


# --- TextVQA -----------------------------------------------------------------------------------------------------

#: VE's TextVQA scorer is the M4C ``TextVQAAccuracyEvaluator``
#: (VE:vlm_eval/util/evaluation/textvqa/m4c_evaluators.py:181-253: the same processor, tables and leave-one-out
#: table as mmf's), fed the raw model output and the 10 raw answers (VE:vlm_eval/tasks/harnesses/textvqa.py:295-306).
#: It is the official scorer unchanged: an alias of :func:`mambaprune.eval.official.textvqa_accuracy`. Upstream
#: reports the plain mean (a fraction) for the OCR and the pure prompt (textvqa.py:321-325).
cobra_textvqa = textvqa_accuracy


# --- POPE and VSR: candidate probabilities -----------------------------------------------------------------------

#: The candidate strings each probability-mode dataset asks Cobra for, in upstream order (index 0 wins ties):
#: POPE (VE:vlm_eval/tasks/harnesses/pope.py:249-251) and VSR (VE:vlm_eval/tasks/harnesses/vsr.py:214-216).
COBRA_CHOICES: dict[str, tuple[str, str]] = {"pope": ("Yes", "No"), "vsr": ("True", "False")}


def cobra_choice(probabilities: Sequence[float], candidates: Sequence[str]) -> str:
    """The candidate VE's scorers pick from Cobra's candidate probabilities: ``np.argmax`` over them.

    Cobra returns, at the first generated step, the softmax probabilities of the candidates' single tokens,
    renormalised over the candidates (CB:cobra/models/vlms/cobra.py:539-545); POPE reads
    ``["yes", "no"][np.argmax(probs)]`` (VE:vlm_eval/tasks/harnesses/pope.py:316) and VSR
    ``[True, False][np.argmax(probs)]`` (VE:vlm_eval/tasks/harnesses/vsr.py:261). As ``np.argmax`` does, the first
    maximum wins (a tie goes to the first candidate), and a NaN counts as the maximum (both probabilities are NaN
    when both underflow to 0, and the first candidate is picked). Logits can be passed instead of probabilities:
    the renormalisation keeps their order.
    """
    if len(probabilities) != len(candidates) or not candidates:
        raise ValueError(f"{len(probabilities)} probabilities for {len(candidates)} candidates")
    best = 0
    for i, p in enumerate(probabilities):
        if math.isnan(p):
            return candidates[i]
        if p > probabilities[best]:
            best = i
    return candidates[best]


#: The labels :func:`choice_accuracy` understands, lower-cased, and their meaning. VSR's ``label`` field is the
#: integer 1 / 0 (VE:vlm_eval/tasks/harnesses/vsr.py:65 reads ``label == 1`` as True); readers may also give it as
#: "True" / "False".
_CHOICE_LABELS = {"yes": "yes", "no": "no", "true": "true", "false": "false", "1": "true", "0": "false"}


def _choice_label(value: object, side: str) -> str:
    try:
        return _CHOICE_LABELS[str(value).lower()]
    except KeyError:
        raise ValueError(f"{side} {value!r} is not a choice label (yes/no, true/false, 1/0)") from None


def choice_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the chosen candidate is the gold label: POPE and VSR under the ``cobra`` protocol.

    ``prediction`` is the candidate :func:`cobra_choice` picked ("Yes" / "No", "True" / "False"); ``answers`` holds
    the one gold label. Both are read case-insensitively as yes / no or true / false, where "1" / "0" (VSR's
    integer labels, also as ints or bools) mean true / false. Anything else, or a yes/no label against a true/false
    one, raises ValueError instead of counting as wrong. This is the per-sample exact match of
    VE:vlm_eval/tasks/harnesses/pope.py:316-317 and VE:vlm_eval/tasks/harnesses/vsr.py:261-262 (POPE labels are
    asserted to be "yes"/"no" there, :313).

    Aggregation upstream: POPE's headline ``POPE-final-Accuracy`` is the unweighted mean of the three split
    accuracies (pope.py:324, :334), not the pooled mean; VSR's is the plain mean (vsr.py:270). Both also report
    ROC-AUC and AP on the first candidate's probability.
    """
    pred = _choice_label(prediction, "prediction")
    gold = _choice_label(_single_label(answers, "choice_accuracy"), "label")
    if (pred in ("yes", "no")) != (gold in ("yes", "no")):
        raise ValueError(f"prediction {prediction!r} and label {answers[0]!r} are not the same kind of choice")
    return float(pred == gold)


# =================================================================================================================
# Protocol "robomamba": RoboMamba's src/test.py judges and src/judger.py (RM)
# =================================================================================================================

#: The datasets RoboMamba's test.py evaluates (RM:src/test.py:472, the default ``--dataset`` list); TextVQA and VSR
#: have no RoboMamba evaluation.
ROBOMAMBA_DATASETS = ("pope", "vqav2", "okvqa", "gqa", "vizwiz")

_ANSWER_SPLIT_DATASETS = ("vqav2", "okvqa", "vizwiz")


def robomamba_answer_text(text: str, dataset: str) -> str:
    """The answer string RoboMamba's judge sees, from the decoded generation ``text`` (not part of any scorer).

    1. ``text.strip().replace("\\n", " ")`` before writing ``f"{idx},{answer}\\n"`` to the results file
       (RM:src/test.py:386-388). Strip comes first, so inner newlines become spaces and there is no outer space.
    2. The judges read the file back line by line (``open`` in text mode: universal newlines) and take
       ``line.strip().split(',', 1)[1]`` (RM:src/test.py:178-179, :210-211, :227-228, :246-247, :289-290). A
       carriage return therefore ends the line: the answer is cut at the first ``"\\r"`` and what precedes it is
       right-stripped by ``line.strip()``. (The tail becomes a separate junk line in the file; it is not modelled.)
    3. VQAv2, OK-VQA and VizWiz keep only the part before the first ``"Answer:"``, not stripped again
       (RM:src/test.py:213, :292, :249); GQA and POPE use the whole answer (:230, :181).

    ``dataset`` is one of :data:`ROBOMAMBA_DATASETS`.
    """
    if dataset not in ROBOMAMBA_DATASETS:
        raise ValueError(f"RoboMamba evaluates no {dataset!r}; known: {', '.join(ROBOMAMBA_DATASETS)}")
    answer = robomamba_answer_line(text)
    return robomamba_before_answer(answer) if dataset in _ANSWER_SPLIT_DATASETS else answer


def robomamba_answer_line(text: str) -> str:
    """Steps 1-2 of :func:`robomamba_answer_text`: stripped, newlines to spaces, cut at the first carriage return
    and right-stripped there (the answer line as the judges read it back)."""
    answer = text.strip().replace("\n", " ")
    cut = answer.find("\r")
    if cut >= 0:
        answer = answer[:cut].rstrip()
    return answer


def robomamba_before_answer(answer: str) -> str:
    """Step 3 of :func:`robomamba_answer_text`: the part before the first ``"Answer:"`` (VQAv2, OK-VQA, VizWiz)."""
    return answer.split("Answer:")[0]


# --- POPE --------------------------------------------------------------------------------------------------------

def robomamba_pope(prediction: str, answers: Sequence[str]) -> float:
    """RoboMamba's POPE judge (RM:src/test.py:173-202), per sample.

    The answer reads "yes" when its first three characters, lower-cased, are "yes" (:192): "Yes.", "yes," and
    "yesterday" are yes; "yeah", " yes" and "" are no. The gold is ``label == "yes"`` (:194); the label must be
    "yes" or "no" here. Upstream prints per-file and pooled sklearn F1 and accuracy and the pooled yes rate
    (:197-202); the pooled accuracy over the three files is the headline.
    """
    label = _pope_label(answers)
    return float((prediction[:3].lower() == "yes") == (label == "yes"))


# --- VQAv2 and OK-VQA --------------------------------------------------------------------------------------------

def robomamba_vqa_normalize(text: str) -> str:
    """judger.VQAEval's processing, applied to the prediction and to every human answer (RM:src/judger.py:404-417).

    Newlines / tabs to spaces and strip (:405-411), the punctuation rule (:449-459), number words, articles and
    the VQA contraction table (:461-474; table :222-343, the same 120 pairs as :data:`VQA_CONTRACTIONS`).
    """
    return _process_digit_article(_punctuation_py3(_clean_whitespace(text)), VQA_CONTRACTIONS)


def _lenient_match(prediction: str, answer: str) -> bool:
    """RoboMamba's lenient match (RM:src/judger.py:424; RM:src/test.py:277): the prediction starts with the answer
    (characters, no word boundary), or every whitespace word of the answer, lower-cased, is a *substring* of the
    prediction. An empty answer matches anything."""
    return prediction[:len(answer)] == answer or all(w.lower() in prediction for w in answer.split())


def robomamba_vqa(prediction: str, answers: Sequence[str]) -> float:
    """RoboMamba's VQAv2 / OK-VQA judge: judger.VQAEval.evaluate (RM:src/judger.py:386-447), per question.

    * Both the prediction and every human answer go through :func:`robomamba_vqa_normalize`, always (:404-417).
    * A human answer counts for the prediction under :func:`_lenient_match` (:424): gt "2" matches "20", gt "yes"
      matches "yesterday", gt "no" matches "not sure", gt "red" matches "bored".
    * Leave-one-out (:419-426): the others are the answer dicts ``!=`` the current one; VQAv2 and OK-VQA answers
      carry a unique ``answer_id``, so exactly one (this one) is left out: by position here. ``min(1, n / 3)``,
      mean over the answers (:431).

    The prediction is the judge's answer string (:func:`robomamba_answer_text`). Upstream scores only the question
    ids found in the results (duplicates counted again, :221, :388) and reports ``round(100 * mean, 2)`` (:477).
    """
    _require_answers(answers, "robomamba_vqa")
    pred = robomamba_vqa_normalize(prediction)
    return _leave_one_out([_lenient_match(pred, robomamba_vqa_normalize(a)) for a in answers])


# --- GQA ---------------------------------------------------------------------------------------------------------

def _robomamba_gqa_fold(text: str) -> str:
    """Lower-case, then the substring replacements "men"->"man", "drapes"->"curtains", "girl"->"woman", in this
    order (RM:src/test.py:235-236): "women" -> "woman", "menu" -> "manu", "girls" -> "womans"."""
    return text.lower().replace("men", "man").replace("drapes", "curtains").replace("girl", "woman")


def robomamba_gqa(prediction: str, answers: Sequence[str]) -> float:
    """RoboMamba's GQA judge (RM:src/test.py:222-238), per question.

    Gold and prediction are folded by :func:`_robomamba_gqa_fold`; the answer is right when the prediction starts
    with the gold (characters), or when every whitespace word of the gold is a whitespace *token* of the
    prediction (:237; punctuation stays on the tokens, so "no." is not the token "no"). An empty gold is always
    right. Upstream prints the plain mean over every testdev-balanced question (:238).
    """
    gold = _robomamba_gqa_fold(_single_label(answers, "robomamba_gqa"))
    pred = _robomamba_gqa_fold(prediction)
    tokens = pred.split()
    return float(pred[:len(gold)] == gold or all(w in tokens for w in gold.split()))


# --- VizWiz ------------------------------------------------------------------------------------------------------

#: RoboMamba's punctuation list (RM:src/test.py:23): the VQA list plus the colon; no period, no apostrophe.
ROBOMAMBA_VIZWIZ_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                                "`", ",", "?", "!", ":")


def robomamba_vizwiz_clean(text: str) -> str:
    """RoboMamba's VizWiz cleaning (RM:src/test.py:259-264 for the prediction, :267-271 for the human answers):
    every mark of :data:`ROBOMAMBA_VIZWIZ_PUNCTUATION` becomes a space, newlines and tabs become spaces, strip.
    No case change (the judge lower-cases the prediction only, before this, :257)."""
    for mark in ROBOMAMBA_VIZWIZ_PUNCTUATION:
        text = text.replace(mark, " ")
    return text.replace("\n", " ").replace("\t", " ").strip()


def robomamba_vizwiz(prediction: str, answers: Sequence[str],
                     confidences: Sequence[str] | None = None) -> float:
    """RoboMamba's VizWiz judge (RM:src/test.py:241-281), per question.

    * Prediction: lower-cased (:257), then :func:`robomamba_vizwiz_clean`. Human answers:
      :func:`robomamba_vizwiz_clean` only, *not* lower-cased, no number words or articles (:266-271).
    * A human answer counts for the prediction under :func:`_lenient_match` (:277): a capitalised human answer can
      still match through the word test, which lower-cases its words. (Any answer the prefix test accepts, the
      word test accepts too, so the unlowered GT only shows through the dict equality below: "Yes" and "yes" are
      different dicts.)
    * Leave-one-out by **dict equality** (:273-276): for each answer dict, the others are the dicts ``!=`` it.
      VizWiz answer dicts are ``{"answer", "answer_confidence"}`` with no id, compared *after* the cleaning, so
      every answer with the same cleaned text and the same confidence is left out together with it, not just
      itself. ``confidences`` are the parallel ``answer_confidence`` values; without them all confidences are
      taken as equal, so answers are compared by cleaned text alone. When all answers are equal the question
      scores 0 whatever the prediction.
    * ``min(1, n / 3)``, mean over all the answers (:278-280). Upstream prints the plain mean over val (:281).
    """
    _require_answers(answers, "robomamba_vizwiz")
    if confidences is None:
        confidences = [None] * len(answers)
    elif len(confidences) != len(answers):
        raise ValueError(f"{len(confidences)} confidences for {len(answers)} answers")
    pred = robomamba_vizwiz_clean(prediction.lower())
    keys = [(robomamba_vizwiz_clean(a), c) for a, c in zip(answers, confidences)]
    total = 0.0
    for key in keys:
        n = sum(_lenient_match(pred, other[0]) for other in keys if other != key)
        total += min(1.0, n / 3.0)
    return total / len(keys)


# =================================================================================================================

#: The upstream per-sample scorer of each (protocol, dataset): key ``"<protocol>_<dataset>"``.
UPSTREAM_SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "cobra_vqav2": cobra_vqav2,
    "cobra_gqa": cobra_gqa,
    "cobra_vizwiz": cobra_vizwiz,
    "cobra_textvqa": cobra_textvqa,
    "cobra_pope": choice_accuracy,
    "cobra_vsr": choice_accuracy,
    "robomamba_pope": robomamba_pope,
    "robomamba_vqav2": robomamba_vqa,
    "robomamba_okvqa": robomamba_vqa,
    "robomamba_gqa": robomamba_gqa,
    "robomamba_vizwiz": robomamba_vizwiz,
}
