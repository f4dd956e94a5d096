"""The released data layouts `load_dataset` recognises from its folder, on small fixtures written here in exactly
those layouts: each dataset's own release, VSR's split folders and a vlm-evaluation root; plus ``images_root`` and
the one-line errors naming the files a folder should hold."""
import json
from pathlib import Path

import pytest

from mambaprune.data import load_dataset, resolve_dataset
from mambaprune.data.readers import VSR_PROMPT, Sample
from mambaprune.data.vlm_eval import split_ocr


def _write(path: Path, obj, lines=False, newline="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + newline for r in obj) if lines else json.dumps(obj)
    path.write_bytes(text.encode())


def _touch(*paths: Path):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\xff\xd8")


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# --- VSR: records as in cambridgeltl/visual-spatial-reasoning data/splits/*/test.jsonl (first lines) ---------------

ZEROSHOT = [
    {"image": "000000017697.jpg", "image_link": "http://images.cocodataset.org/train2017/000000017697.jpg",
     "caption": "The car is behind the suitcase.", "label": 1, "relation": "behind", "subj": "car", "obj": "suitcase",
     "annotator_id": 2, "vote_true_validator_id": "[18, 2]", "vote_false_validator_id": "[1]"},
    {"image": "000000199940.jpg", "image_link": "http://images.cocodataset.org/train2017/000000199940.jpg",
     "caption": "The cat is under the backpack.", "label": 0, "relation": "under", "subj": "cat", "obj": "backpack",
     "annotator_id": 1, "vote_true_validator_id": "[]", "vote_false_validator_id": "[2, 51, 26]"}]
RANDOM = [
    {"image": "000000072556.jpg", "image_link": "http://images.cocodataset.org/train2017/000000072556.jpg",
     "caption": "The bird is above the cat.", "label": 0, "relation": "above", "annotator_id": 27,
     "vote_true_validator_id": "[]", "vote_false_validator_id": "[2, 17, 52]", "reference_frame": None}]
ZEROSHOT_DEV = [
    {"image": "000000372029.jpg", "image_link": "http://images.cocodataset.org/train2017/000000372029.jpg",
     "caption": "The dog is on the surfboard.", "label": 1, "relation": "on", "subj": "dog", "obj": "surfboard",
     "annotator_id": 4, "vote_true_validator_id": "[19, 2, 51]", "vote_false_validator_id": "[]"}]


def _vsr_repo(data: Path):
    """The repository's ``data/`` folder: splits/{random,zeroshot}/{dev,test}.jsonl and images/."""
    _write(data / "splits/zeroshot/test.jsonl", ZEROSHOT, lines=True)
    _write(data / "splits/zeroshot/dev.jsonl", ZEROSHOT_DEV, lines=True)
    _write(data / "splits/random/test.jsonl", RANDOM, lines=True)
    _touch(*(data / "images" / r["image"] for r in ZEROSHOT + RANDOM + ZEROSHOT_DEV))


@pytest.mark.parametrize("clone", [False, True])
def test_vsr_split_folders(tmp_path, clone):
    root = tmp_path / "visual-spatial-reasoning"
    data = root / "data" if clone else root
    _vsr_repo(data)
    zs = load_dataset("vsr", root)
    assert [s.id for s in zs] == ["0", "1"]  # no id field: line positions (vlm-evaluation's example_id)
    assert [s.answers for s in zs] == [["true"], ["false"]]  # label ints 1 / 0
    assert zs[0].question == VSR_PROMPT.format(caption="The car is behind the suitcase.")
    assert zs[0].image == data / "images/000000017697.jpg" and zs[0].image.is_file()
    assert (zs[0].group, zs[0].metric) == ("vsr", "vsr")
    assert {k: zs[0].extra[k] for k in ("caption", "relation", "subj", "obj")} == {
        "caption": "The car is behind the suitcase.", "relation": "behind", "subj": "car", "obj": "suitcase"}
    [rnd] = load_dataset("vsr:random", root)
    assert (rnd.id, rnd.answers, rnd.group, rnd.image) == ("0", ["false"], "vsr:random",
                                                           data / "images/000000072556.jpg")
    assert rnd.extra["reference_frame"] is None and rnd.extra["relation"] == "above"
    [dev] = load_dataset("vsr", root, split="dev")
    assert dev.extra["caption"] == "The dog is on the surfboard." and dev.answers == ["true"]
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("vsr:random", root, split="dev")
    assert "dev.jsonl" in _one_line(err) and "splits/random/dev.jsonl" in str(err.value)


def test_vsr_flat_file_and_boolean_labels(tmp_path):
    """A flat ``test.jsonl`` (the Hugging Face copy vlm-evaluation downloads) with ``images/`` beside it."""
    _write(tmp_path / "test.jsonl", [dict(ZEROSHOT[0], label=True), dict(ZEROSHOT[1], label=False)], lines=True)
    samples = load_dataset("vsr", tmp_path)
    assert [s.answers[0] for s in samples] == ["true", "false"]
    assert samples[1].image == tmp_path / "images/000000199940.jpg"


# --- each dataset's own release -------------------------------------------------------------------------------------

def test_own_release_layouts(tmp_path):
    gqa = tmp_path / "gqa"  # questions1.2.zip + images.zip, extracted
    _write(gqa / "testdev_balanced_questions.json", {"20968379": {
        "imageId": "n288870", "question": "Do the shorts have dark color?", "answer": "yes",
        "fullAnswer": "Yes, the shorts are dark.", "types": {"structural": "verify"}}})
    [g] = load_dataset("gqa", gqa)
    assert (g.id, g.question, g.answers, g.image) == ("20968379", "Do the shorts have dark color?", ["yes"],
                                                      gqa / "images/n288870.jpg")
    assert g.ocr_tokens is None and g.answerable is None

    tv = tmp_path / "textvqa"
    _write(tv / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
         "answers": ["dakota"] * 10, "ocr_tokens": ["DAKOTA", "DIGITAL"]}]})
    [t] = load_dataset("textvqa", tv)
    assert t.ocr_tokens == ["DAKOTA", "DIGITAL"] and t.question == "what is the brand of this camera?"
    [o] = load_dataset("textvqa:ocr", tv)               # the name for TextVQA with its OCR tokens
    assert (o.id, o.question, o.ocr_tokens, o.group) == (t.id, t.question, t.ocr_tokens, "textvqa:ocr")

    vw = tmp_path / "vizwiz"  # Annotations.zip + val.zip
    answers = [{"answer": "soap", "answer_confidence": "yes"}] * 9 + [{"answer": "unanswerable",
                                                                       "answer_confidence": "maybe"}]
    _write(vw / "Annotations/val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answerable": 1, "answer_type": "other",
         "answers": answers}])
    [z] = load_dataset("vizwiz", vw)
    assert z.id == "VizWiz_val_00000000" and z.answers == ["soap"] * 9 + ["unanswerable"]
    assert z.extra["answer_confidence"] == ["yes"] * 9 + ["maybe"] and z.answerable is True
    assert z.image == vw / "val/VizWiz_val_00000000.jpg"


def test_pope_repository_layout_with_crlf_lines(tmp_path):
    """AoiDragon/POPE keeps ``output/coco/coco_pope_{split}.json``, json lines ending in CRLF."""
    for variant in ("random", "popular", "adversarial"):
        _write(tmp_path / f"output/coco/coco_pope_{variant}.json", [
            {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
             "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a backpack in the image?",
             "label": "no"}], lines=True, newline="\r\n")
    assert b"\r\n" in (tmp_path / "output/coco/coco_pope_random.json").read_bytes()
    pope = load_dataset("pope", tmp_path)
    assert len(pope) == 6 and pope[0].id == "random/1" and pope[0].answers == ["yes"]
    assert pope[1].question == "Is there a backpack in the image?" and pope[1].extra["pope_split"] == "random"
    _touch(tmp_path / "coco/val2014/COCO_val2014_000000310196.jpg")
    adv = load_dataset("pope", tmp_path, split="adversarial", images_root=tmp_path / "coco/val2014")
    assert adv[0].image == tmp_path / "coco/val2014/COCO_val2014_000000310196.jpg" and adv[0].image.is_file()
    assert {s.group for s in adv} == {"pope_adversarial"}
    named = load_dataset("pope:adversarial", tmp_path)  # pope:<split> names one split
    assert [s.id for s in named] == ["adversarial/1", "adversarial/2"]


# --- images elsewhere -----------------------------------------------------------------------------------------------

def test_images_root_and_its_missing_folder_error(tmp_path):
    vqa = tmp_path / "vqav2"
    _write(vqa / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000}]})
    _write(vqa / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 262148000, "image_id": 262148, "answer_type": "other", "question_type": "where is the",
         "multiple_choice_answer": "down", "answers": [{"answer": "down", "answer_confidence": "yes",
                                                        "answer_id": i} for i in range(1, 11)]}]})
    coco = tmp_path / "coco/val2014"
    _touch(coco / "COCO_val2014_000000262148.jpg")
    [v] = load_dataset("vqav2", vqa, images_root=coco)
    assert v.image == coco / "COCO_val2014_000000262148.jpg" and v.answers == ["down"] * 10
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("vqav2", vqa, images_root=tmp_path / "nowhere")
    line = _one_line(err)
    assert str(tmp_path / "nowhere") in line and "COCO_val2014_000000262148.jpg" in line
    _vsr_repo(tmp_path / "vsr")
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("vsr", tmp_path / "vsr", images_root=tmp_path / "vsr_images")
    assert "000000017697.jpg, 000000199940.jpg" in _one_line(err)


def test_missing_folder_names_the_files_expected(tmp_path):
    for name, expected in [("gqa", "testdev_balanced_questions.json"), ("vsr", "splits/zeroshot/test.jsonl"),
                           ("vsr:random", "splits/random/test.jsonl"), ("pope", "coco_pope_"),
                           ("textvqa", "TextVQA_0.5.1_val.json"), ("synthvqa", "manifest.json")]:
        with pytest.raises(FileNotFoundError) as err:
            load_dataset(name, tmp_path / "nowhere")
        line = _one_line(err)
        assert str(tmp_path / "nowhere") in line and expected in line, line
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("gqa", tmp_path / "nowhere")
    assert "datasets/gqa/metadata-full.json" in str(err.value)  # the vlm-evaluation alternative
    (tmp_path / "empty").mkdir()
    for name, expected in [("vqav2", "datasets/vqa-v2/metadata.json"), ("vsr", "datasets/vsr/metadata-full.json"),
                           ("vizwiz", "val.json")]:
        with pytest.raises(FileNotFoundError) as err:
            load_dataset(name, tmp_path / "empty")
        assert expected in _one_line(err)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("gqa", tmp_path / "empty", split="slim-1024")
    assert "datasets/gqa/metadata-slim-1024.json" in _one_line(err)


# --- a vlm-evaluation root --------------------------------------------------------------------------------------------

def _vlm_eval_root(root: Path):
    """A root as vlm-evaluation's scripts/datasets/prepare.py leaves it, index records as each harness writes them
    (vlm_eval/tasks/harnesses/{vqav2,gqa,vizwiz,textvqa,pope,vsr}.py), images touched under download/."""
    d = "download"
    vqa = {"262148000": {"question_id": 262148000, "question": "Where is he looking?",
                         "img_path": f"{d}/vqa-v2/images_val2014/COCO_val2014_000000262148.jpg", "answer": "down",
                         "question_type": "where is the", "answer_type": "other",
                         "all_answers": ["down"] * 8 + ["at table", "skateboard"]},
           "393225000": {"question_id": 393225000, "question": "Is the bowl full?",
                         "img_path": f"{d}/vqa-v2/images_val2014/COCO_val2014_000000393225.jpg", "answer": "no",
                         "question_type": "is the", "answer_type": "yes/no", "all_answers": ["no"] * 10}}
    _write(root / "datasets/vqa-v2/metadata.json", vqa)
    _write(root / "datasets/vqa-v2/metadata-slim-1024.json", {"393225000": vqa["393225000"]})
    gqa = {"20968379": {"question_id": 20968379, "question": "Do the shorts have dark color?",
                        "img_path": f"{d}/gqa/images/n288870.jpg", "answer": "yes",
                        "fullAnswer": "Yes, the shorts are dark.", "semanticStr": "select: shorts ...",
                        "entailed": [20968380], "equivalent": [20968379]}}
    _write(root / "datasets/gqa/metadata-full.json", gqa)  # gqa.py line 39: metadata-full, not metadata.json
    answers = [{"answer": "soap", "answer_confidence": "yes"}] * 9 + [{"answer": "unanswerable",
                                                                       "answer_confidence": "maybe"}]
    _write(root / "datasets/vizwiz/metadata.json", {"7": {
        "question_id": 7, "question": "What is this?", "img_path": f"{d}/vizwiz/val_images/VizWiz_val_00000007.jpg",
        "answers": [answers], "answerable": 1}})  # vizwiz.py line 64 wraps the answer list once more
    _write(root / "datasets/text-vqa/metadata.json", {
        "34602": {"question_id": 34602, "img_path": f"{d}/text-vqa/train_val_images/003a8ae2ef43b901.jpg",
                  "question": "what is the brand of this camera?\nReference OCR token: dakota, digital, single-use",
                  "answers": ["dakota"] * 9 + ["nikon"]},
        "34603": {"question_id": 34603, "img_path": f"{d}/text-vqa/train_val_images/003a8ae2ef43b902.jpg",
                  "question": "what color is the sky?", "answers": ["blue"] * 10}})
    pope = {}
    for split, sqid, label in [("adversarial", 1, "yes"), ("popular", 1, "yes"), ("random", 2, "no")]:
        pope[str(-4217 * sqid + len(split))] = {
            "question_id": -4217 * sqid + len(split), "question": "Is there a snowboard in the image?",
            "img_path": f"{d}/pope/val_images/COCO_val2014_000000310196.jpg", "answer": label, "split": split,
            "split_question_id": sqid}
    _write(root / "datasets/pope/metadata-full.json", pope)
    _write(root / "datasets/pope/metadata-slim-1.json", dict(list(pope.items())[:3]))
    _write(root / "datasets/vsr/metadata-full.json", {
        "1": {"example_id": 1, "caption": "The cat is under the backpack.",
              "img_path": f"{d}/vsr/images/000000199940.jpg", "true_false": False, "subj": "cat", "obj": "backpack",
              "relation": "under"},
        "0": {"example_id": 0, "caption": "The car is behind the suitcase.",
              "img_path": f"{d}/vsr/images/000000017697.jpg", "true_false": True, "subj": "car", "obj": "suitcase",
              "relation": "behind"}})
    for index in (root / "datasets").glob("*/metadata*.json"):
        _touch(*(root / r["img_path"] for r in json.loads(index.read_text()).values()))


def test_vlm_evaluation_root(tmp_path):
    _vlm_eval_root(tmp_path)
    vqa = load_dataset("vqav2", tmp_path)
    assert [s.id for s in vqa] == ["262148000", "393225000"]
    assert vqa[0].answers == ["down"] * 8 + ["at table", "skateboard"] and vqa[0].question == "Where is he looking?"
    assert vqa[0].extra["multiple_choice_answer"] == "down" and vqa[0].metric == "vqa_accuracy"
    assert vqa[0].image == tmp_path / "download/vqa-v2/images_val2014/COCO_val2014_000000262148.jpg"
    assert all(s.image.is_file() for s in vqa)
    [slim] = load_dataset("vqav2", tmp_path, split="slim-1024")  # a slim subset, by name
    assert slim.id == "393225000" and slim.answers == ["no"] * 10

    [g] = load_dataset("gqa", tmp_path)
    assert (g.id, g.answers, g.metric, g.group) == ("20968379", ["yes"], "exact_match", "gqa")
    assert g.extra["full_answer"] == "Yes, the shorts are dark."
    assert g.image == tmp_path / "download/gqa/images/n288870.jpg"

    [z] = load_dataset("vizwiz", tmp_path)
    assert z.id == "7" and z.answers == ["soap"] * 9 + ["unanswerable"] and z.answerable is True
    assert z.extra["answer_confidence"][-1] == "maybe" and z.extra["image"] == "VizWiz_val_00000007.jpg"

    t, bare = load_dataset("textvqa", tmp_path)
    assert t.question == "what is the brand of this camera?\nReference OCR token: dakota, digital, single-use"
    assert t.ocr_tokens == ["dakota", "digital", "single-use"]
    assert t.extra["question_without_ocr"] == "what is the brand of this camera?"
    assert (bare.ocr_tokens, bare.extra["question_without_ocr"]) == ([], "what color is the sky?")

    pope = load_dataset("pope", tmp_path)
    assert [(s.id, s.answers[0], s.group) for s in pope] == [
        ("adversarial/1", "yes", "pope_adversarial"), ("popular/1", "yes", "pope_popular"),
        ("random/2", "no", "pope_random")]
    assert pope[0].extra == {"pope_split": "adversarial", "question_id": str(-4217 + len("adversarial"))}
    [rnd] = load_dataset("pope", tmp_path, split="random")
    assert rnd.id == "random/2" and rnd.question == "Is there a snowboard in the image?"
    assert len(load_dataset("pope", tmp_path, split="slim-1")) == 3

    vsr = load_dataset("vsr", tmp_path)
    assert [(s.id, s.answers[0]) for s in vsr] == [("1", "false"), ("0", "true")]  # the file's (shuffled) order
    assert vsr[1].question == VSR_PROMPT.format(caption="The car is behind the suitcase.")
    assert vsr[1].extra == {"caption": "The car is behind the suitcase.", "relation": "behind", "subj": "car",
                            "obj": "suitcase"}
    assert all(isinstance(s, Sample) for s in vsr)


def test_vlm_evaluation_root_images_elsewhere_and_errors(tmp_path):
    _vlm_eval_root(tmp_path)
    moved = tmp_path / "elsewhere"
    _touch(moved / "n288870.jpg")
    [g] = load_dataset("gqa", tmp_path, images_root=moved)
    assert g.image == moved / "n288870.jpg"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("gqa", tmp_path, images_root=tmp_path / "missing")
    assert "n288870.jpg" in _one_line(err)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("gqa", tmp_path, split="slim-512")
    line = _one_line(err)
    assert "datasets/gqa/metadata-slim-512.json" in line and "metadata-full.json" in line  # what is there
    with pytest.raises(ValueError, match="testdev_balanced"):
        load_dataset("gqa", tmp_path, split="val_balanced")
    assert resolve_dataset("pope", "slim-1024")[2] == "slim-1024"
    with pytest.raises(ValueError, match="'dev'"):
        resolve_dataset("pope", "dev")
    _write(tmp_path / "datasets/vsr/metadata-full.json", {"0": {
        "example_id": 0, "caption": "c", "img_path": "../outside.jpg", "true_false": True}})
    with pytest.raises(ValueError, match="escapes the data folder"):
        load_dataset("vsr", tmp_path)
    _write(tmp_path / "datasets/vsr/metadata-full.json", {"0": {"example_id": 0, "caption": "c", "img_path": "x"}})
    with pytest.raises(ValueError, match="lacks true_false"):
        load_dataset("vsr", tmp_path)


def test_split_ocr():
    assert split_ocr("what?\nReference OCR token: a, b c, d\nAnswer the question using a single word or phrase.") \
        == ("what?", ["a", "b c", "d"])
    assert split_ocr("what?") == ("what?", None)
    assert split_ocr("what?\nReference OCR token: ") == ("what?", [])
