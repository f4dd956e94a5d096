"""Metrics against hand-computed values: VQA normalisation and leave-one-out accuracy, GQA, POPE, VSR."""
import pytest

from mambaprune.eval.metrics import (METRICS, get_metric, gqa_exact_match, normalize_answer, pope_parse,
                                     pope_summary, vqa_accuracy, vsr_accuracy, vsr_parse)


@pytest.mark.parametrize("text, expected", [
    ("Two.", "2"),                 # number word, trailing period
    ("a dog", "dog"),              # article
    ("The Two Dogs!", "2 dogs"),   # case, articles, number word, punctuation next to nothing
    ("an apple", "apple"),
    ("none", "0"),
    ("\tTen\n", "10"),
    ("dont", "don't"),             # contraction without apostrophe -> the apostrophe form
    ("don't", "don't"),
    ("youre right", "you're right"),
    ("its", "its"),                # a real word, not it's
    ("1,000", "1000"),             # a digit group: all punctuation deleted
    ("3.5", "3.5"),                # a decimal point stays
    ("t-shirt", "t shirt"),        # punctuation inside a word becomes a space
    ("yes , it is", "yes it is"),  # punctuation next to a space is deleted
    ("red/white", "red white"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def _official_formula(k, n=10):
    """Hand-written leave-one-out VQA accuracy for k of n humans agreeing with the prediction."""
    return (k * min(1, (k - 1) / 3) + (n - k) * min(1, k / 3)) / n


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(k, expected):
    answers = ["2"] * k + ["3"] * (10 - k)
    assert vqa_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)
    assert _official_formula(k) == pytest.approx(expected, abs=1e-12)
    # 3 matching humans give 0.9, not the naive min(1, 3/3) = 1: each matching human is left out in turn


def test_vqa_accuracy_normalises_both_sides():
    answers = ["two", "2", "2", "Two.", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("2", answers) == pytest.approx(1.0)     # 4 humans after normalisation
    assert vqa_accuracy("Two dogs", ["2 dogs"] * 2 + ["dogs"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("a dog", ["dog"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_gqa_exact_match():
    assert gqa_exact_match("Red.", ["red"]) == 1.0
    assert gqa_exact_match("  YES ", ["yes"]) == 1.0
    assert gqa_exact_match("a red", ["red"]) == 0.0      # GQA does not drop articles
    assert gqa_exact_match("two", ["2"]) == 0.0          # nor map number words
    assert gqa_exact_match("left", ["right"]) == 0.0


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),
    ("No", "no"),
    ("No, there is no dog.", "no"),
    ("There is not a cat in the image", "no"),
    ("Yes, there is a dog. No other animals.", "yes"),   # only the first sentence counts
    ("I cannot tell", "yes"),                            # "cannot" is neither "no" nor "not"
    ("no.", "no"),
])
def test_pope_parse(text, expected):
    assert pope_parse(text) == expected


def test_pope_summary_hand_computed():
    preds = ["Yes", "yes, it is", "No", "no.", "There is a dog."]
    labels = [["yes"], ["no"], ["no"], ["yes"], ["yes"]]
    # parsed: yes yes no no yes -> tp 2, fp 1, tn 1, fn 1
    s = pope_summary(preds, labels)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 5)
    all_no = pope_summary(["no", "no"], [["yes"], ["no"]])
    assert all_no == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError, match="yes' or 'no"):
        pope_summary(["yes"], [["maybe"]])


def test_vsr():
    assert vsr_parse("True") is True and vsr_parse("Yes, it is.") is True
    assert vsr_parse("False.") is False and vsr_parse("It is not true") is False
    assert vsr_parse("maybe") is None
    assert vsr_accuracy("true", ["true"]) == 1.0
    assert vsr_accuracy("False", ["true"]) == 0.0
    assert vsr_accuracy("maybe", ["false"]) == 0.0
    with pytest.raises(ValueError):
        vsr_accuracy("true", ["1"])


def test_metric_table():
    from mambaprune.eval.metrics import OFFICIAL_DATASETS
    from mambaprune.eval.upstream_scorers import UPSTREAM_SCORERS

    assert set(METRICS) == ({"vqa_accuracy", "exact_match", "pope", "vsr"}
                            | {f"{d}_official" for d in OFFICIAL_DATASETS} | set(UPSTREAM_SCORERS))
    # the protocols' scorers: official POPE summarises as evaluate.py does (precision etc.), the others by the mean
    assert set(get_metric("pope_official").summarize(["yes", "no"], [["yes"], ["yes"]])) == {
        "accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert get_metric("gqa_official").summarize(["Yes", "yes"], [["yes"], ["yes"]]) == {"accuracy": 0.5}
    assert get_metric("pope").score("No.", ["no"]) == 1.0
    summary = get_metric("vqa_accuracy").summarize(["2", "cat"], [["2"] * 10, ["2"] * 10])
    assert summary == {"accuracy": pytest.approx(0.5)}
    assert get_metric("vsr").summarize(["true", "false"], [["true"], ["true"]]) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="bleu"):
        get_metric("bleu")
