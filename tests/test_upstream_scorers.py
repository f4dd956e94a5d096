"""The upstream scorers (the models' released evaluation code) on hand-derived cases.

Each test names the upstream rule it exercises. VE = h-zhao1997/vlm-evaluation@b0a691f (Cobra's harness), RM =
lmzpai/roboMamba@c2f52c4, CB = h-zhao1997/cobra@4b81082; see :mod:`mambaprune.eval.upstream_scorers`.
"""
import pytest

from mambaprune.eval import official
from mambaprune.eval.upstream_scorers import (COBRA_CHOICES, COBRA_VIZWIZ_CONTRACTIONS, ROBOMAMBA_DATASETS,
                                              ROBOMAMBA_VIZWIZ_PUNCTUATION, UPSTREAM_SCORERS, choice_accuracy,
                                              cobra_choice, cobra_gqa, cobra_gqa_clean, cobra_textvqa, cobra_vizwiz,
                                              cobra_vizwiz_normalize, cobra_vqav2, cobra_vqav2_normalize,
                                              robomamba_answer_text, robomamba_gqa, robomamba_pope, robomamba_vizwiz,
                                              robomamba_vizwiz_clean, robomamba_vqa, robomamba_vqa_normalize)

X7 = ["x"] * 7  # seven human answers that never match
UNIQUE = [str(i) for i in range(10)]  # distinct VizWiz answer_confidence values: every answer dict differs


# =================================================================================================================
# cobra: VE's VQAv2 evaluator
# =================================================================================================================

@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_cobra_vqav2_leave_one_out(k, expected):
    # VE:vlm_eval/util/evaluation/vqav2/eval.py:437-448: min(1, matches among the 9 others / 3), mean over the 10
    assert cobra_vqav2("2", ["2"] * k + ["3"] * (10 - k)) == pytest.approx(expected, abs=1e-12)


def test_cobra_vqav2_prediction_always_normalised_no_agreement_gate():
    # VE vqav2/eval.py:427-430: the prediction is always processed (the official "humans disagree" gate is absent)
    assert cobra_vqav2("Yes.", ["yes"] * 10) == 1.0
    assert official.vqa_official_accuracy("Yes.", ["yes"] * 10) == 0.0
    assert cobra_vqav2(" the two\n", ["2"] * 10) == 1.0          # strip, article dropped, number word -> digit
    assert cobra_vqav2_normalize("Dont\tdo it!") == "don't do it"


def test_cobra_vqav2_humans_get_punctuation_only():
    # VE vqav2/eval.py:433-434: human answers only go through process_punctuation
    assert cobra_vqav2("yes", ["Yes"] * 10) == 0.0                # not lower-cased
    assert cobra_vqav2("two", ["two"] * 10) == 0.0                # prediction "2", human "two" kept
    assert cobra_vqav2("yes", [" yes"] * 10) == 0.0               # not stripped
    assert cobra_vqav2("dog", ["a dog"] * 10) == 0.0              # article kept
    assert cobra_vqav2("yes", ["yes."] * 10) == 1.0               # periods are removed (:221)
    assert cobra_vqav2("yes", ["yes!"] * 10) == 0.0               # "!" becomes a space: "yes " (:220), never equal


def test_cobra_vqav2_period_count_quirk():
    # VE vqav2/eval.py:221: re.UNICODE (32) passed as count, so only 32 periods are removed
    assert cobra_vqav2("." * 32 + "yes", ["yes"] * 10) == 1.0
    assert cobra_vqav2_normalize("." * 33 + "yes") == ".yes"
    assert cobra_vqav2("." * 33 + "yes", ["yes"] * 10) == 0.0


def test_cobra_vqav2_comma_test_matches_unicode_digits():
    # VE vqav2/eval.py:210, :217 is Python 3: \d matches any decimal digit, so "٣,٤" deletes every mark
    assert cobra_vqav2_normalize("\u0663,\u0664-\u0665") == "\u0663\u0664\u0665"
    assert cobra_vqav2("\u0663,\u0664-\u0665", ["\u0663\u0664\u0665"] * 10) == 1.0
    assert cobra_vqav2_normalize("1,000-2") == "10002"


# =================================================================================================================
# cobra: GQA (harness post-processing + raw gold)
# =================================================================================================================

def test_cobra_gqa_deletes_ascii_punctuation_and_lowercases():
    # VE:vlm_eval/tasks/harnesses/gqa.py:281: delete every string.punctuation char, then lower()
    assert cobra_gqa_clean("Yes.") == "yes"
    assert cobra_gqa_clean("Don't-stop, (ok)?") == "dontstop ok"
    assert cobra_gqa("Yes.", ["yes"]) == 1.0
    assert cobra_gqa("No!", ["no"]) == 1.0
    assert cobra_gqa("yes\u2026", ["yes"]) == 0.0                  # non-ASCII punctuation stays
    assert cobra_gqa(" yes", ["yes"]) == 0.0                       # no strip


def test_cobra_gqa_gold_is_raw():
    # VE:vlm_eval/util/evaluation/gqa/eval.py:405-408: predicted == gold, gold not normalised
    assert cobra_gqa("t-shirt", ["t-shirt"]) == 0.0                # the hyphen is gone from the prediction only
    assert cobra_gqa("tshirt", ["tshirt"]) == 1.0
    assert cobra_gqa("Yes", ["Yes"]) == 0.0                        # prediction lower-cased, gold not
    with pytest.raises(ValueError):
        cobra_gqa("yes", ["yes", "no"])


# =================================================================================================================
# cobra: VizWiz
# =================================================================================================================

def test_cobra_vizwiz_backtick_contractions():
    # VE:vlm_eval/util/evaluation/vizwiz/eval.py:28-149 (backticks), applied to the prediction (:264-277)
    assert cobra_vizwiz_normalize("dont") == "don`t"
    assert cobra_vizwiz("dont", ["don`t"] * 10) == 1.0
    assert cobra_vizwiz("dont", ["don't"] * 10) == 0.0
    assert cobra_vizwiz("dont", ["dont"] * 10) == 0.0
    # the official VizWiz API writes U+2019, so it is a different scorer
    assert official.vizwiz_accuracy("dont", ["don`t"] * 10) == 0.0
    # entries that keep the ASCII apostrophe (:28-149): values of "cant" / "weve", key "couldn'tve"
    assert cobra_vizwiz_normalize("cant weve") == "can't we've"
    assert cobra_vizwiz_normalize("couldn'tve couldnt've") == "couldn`t`ve couldnt've"
    # keys written with a backtick can never match: the punctuation rule turned the backtick into a space first
    assert cobra_vizwiz_normalize("couldnt`ve") == "couldn't ve"


def test_cobra_vizwiz_contraction_table():
    # VE vizwiz/eval.py:28-149: 120 pairs, no U+2019 left, same keys as the official table up to the quote mark
    assert len(COBRA_VIZWIZ_CONTRACTIONS) == 120
    assert not any("\u2019" in k + v for k, v in COBRA_VIZWIZ_CONTRACTIONS.items())
    assert COBRA_VIZWIZ_CONTRACTIONS["hed`ve"] == "he`d`ve"
    assert COBRA_VIZWIZ_CONTRACTIONS["hadn'tve"] == "hadn`t`ve"
    assert COBRA_VIZWIZ_CONTRACTIONS["wheres"] == "where's"
    assert COBRA_VIZWIZ_CONTRACTIONS["let`s"] == "let`s"


def test_cobra_vizwiz_humans_raw_leave_one_out_by_index():
    # VE vizwiz/eval.py:208-213: the humans are compared as annotated, others chosen by index
    assert cobra_vizwiz("Yes", ["yes"] * 10) == 1.0
    assert cobra_vizwiz("yes", ["Yes"] * 10) == 0.0
    assert cobra_vizwiz("yes", ["yes."] * 10) == 0.0
    assert cobra_vizwiz("yes", ["yes"] * 3 + X7) == pytest.approx(0.9)
    assert cobra_vizwiz("unanswerable", ["unanswerable"] * 10) == 1.0   # identical answers still count (by index)


# =================================================================================================================
# cobra: TextVQA, POPE, VSR
# =================================================================================================================

def test_cobra_textvqa_is_the_m4c_evaluator():
    # VE:vlm_eval/util/evaluation/textvqa/m4c_evaluators.py:181-253 is mmf's evaluator unchanged
    assert cobra_textvqa is official.textvqa_accuracy
    assert cobra_textvqa("Macy's", ["macy 's"] * 10) == 1.0        # word_tokenize, :181-184


def test_cobra_choice_is_numpy_argmax():
    # VE:vlm_eval/tasks/harnesses/pope.py:316 and vsr.py:261: np.argmax over the renormalised probabilities
    # (CB:cobra/models/vlms/cobra.py:539-545)
    assert cobra_choice([0.3, 0.7], COBRA_CHOICES["pope"]) == "No"
    assert cobra_choice([0.7, 0.3], COBRA_CHOICES["vsr"]) == "True"
    assert cobra_choice([0.5, 0.5], ("Yes", "No")) == "Yes"                     # a tie goes to index 0
    assert cobra_choice([float("nan"), float("nan")], ("Yes", "No")) == "Yes"   # 0/0 underflow
    assert cobra_choice([0.9, float("nan")], ("Yes", "No")) == "No"             # argmax stops at a NaN
    assert COBRA_CHOICES == {"pope": ("Yes", "No"), "vsr": ("True", "False")}
    with pytest.raises(ValueError):
        cobra_choice([1.0], ("Yes", "No"))


def test_choice_accuracy():
    # VE pope.py:316-317, vsr.py:261-262: exact match of the chosen candidate with the label
    assert choice_accuracy("Yes", ["yes"]) == 1.0
    assert choice_accuracy("No", ["yes"]) == 0.0
    assert choice_accuracy("no", ["no"]) == 1.0
    # VSR labels: VE vsr.py:65 reads label == 1 as True
    assert choice_accuracy("True", ["1"]) == 1.0
    assert choice_accuracy("False", ["0"]) == 1.0
    assert choice_accuracy("False", ["True"]) == 0.0
    assert choice_accuracy("True", [True]) == 1.0
    assert choice_accuracy("False", [1]) == 0.0
    for bad in (("Yes", ["true"]), ("maybe", ["yes"]), ("Yes", ["yes", "no"]), ("True", ["2"])):
        with pytest.raises(ValueError):
            choice_accuracy(*bad)


# =================================================================================================================
# robomamba: the answer text the judges read
# =================================================================================================================

def test_robomamba_answer_text_write_and_read_back():
    # RM:src/test.py:387: strip, then "\n" -> " "
    assert robomamba_answer_text("\n yes\nQuestion: why \n", "gqa") == "yes Question: why"
    assert robomamba_answer_text(" yes", "pope") == "yes"
    # RM:src/test.py:178-179 etc.: universal newlines end the line at "\r", line.strip() drops the spaces before it
    assert robomamba_answer_text("yes \rno", "gqa") == "yes"
    assert robomamba_answer_text("a\r\nb", "pope") == "a"


def test_robomamba_answer_text_answer_split():
    # RM:src/test.py:213 (VQAv2), :292 (OK-VQA), :249 (VizWiz): the part before the first "Answer:", not stripped
    for ds in ("vqav2", "okvqa", "vizwiz"):
        assert robomamba_answer_text("yes Question: what? Answer: no Answer: x", ds) == "yes Question: what? "
        assert robomamba_answer_text("Answer: no", ds) == ""
    # RM:src/test.py:230 (GQA), :181 (POPE): the whole answer
    assert robomamba_answer_text("yes Answer: no", "gqa") == "yes Answer: no"
    assert robomamba_answer_text("Answer: yes", "pope") == "Answer: yes"
    assert ROBOMAMBA_DATASETS == ("pope", "vqav2", "okvqa", "gqa", "vizwiz")
    with pytest.raises(ValueError):
        robomamba_answer_text("yes", "textvqa")                     # not evaluated by RoboMamba


# =================================================================================================================
# robomamba: POPE
# =================================================================================================================

@pytest.mark.parametrize("answer, says_yes", [("Yes", True), ("yes,", True), ("Yes.", True), ("YES", True),
                                              ("yesterday", True), ("yeah", False), ("No", False), ("", False),
                                              (" yes", False), ("ye", False)])
def test_robomamba_pope_first_three_characters(answer, says_yes):
    # RM:src/test.py:192: d2[qid][:3].lower() == 'yes'; :194: gt = label == 'yes'
    assert robomamba_pope(answer, ["yes"]) == float(says_yes)
    assert robomamba_pope(answer, ["no"]) == float(not says_yes)


def test_robomamba_pope_label_checked():
    with pytest.raises(ValueError):
        robomamba_pope("yes", ["Yes"])


# =================================================================================================================
# robomamba: VQAv2 / OK-VQA (judger.VQAEval)
# =================================================================================================================

def test_robomamba_vqa_both_sides_normalised():
    # RM:src/judger.py:404-417: GT and prediction: whitespace, punctuation, digits/articles/contractions, always
    assert robomamba_vqa_normalize(" The Two dogs.\n") == "2 dogs"
    assert robomamba_vqa("2", ["Two"] * 10) == 1.0
    assert robomamba_vqa("dog", ["a dog"] * 10) == 1.0
    assert robomamba_vqa("yes", ["Yes!"] * 10) == 1.0


def test_robomamba_vqa_lenient_prefix_and_substring():
    # RM:src/judger.py:424: prediction starts with the answer, or each answer word is a substring of the prediction
    assert robomamba_vqa("20", ["2"] * 10) == 1.0                  # character prefix, no word boundary
    assert robomamba_vqa("yesterday", ["yes"] * 10) == 1.0
    assert robomamba_vqa("not sure", ["no"] * 10) == 1.0           # substring
    assert robomamba_vqa("bored", ["red"] * 10) == 1.0
    assert robomamba_vqa("blue and red", ["red blue"] * 10) == 1.0  # every word, any order
    assert robomamba_vqa("blue", ["red blue"] * 10) == 0.0
    assert official.vqa_official_accuracy("yesterday", ["yes"] * 9 + ["no"]) == 0.0


def test_robomamba_vqa_empty_answer_matches_anything():
    # RM:src/judger.py:424: resAns[:0] == "" for a GT that normalises to "" ("the" is an article)
    assert robomamba_vqa("zebra", ["the"] * 10) == 1.0


def test_robomamba_vqa_leave_one_out():
    # RM:src/judger.py:419-426: answer_ids are unique, so 9 others; min(1, n/3), mean over the 10 (:431)
    assert robomamba_vqa("20", ["2"] + X7 + ["y", "z"]) == pytest.approx(0.3)   # 9 x 1/3 and one 0
    assert robomamba_vqa("20", ["2"] * 3 + X7) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        robomamba_vqa("x", [])


# =================================================================================================================
# robomamba: GQA
# =================================================================================================================

def test_robomamba_gqa_prefix_or_gold_tokens():
    # RM:src/test.py:237: x1 == x2[:len(x1)] or all(u in x2.split() for u in x1.split())
    assert robomamba_gqa("Yes, it is.", ["yes"]) == 1.0           # prefix, case folded (:235-236)
    assert robomamba_gqa("the snow is white", ["white snow"]) == 1.0
    assert robomamba_gqa("snowy white", ["white snow"]) == 0.0     # "snow" is not a token
    assert robomamba_gqa("it is no.", ["no"]) == 0.0               # punctuation stays on the token
    assert robomamba_gqa("no.", ["no"]) == 1.0                     # but the prefix test catches it
    assert robomamba_gqa("bored", ["red"]) == 0.0                  # tokens, not substrings (unlike judger.py)
    assert robomamba_gqa("anything", [""]) == 1.0


def test_robomamba_gqa_replacements():
    # RM:src/test.py:235-236: "men"->"man", "drapes"->"curtains", "girl"->"woman" as substrings, both sides
    assert robomamba_gqa("woman", ["women"]) == 1.0
    assert robomamba_gqa("curtains", ["drapes"]) == 1.0
    assert robomamba_gqa("a woman", ["girl"]) == 1.0
    assert robomamba_gqa("manu", ["menu"]) == 1.0
    assert robomamba_gqa("womans", ["girls"]) == 1.0
    with pytest.raises(ValueError):
        robomamba_gqa("yes", [])


# =================================================================================================================
# robomamba: VizWiz
# =================================================================================================================

def test_robomamba_vizwiz_cleaning():
    # RM:src/test.py:23: the punct list has ':' and no '.'; :257-264 prediction lower + clean; :266-271 GT clean
    assert ":" in ROBOMAMBA_VIZWIZ_PUNCTUATION and "." not in ROBOMAMBA_VIZWIZ_PUNCTUATION
    assert robomamba_vizwiz_clean(" 12:30!\n") == "12 30"
    assert robomamba_vizwiz_clean("Yes.") == "Yes."                # no period removal, no lower-casing
    assert robomamba_vizwiz("a b", ["a:b"] * 10, UNIQUE) == 1.0
    assert robomamba_vizwiz("yes", ["yes."] * 9 + ["no"], UNIQUE) == 0.0
    assert robomamba_vizwiz("YES it is", ["yes"] * 9 + ["no"], UNIQUE) == 1.0


def test_robomamba_vizwiz_lenient_match():
    # RM:src/test.py:277: prefix (case-sensitive against the unlowered GT) or every GT word, lowered, a substring
    assert robomamba_vizwiz("bored", ["red"] * 9 + ["x"], UNIQUE) == 1.0
    assert robomamba_vizwiz("yes", ["Yes"] * 9 + ["x"], UNIQUE) == 1.0     # the word test lowers the GT words


def test_robomamba_vizwiz_dict_equality_leave_out():
    # RM:src/test.py:273-276: otherGTAns drops every answer dict equal to the current one (no id in VizWiz)
    assert robomamba_vizwiz("unanswerable", ["unanswerable"] * 10) == 0.0
    # equal after the in-place cleaning (:266-271): "yes!" and "yes" are the same dict
    assert robomamba_vizwiz("yes", ["yes!"] * 5 + ["yes"] * 5) == 0.0
    # the GT is not lower-cased (:266-271), so "Yes" and "yes" are different dicts and count for each other
    assert robomamba_vizwiz("yes", ["Yes"] * 5 + ["yes"] * 5) == 1.0
    # 4 "yes" and 6 "no": each "yes" sees only the 6 "no" (0 matches), each "no" sees the 4 "yes" (1)
    assert robomamba_vizwiz("yes", ["yes"] * 4 + ["no"] * 6) == pytest.approx(0.6)
    assert official.vizwiz_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
    # with answer_confidence: dicts differ where the confidences differ
    confs = ["yes"] * 9 + ["maybe"]
    assert robomamba_vizwiz("unanswerable", ["unanswerable"] * 10, confs) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        robomamba_vizwiz("x", ["x"] * 10, ["yes"])


# =================================================================================================================

def test_registry():
    assert set(UPSTREAM_SCORERS) == {"cobra_vqav2", "cobra_gqa", "cobra_vizwiz", "cobra_textvqa", "cobra_pope",
                                     "cobra_vsr", "robomamba_pope", "robomamba_vqav2", "robomamba_okvqa",
                                     "robomamba_gqa", "robomamba_vizwiz"}
    assert UPSTREAM_SCORERS["cobra_pope"] is choice_accuracy and UPSTREAM_SCORERS["cobra_vsr"] is choice_accuracy
    assert UPSTREAM_SCORERS["robomamba_vqav2"] is robomamba_vqa is UPSTREAM_SCORERS["robomamba_okvqa"]
    cases = {"cobra_vqav2": ("yes", ["yes"] * 10), "cobra_gqa": ("yes", ["yes"]),
             "cobra_vizwiz": ("yes", ["yes"] * 10), "cobra_textvqa": ("yes", ["yes"] * 10),
             "cobra_pope": ("Yes", ["yes"]), "cobra_vsr": ("True", ["1"]), "robomamba_pope": ("yes", ["yes"]),
             "robomamba_vqav2": ("yes", ["yes"] * 10), "robomamba_okvqa": ("yes", ["yes"] * 10),
             "robomamba_gqa": ("yes", ["yes"]), "robomamba_vizwiz": ("yes no", ["yes"] * 5 + ["no"] * 5)}
    for name, (pred, answers) in cases.items():
        assert UPSTREAM_SCORERS[name](pred, answers) == 1.0, name
