"""The official scorers, one per dataset, on hand-derived cases; each test names the upstream rule it exercises.

Upstream files (see :mod:`mambaprune.eval.official` for commits): vqaEval.py = GT-Vision-Lab/VQA
PythonEvaluationTools/vqaEvaluation/vqaEval.py; m4c_evaluators.py = facebookresearch/mmf mmf/utils/m4c_evaluators.py;
vizwiz vqaEval.py = the VizWiz-VQA API's vqaEval.py; gqa eval.py = GQA's eval.py; pope evaluate.py =
AoiDragon/POPE evaluate.py.
"""
import pytest
from test_metrics import _official_formula as _loo  # the leave-one-out VQA accuracy written by hand

from mambaprune.eval.metrics import (OFFICIAL_DATASETS, VIZWIZ_CONTRACTIONS, VQA_CONTRACTIONS, get_metric,
                                     gqa_accuracy, official_score, pope_official_parse, pope_summary,
                                     pope_summary_lenient, textvqa_accuracy, textvqa_normalize, vizwiz_accuracy,
                                     vizwiz_normalize, vizwiz_summary, vqa_official_accuracy, vqa_official_normalize)

OTHER7 = ["x"] * 7  # seven human answers nobody predicts



# --- VQAv2 / OK-VQA --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out(k, expected):
    # vqaEval.py L105-112: min(1, matches among the other 9 / 3), averaged over the 10 left-out answers
    answers = ["2"] * k + ["3"] * (10 - k)
    assert vqa_official_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)
    assert _loo(k) == pytest.approx(expected, abs=1e-12)


def test_vqa_all_humans_agree_compares_raw_strings():
    # vqaEval.py L96-98: with len(set(gtAnswers)) == 1 nothing is processed, the raw stripped strings are compared
    assert vqa_official_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_official_accuracy("Yes", ["yes"] * 10) == 0.0          # no lower-casing
    assert vqa_official_accuracy("yes.", ["yes"] * 10) == 0.0         # no period removal
    assert vqa_official_accuracy("two", ["2"] * 10) == 0.0            # no number words
    # vqaEval.py L88-94: newlines / tabs become spaces and both sides are stripped, in either branch
    assert vqa_official_accuracy(" yes\n", ["yes\t"] * 10) == 1.0


def test_vqa_disagreeing_humans_process_both_sides():
    # vqaEval.py L98-103: when the humans disagree the prediction and every human answer are fully processed
    assert vqa_official_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_official_accuracy("Two.", ["2"] * 3 + OTHER7) == pytest.approx(0.9)
    # L100-101: the human answers get the digit/article rule too ("two" -> "2"), not only the punctuation rule
    # (the behaviour before commit a013f00, which would give 1 match = 0.3 here)
    assert vqa_official_accuracy("2", ["two", "Two", "2"] + OTHER7) == pytest.approx(0.9)
    assert vqa_official_accuracy("a dog", ["the dog", "dog"] + ["cat"] * 8) == pytest.approx(0.6)


def test_vqa_contraction_table_as_published():
    # vqaEval.py L21-42: 120 pairs; capitalised keys are kept but, words being lower-cased first (L144), never match
    assert len(VQA_CONTRACTIONS) == 120
    assert VQA_CONTRACTIONS["Im"] == "I'm" and VQA_CONTRACTIONS["Ive"] == "I've" and "im" not in VQA_CONTRACTIONS
    assert vqa_official_normalize("Im") == "im" and vqa_official_normalize("Ive") == "ive"
    assert vqa_official_accuracy("Im", ["I'm"] * 3 + OTHER7) == 0.0    # "i'm" (human) != "im" (prediction)
    assert vqa_official_normalize("dont") == "don't" and vqa_official_normalize("youre") == "you're"
    assert vqa_official_normalize("somebody'd") == "somebodyd"         # the one pair that runs backwards
    assert vqa_official_normalize("its") == "its"                      # not in the table


def test_vqa_period_rule():
    # vqaEval.py L62 / L137-139: "(?!<=\d)(\.)(?!\d)" is a period not followed by a digit (the first group is a
    # no-op lookahead, not a lookbehind), so "5." loses its period and "3.5" keeps it
    assert vqa_official_normalize("5.") == "5"
    assert vqa_official_normalize("3.5") == "3.5"
    # ... and re.UNICODE (32) is passed as sub's count: only the first 32 periods go
    assert vqa_official_normalize("x" + "." * 32 + "y") == "xy"
    assert vqa_official_normalize("x" + "." * 33 + "y") == "x.y"
    assert vqa_official_accuracy("x" + "." * 33 + "y", ["xy"] * 3 + OTHER7) == 0.0
    assert vqa_official_accuracy("x" + "." * 32 + "y", ["xy"] * 3 + OTHER7) == pytest.approx(0.9)
    # vqaEval.py is Python 2 and compiles its patterns without re.UNICODE: \d is [0-9], so a period before an
    # Arabic-Indic digit is removed (MMF, Python 3, keeps it)
    assert vqa_official_normalize("1.\u0663") == "1\u0663"
    assert textvqa_normalize("1.\u0663") == "1.\u0663"


def test_vqa_punctuation_rule():
    # vqaEval.py L130-136: a mark next to a space is deleted, one inside a word becomes a space, and a
    # digit-comma-digit group anywhere (L63) deletes every mark
    assert vqa_official_normalize("t-shirt") == "t shirt"
    assert vqa_official_normalize("red, white") == "red white"
    assert vqa_official_normalize("red,white") == "red white"
    assert vqa_official_normalize("1,000") == "1000"
    assert vqa_official_normalize("1,000-2,000") == "10002000"
    assert vqa_official_normalize("2:50 pm") == "2:50 pm"          # the colon is not in the list (L64-66)


def test_vqa_digit_article_rule():
    # vqaEval.py L142-155: lower-case, split, number words -> digits, drop a / an / the, then contractions
    assert vqa_official_normalize("The Two Dogs") == "2 dogs"
    assert vqa_official_normalize("none") == "0"
    assert vqa_official_normalize("an apple") == "apple"
    assert official_score("okvqa", "Ten", ["10"] * 3 + OTHER7) == pytest.approx(0.9)   # OK-VQA uses vqaEval.py


# --- TextVQA ---------------------------------------------------------------------------------------------------

def test_textvqa_processes_both_sides_always():
    # m4c_evaluators.py L227 / L249: EvalAIAnswerProcessor on every human answer and on the prediction, with no
    # "all humans agree" branch
    assert textvqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert textvqa_accuracy("2", ["Two"] * 3 + OTHER7) == pytest.approx(0.9)
    assert textvqa_accuracy("STOP", ["stop", "Stop"] + ["go"] * 8) == pytest.approx(0.6)


def test_textvqa_word_tokenize():
    # m4c_evaluators.py L179-182: lower-case, delete "," and "?", "'s" -> " 's", strip
    assert textvqa_normalize("Macy's") == "macy 's"
    assert textvqa_normalize("Let's go") == "let 's go"          # so the "let's" contraction key never matches
    assert textvqa_normalize("what?") == "what"
    assert textvqa_accuracy("macys", ["macy's"] * 10) == 0.0
    # the commas are gone before the digit-comma-digit test (L151, L188), which therefore never fires
    assert textvqa_normalize("1,000-2,000") == "1000 2000"


def test_textvqa_needs_ten_answers():
    # m4c_evaluators.py L228: assert len(answers) == 10
    with pytest.raises(ValueError, match="10"):
        textvqa_accuracy("a", ["a"] * 9)


def test_textvqa_unique_answer_scores():
    # m4c_evaluators.py L229-251: the score of the unique processed answer the prediction equals (leave-one-out
    # over the 10), 0 when it equals none
    answers = ["coca cola"] * 2 + ["coca-cola"] + ["coke"] * 7
    assert textvqa_accuracy("Coca Cola", answers) == pytest.approx(_loo(3))   # "coca-cola" -> "coca cola"
    assert textvqa_accuracy("pepsi", answers) == 0.0


# --- VizWiz ----------------------------------------------------------------------------------------------------

def test_vizwiz_only_prediction_processed():
    # vizwiz vqaEval.py L90-95: the prediction is processed; L100: human answers compared exactly as annotated
    assert vizwiz_accuracy("Two.", ["2"] * 10) == 1.0
    assert vizwiz_accuracy("dog", ["Dog"] * 10) == 0.0             # humans are not lower-cased
    assert vizwiz_accuracy("dog", ["dog "] * 10) == 0.0            # nor stripped
    assert vizwiz_accuracy("a dog", ["the dog"] * 3 + OTHER7) == 0.0   # nor stripped of articles
    assert vizwiz_accuracy("Unanswerable", ["unanswerable"] * 4 + ["dog"] * 6) == 1.0


def test_vizwiz_contraction_values():
    # vizwiz vqaEval.py L25-46: values carry the typographic apostrophe U+2019, except those of aint, arent, cant,
    # couldve, couldnt, weve, wheres, whove; keys too, except "couldn'tve" and "hadn'tve"
    assert len(VIZWIZ_CONTRACTIONS) == 120
    assert vizwiz_normalize("dont") == "don\u2019t"
    assert vizwiz_normalize("youre") == "you\u2019re"
    assert vizwiz_normalize("cant") == "can't" and vizwiz_normalize("weve") == "we've"
    assert VIZWIZ_CONTRACTIONS["couldn'tve"] == "couldn\u2019t\u2019ve"
    assert VIZWIZ_CONTRACTIONS["couldnt\u2019ve"] == "couldn\u2019t\u2019ve" and "couldnt've" not in VIZWIZ_CONTRACTIONS
    assert VIZWIZ_CONTRACTIONS["hadn'tve"] == "hadn\u2019t\u2019ve"
    assert VIZWIZ_CONTRACTIONS["wheres"] == "where's" and VIZWIZ_CONTRACTIONS["whove"] == "who've"
    assert VIZWIZ_CONTRACTIONS["let\u2019s"] == "let\u2019s" and VIZWIZ_CONTRACTIONS["twas"] == "\u2019twas"
    # so an apostrophe-less prediction no longer matches the humans' ASCII spelling
    assert vizwiz_accuracy("dont", ["don't"] * 10) == 0.0
    assert vizwiz_accuracy("dont", ["don\u2019t"] * 10) == 1.0
    assert vqa_official_accuracy("dont", ["don't"] * 9 + ["no"]) == 1.0   # VQA's table has the ASCII one


def test_vizwiz_period_count():
    # vizwiz vqaEval.py L174-176: re.UNICODE passed as count, as in vqaEval.py
    assert vizwiz_normalize("x" + "." * 33 + "y") == "x.y"


def test_vizwiz_summary_answerable_split():
    # per-sample scores: 1.0, 0.0 (answerable), 1.0 (unanswerable); answer types as VizWiz annotates them
    preds = ["Two", "cat", "unanswerable"]
    answers = [["2"] * 10, ["dog"] * 10, ["unanswerable"] * 10]
    s = vizwiz_summary(preds, answers, [1, 1, 0], ["number", "other", "unanswerable"])
    assert s == {"accuracy": pytest.approx(2 / 3), "answerable": 0.5, "unanswerable": 1.0,
                 "answer_type:number": 1.0, "answer_type:other": 0.0, "answer_type:unanswerable": 1.0}
    only_answerable = vizwiz_summary(preds[:2], answers[:2], [True, True])
    assert only_answerable == {"accuracy": 0.5, "answerable": 0.5}          # no unanswerable question: no key
    with pytest.raises(ValueError):
        vizwiz_summary(preds, answers, [1, 0])


# --- GQA -------------------------------------------------------------------------------------------------------

def test_gqa_raw_equality():
    # gqa eval.py L366-369: correct = (predicted == gold), predictions used as given (L133-134)
    assert gqa_accuracy("yes", ["yes"]) == 1.0
    assert gqa_accuracy("Yes", ["yes"]) == 0.0
    assert gqa_accuracy("yes.", ["yes"]) == 0.0
    assert gqa_accuracy(" yes", ["yes"]) == 0.0
    assert gqa_accuracy("traffic light", ["traffic light"]) == 1.0
    with pytest.raises(ValueError):
        gqa_accuracy("yes", ["yes", "no"])


# --- POPE ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("No", "no"),                      # L18: "No" is one of the three words
    ("no", "no"),
    ("No, there is no dog.", "no"),     # L16: commas deleted, so "No," is "No"
    ("It is not.", "no"),              # L13-14: text before the first period
    ("Yes. No.", "yes"),               # only the first sentence
    ("NO", "yes"),                     # L18: case-sensitive, "NO" is none of "No", "not", "no"
    ("Not really", "yes"),             # "Not" is not "not"
    ("no!", "yes"),                    # only commas are deleted (L16): "no!" is not "no"
    ("no\n", "yes"),                   # L17: split(' ') on single spaces only
    ("", "yes"),                       # nothing answered reads as "yes"
    ("1.5 no", "yes"),                 # the first "." ends the first sentence even inside a number
])
def test_pope_parse(text, expected):
    assert pope_official_parse(text) == expected


def test_pope_summary_hand_computed():
    # pope evaluate.py L29-57 on: parsed yes yes no yes(NO) yes; labels yes no no no yes -> TP 2, FP 2, TN 1, FN 0
    preds = ["Yes", "yes, it is", "No", "NO", "There is a dog."]
    labels = [["yes"], ["no"], ["no"], ["no"], ["yes"]]
    s = pope_summary(preds, labels)
    assert s["accuracy"] == pytest.approx(3 / 5)       # L57
    assert s["precision"] == pytest.approx(2 / 4)      # L54
    assert s["recall"] == pytest.approx(2 / 2)         # L55
    assert s["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)  # L56
    assert s["yes_ratio"] == pytest.approx(4 / 5)      # L38
    # the lenient summary (still what METRICS["pope"] serves) reads "NO" as "no"
    assert pope_summary_lenient(preds, labels)["accuracy"] == pytest.approx(4 / 5)
    assert get_metric("pope").summarize(preds, labels) == pope_summary_lenient(preds, labels)


def test_pope_summary_zero_divisions():
    # evaluate.py L54-56 divide by zero; here precision = 0 when nothing is answered "yes", recall = 0 when no
    # label is "yes", F1 = 0 when precision + recall = 0
    assert pope_summary(["no", "no"], [["yes"], ["no"]]) == {
        "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert pope_summary(["yes", "no"], [["no"], ["no"]]) == {
        "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.5}
    assert pope_summary(["yes", "no"], [["no"], ["yes"]])["f1"] == 0.0   # TP 0, FP 1, FN 1


def test_pope_labels_must_be_yes_or_no():
    # evaluate.py L23-27 counts any label but "no" as positive; a label other than "yes" / "no" is refused here
    with pytest.raises(ValueError, match="yes' or 'no"):
        pope_summary(["yes"], [["No"]])
    with pytest.raises(ValueError, match="yes' or 'no"):
        official_score("pope", "yes", ["maybe"])


# --- the dispatcher --------------------------------------------------------------------------------------------

def test_official_score_dispatch():
    assert OFFICIAL_DATASETS == ("vqav2", "okvqa", "textvqa", "vizwiz", "gqa", "pope", "vsr")
    assert official_score("vqav2", "Yes", ["yes"] * 10) == 0.0              # vqaEval.py L96-98 raw branch
    assert official_score("textvqa", "Yes", ["yes"] * 10) == 1.0            # m4c_evaluators.py L227 / L249
    assert official_score("vizwiz", "Yes", ["yes"] * 10) == 1.0             # vizwiz vqaEval.py L94-95
    assert official_score("gqa", "Yes", ["yes"]) == 0.0                     # gqa eval.py L369
    assert official_score("pope", "No, it is not.", ["no"]) == 1.0          # pope evaluate.py L13-18
    assert official_score("pope", "NO", ["no"]) == 0.0
    # VSR (src/eval.py L56-58): accuracy of the True/False against the label
    assert official_score("vsr", "True", ["true"]) == 1.0
    assert official_score("vsr", "False.", ["true"]) == 0.0
    with pytest.raises(ValueError, match="vqav2"):
        official_score("coco", "a", ["a"])
