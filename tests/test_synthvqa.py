"""SynthVQA generator (determinism, balance, answerability, rendering) and the public-format readers."""
import hashlib
import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mambaprune.cli import main
from mambaprune.data import SynthConfig, available_datasets, generate_synthvqa, load_dataset, resolve_dataset
from mambaprune.data.readers import VSR_PROMPT, read_pope
from mambaprune.data.synthvqa import (CATEGORIES, FAMILIES, GLYPHS, POPE_VARIANTS, SPLITS, TEXT_COLOR,
                                      answer_question, code_mask, family_files, load_scenes, question_referents,
                                      recall_questions, referent_name_spans, render_scene,
                                      where_questions)
from mambaprune.eval.metrics import get_metric

CONFIG = SynthConfig(seed=3, per_family=30, train_multiplier=2)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    generate_synthvqa(out, CONFIG)
    return out


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _expected(scene, family):
    q = scene["questions"][family]
    if family == "spatial":
        return "true" if q["label"] else "false"
    return q["answer"]


# --- the generator --------------------------------------------------------------------------------------------------

def test_deterministic_and_seed_dependent(synth, tmp_path):
    first = _files(synth)
    generate_synthvqa(tmp_path / "again", CONFIG)
    assert _files(tmp_path / "again") == first
    generate_synthvqa(tmp_path / "other", SynthConfig(seed=4, per_family=30, train_multiplier=2))
    other = _files(tmp_path / "other")
    assert other.keys() == first.keys()
    changed = [k for k in first if first[k] != other[k]]
    assert "gqa/test_balanced_questions.json" in changed and "images/3000000.png" in changed
    assert len(changed) > 0.9 * len(first)


def test_manifest_lists_every_file_with_its_digest(synth):
    manifest = json.loads((synth / "manifest.json").read_text())
    files = _files(synth)
    del files["manifest.json"]
    assert manifest["files"] == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    assert manifest["config"]["seed"] == 3
    sizes = CONFIG.split_sizes()
    assert {s: manifest["splits"][s]["images"] for s in SPLITS} == sizes == {"train": 60, "val": 30, "test": 30}
    assert all(manifest["splits"][s]["questions"] == {f: sizes[s] for f in FAMILIES} for s in SPLITS)


def test_every_file_is_read_back_with_its_answers(synth):
    manifest = json.loads((synth / "manifest.json").read_text())
    annotation_files = {p for p in manifest["files"] if not p.startswith(("images/", "scenes/"))}
    assert annotation_files == {p for s in SPLITS for paths in family_files(s).values() for p in paths}
    for split in SPLITS:
        scenes = {s["image_id"]: s for s in load_scenes(synth, split)}
        samples = load_dataset("synthvqa", synth, split=split)
        assert len(samples) == len(FAMILIES) * len(scenes)
        assert len({s.id for s in samples}) == len(samples)
        by_family = Counter(s.extra["family"] for s in samples)
        assert by_family == {f: len(scenes) for f in FAMILIES}
        for s in samples:
            family = s.extra["family"]
            scene = scenes[int(s.image.stem)]
            assert s.image.is_file() and s.image.parent == synth / "images"
            assert s.group == f"synthvqa:{family}"
            expected = _expected(scene, family)
            if s.metric == "vqa_accuracy":
                assert len(s.answers) == 10
                assert get_metric(s.metric).score(expected, s.answers) == 1.0  # "3" vs "3" x8 + "three" x2
            else:
                assert s.answers == [expected]
            text = scene["questions"][family].get("question") or VSR_PROMPT.format(
                caption=scene["questions"]["spatial"]["caption"])
            assert s.question == text
        one = load_dataset("synthvqa:count", synth, split=split)
        assert [s.id for s in one] == [s.id for s in samples if s.extra["family"] == "count"]


def test_every_question_is_answerable_from_its_scene(synth):
    for split in SPLITS:
        for scene in load_scenes(synth, split):
            for family in FAMILIES:
                q = scene["questions"][family]
                text = q.get("question") or q["caption"]
                assert answer_question(scene, family, text) == _expected(scene, family), (split, family, text)
    with pytest.raises(ValueError, match="objects, not one"):
        scene = load_scenes(synth, "test")[0]
        answer_question(scene, "spatial", "The object is left of the object.")


def test_question_referents_name_the_objects_the_answer_depends_on(synth):
    rels = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
    for scene in load_scenes(synth, "val"):
        sp = scene["questions"]["spatial"]
        subj, obj = question_referents(scene, "spatial", sp["caption"])
        dr, dc = rels[sp["relation"]]
        holds = (subj["row"] - obj["row"]) * dr > 0 if dr else (subj["col"] - obj["col"]) * dc > 0
        assert holds == sp["label"] and subj is not obj
        at = scene["questions"]["attr"]
        named = question_referents(scene, "attr", at["question"])
        asked = at["question"].split()[1]                          # What <color|shape|size> is ...
        assert named[-1][asked] == at["answer"]
        if at["template"].startswith("relate"):                   # the reference, then its neighbour
            dr, dc = next(v for k, v in rels.items() if f"directly {k} the" in at["question"])
            assert (named[1]["row"] - named[0]["row"], named[1]["col"] - named[0]["col"]) == (dr, dc)
        else:
            assert len(named) == 1
        for family in ("exist", "count", "read"):
            q = scene["questions"][family]
            assert question_referents(scene, family, q.get("question") or q["caption"]) == []
    scene = load_scenes(synth, "val")[0]
    with pytest.raises(ValueError, match="unknown SynthVQA family"):
        question_referents(scene, "colour", "What color is the circle?")
    with pytest.raises(ValueError, match="not a SynthVQA spatial question"):
        question_referents(scene, "spatial", "Is there a circle?")


def test_referent_name_spans_spell_out_the_named_objects(synth):
    for scene in load_scenes(synth, "val"):
        for family in ("spatial", "attr"):
            q = scene["questions"][family]
            text = q.get("caption") or q["question"]
            spans = referent_name_spans(scene, family, text)
            referents = question_referents(scene, family, text)
            assert [o for o, _ in spans] == (referents[:1] if q.get("template", "").startswith("relate")
                                             else referents)
            for obj, (start, end) in spans:
                words = text[start:end].split()
                assert text[end] in " ?." and words[-1] in (obj["shape"], "object")
                assert [o for o in scene["objects"]
                        if all(w in (o["size"], o["color"], o["shape"], "object") for w in words)] == [obj]
        assert referent_name_spans(scene, "count", scene["questions"]["count"]["question"]) == []


def _named(objects: list[dict], words: list[str]) -> list[dict]:
    """The objects every one of ``words`` (sizes, colours, shapes) describes."""
    return [o for o in objects if all(w in (o["size"], o["color"], o["shape"]) for w in words)]


def test_where_questions_give_the_named_objects_cell(synth):
    import random
    asked = 0
    for scene in load_scenes(synth, "train"):
        objects = scene["objects"]
        got = where_questions(scene, random.Random(scene["image_id"]), n=3)
        assert got == where_questions(scene, random.Random(scene["image_id"]), n=3)
        assert len(got) <= 3 and len({q for q, _ in got}) == len(got)
        for question, answer in got:
            named = _named(objects, question.removeprefix("Where is the ").removesuffix("?").split())
            assert len(named) == 1, question                       # the phrase singles one object out
            assert answer == f"row {named[0]['row'] + 1}, column {named[0]['col'] + 1}"
        asked += len(got)
    assert asked >= 2 * len(load_scenes(synth, "train"))          # most scenes have three nameable objects
    assert where_questions(load_scenes(synth, "train")[0], random.Random(0), n=0) == []


def test_recall_questions_ask_one_named_objects_attribute(synth):
    import random
    asked = Counter()
    for scene in load_scenes(synth, "train"):
        objects = scene["objects"]
        got = recall_questions(scene, random.Random(scene["image_id"]), n=4)
        assert got == recall_questions(scene, random.Random(scene["image_id"]), n=4)
        assert len(got) <= 4 and len({q for q, _ in got}) == len(got)
        for question, answer in got:
            kind, rest = re.fullmatch(r"What (color|shape|size) is the (.+)\?", question).groups()
            words = rest.removesuffix(" object").split()
            named = _named(objects, words)
            assert len(named) == 1, question                       # the phrase singles one object out
            assert named[0][kind] not in words                      # the phrase does not give the answer away
            assert answer == named[0][kind] == answer_question(scene, "attr", question)
            asked[kind] += 1
    assert min(asked.values()) >= len(load_scenes(synth, "train"))  # every kind asked, about once a scene or more
    assert recall_questions(load_scenes(synth, "train")[0], random.Random(0), n=0) == []


def test_images_are_the_scenes(synth):
    for scene in load_scenes(synth, "test")[:10]:
        png = np.asarray(Image.open(synth / "images" / f"{scene['image_id']}.png"))
        assert np.array_equal(png, np.asarray(render_scene(scene, CONFIG.image_size)))
        for obj in scene["objects"]:  # every shape is filled with its colour at its centre
            cx, cy = obj["center"]
            assert tuple(png[cy, cx]) == {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220),
                                          "yellow": (235, 200, 20), "purple": (140, 60, 180),
                                          "orange": (245, 130, 20)}[obj["color"]]


def test_the_code_is_drawn_and_can_be_read_back(synth):
    glyphs = list(GLYPHS.values())
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(glyphs, 2))
    for scene in load_scenes(synth, "test"):
        png = np.asarray(Image.open(synth / "images" / f"{scene['image_id']}.png"))
        sign, code = scene["sign"], scene["code"]
        k, (x0, y0) = sign["scale"], sign["text_origin"]
        mask = code_mask(code, k)
        region = png[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        ink = np.all(region == TEXT_COLOR, axis=-1)
        assert np.array_equal(ink, mask)                                   # the ink is exactly the code
        assert np.all(region[~mask] == 255)                                # on the white sign
        assert k >= 2 and mask.shape[0] >= 14                              # ~ one 14-16 px patch per character
        # read the characters back from the pixels alone, one 5x7 cell at a time
        read = ""
        for c in range(len(code)):
            cell = ink[::k, ::k][:, c * 6:c * 6 + 5]
            read += next(ch for ch, g in GLYPHS.items() if np.array_equal(g, cell))
        assert read == code and read.lower() == scene["questions"]["read"]["answer"]


def test_families_are_balanced(synth):
    for split in SPLITS:
        n = CONFIG.split_sizes()[split]
        for variant in POPE_VARIANTS:
            samples = read_pope(synth, variant, annotations=family_files(split)["exist"][POPE_VARIANTS.index(variant)],
                                images="images/{image}")
            labels = Counter(s.answers[0] for s in samples)
            assert labels["yes"] == labels["no"] == n // 6                  # 30 or 60 images: exactly balanced
        spatial = Counter(s.answers[0] for s in load_dataset("synthvqa:spatial", synth, split=split))
        assert spatial["true"] == spatial["false"] == n // 2
        counts = Counter(s.answers[0] for s in load_dataset("synthvqa:count", synth, split=split))
        assert counts == {str(k): n // 5 for k in range(1, 6)}


def test_pope_negatives_follow_their_sampling(synth):
    """Adversarial negatives co-occur with the present objects more than random ones; popular ones are frequent."""
    scores = {v: [] for v in POPE_VARIANTS}
    freqs = {v: [] for v in POPE_VARIANTS}
    for split in SPLITS:
        scenes = load_scenes(synth, split)
        present = [{f"{o['color']} {o['shape']}" for o in s["objects"]} for s in scenes]
        freq = Counter(c for cats in present for c in cats)
        for scene, cats in zip(scenes, present):
            q = scene["questions"]["exist"]
            if q["answer"] == "no":
                assert q["category"] not in cats and q["category"] in CATEGORIES
                together = sum(1 for other in present if q["category"] in other for p in cats if p in other)
                scores[q["variant"]].append(together)
                freqs[q["variant"]].append(freq[q["category"]])
            else:
                assert q["category"] in cats
    mean = {v: np.mean(scores[v]) for v in POPE_VARIANTS}
    assert mean["adversarial"] > 1.5 * mean["random"]
    assert np.mean(freqs["popular"]) > 1.5 * np.mean(freqs["random"])


def test_output_folder_rules(synth, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        generate_synthvqa(foreign, SynthConfig(per_family=2, train_multiplier=1))
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="image_size"):
        SynthConfig(image_size=64)
    with pytest.raises(ValueError, match="per_family"):
        SynthConfig(per_family=0)


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["synth", "--out", str(out), "--per-family", "6", "--train-multiplier", "1", "--seed", "1"]
    assert main(args) == 0
    assert "test 6" in capsys.readouterr().out
    first = _files(out)
    assert main(args[:-1] + ["2"]) == 0                  # an earlier SynthVQA folder is replaced
    assert main(args) == 0
    assert _files(out) == first
    assert len(load_dataset("synthvqa", out, split="val")) == 30


# --- the public-format readers on small fixtures in the real formats -------------------------------------------------

def _write(path, obj, lines=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in obj) if lines else json.dumps(obj))


def test_real_format_readers(tmp_path):
    _write(tmp_path / "gqa/questions/testdev_balanced_questions.json", {"201307251": {
        "imageId": "n15740", "question": "Is the man on the left?", "answer": "yes", "fullAnswer": "Yes, he is.",
        "isBalanced": True, "types": {"structural": "verify"}}})
    [g] = load_dataset("gqa", tmp_path / "gqa")
    assert (g.id, g.answers, g.metric, g.image) == ("201307251", ["yes"], "exact_match",
                                                     tmp_path / "gqa/images/n15740.jpg")
    vqa_q = {"data_subtype": "val2014", "questions": [{"image_id": 262148, "question": "How many?",
                                                       "question_id": 262148000}]}
    vqa_a = {"annotations": [{"question_id": 262148000, "image_id": 262148, "answer_type": "number",
                              "question_type": "how many", "multiple_choice_answer": "2",
                              "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i}
                                          for i in range(1, 11)]}]}
    _write(tmp_path / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json", vqa_q)
    _write(tmp_path / "vqav2/v2_mscoco_val2014_annotations.json", vqa_a)
    [v] = load_dataset("vqav2", tmp_path / "vqav2")
    assert v.image == tmp_path / "vqav2/val2014/COCO_val2014_000000262148.jpg"
    assert v.answers == ["2"] * 10 and v.extra["answer_type"] == "number" and v.metric == "vqa_accuracy"
    _write(tmp_path / "okvqa/OpenEnded_mscoco_val2014_questions.json", vqa_q)
    _write(tmp_path / "okvqa/mscoco_val2014_annotations.json", vqa_a)
    assert load_dataset("okvqa", tmp_path / "okvqa")[0].group == "okvqa"
    _write(tmp_path / "textvqa/TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what brand?", "answers": ["nokia"] * 10}]})
    [t] = load_dataset("textvqa", tmp_path / "textvqa")
    assert t.image == tmp_path / "textvqa/train_images/003a8ae2ef43b901.jpg" and t.answers == ["nokia"] * 10
    for variant in POPE_VARIANTS:
        _write(tmp_path / f"pope/coco_pope_{variant}.json", [
            {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
             "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?",
             "label": "no"}], lines=True)
    pope = load_dataset("pope", tmp_path / "pope")
    assert len(pope) == 6 and {s.group for s in pope} == {f"pope_{v}" for v in POPE_VARIANTS}
    adv = load_dataset("pope", tmp_path / "pope", split="adversarial")
    assert [s.answers for s in adv] == [["yes"], ["no"]] and adv[0].image.parent.name == "val2014"
    _write(tmp_path / "vsr/test.jsonl", [{"image": "000000050403.jpg", "caption": "The teddy bear is in front of "
                                          "the person.", "label": 1, "relation": "in front of"}], lines=True)
    [r] = load_dataset("vsr", tmp_path / "vsr")
    assert r.question == "Is this statement true or false? The teddy bear is in front of the person."
    assert r.answers == ["true"] and r.image == tmp_path / "vsr/images/000000050403.jpg"
    _write(tmp_path / "vizwiz/Annotations/val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answerable": 1, "answer_type": "other",
         "answers": [{"answer": "soap", "answer_confidence": "yes"}] * 10}])
    [z] = load_dataset("vizwiz", tmp_path / "vizwiz")
    assert z.image == tmp_path / "vizwiz/val/VizWiz_val_00000000.jpg" and z.answers == ["soap"] * 10


def test_image_paths_may_not_leave_the_data_folder(tmp_path):
    for image in ("../../etc/passwd", "/etc/passwd", "a/../../../x.jpg"):  # (relative to val2014/)
        _write(tmp_path / "coco_pope_random.json", [{"question_id": 1, "image": image, "text": "?",
                                                     "label": "no"}], lines=True)
        with pytest.raises(ValueError, match="data folder"):
            load_dataset("pope", tmp_path, split="random")
    _write(tmp_path / "testdev_balanced_questions.json", {"1": {"imageId": "../../secret", "question": "q",
                                                                "answer": "a"}})
    with pytest.raises(ValueError, match="escapes the data folder"):
        load_dataset("gqa", tmp_path)
    with pytest.raises(ValueError, match="escapes the data folder"):
        read_pope(tmp_path, "random", annotations="../coco_pope_random.json")


def test_missing_files_and_bad_names_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="testdev_balanced_questions.json"):
        load_dataset("gqa", tmp_path)
    with pytest.raises(FileNotFoundError, match="v2_mscoco_val2014_annotations.json"):
        _write(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": []})
        load_dataset("vqav2", tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_dataset("synthvqa", tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset("vsr", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'imagenet'"):
        resolve_dataset("imagenet")
    with pytest.raises(ValueError, match="'colour'"):
        resolve_dataset("synthvqa:colour")
    with pytest.raises(ValueError, match="'dev'"):
        resolve_dataset("synthvqa", "dev")
    with pytest.raises(ValueError, match="split name"):
        resolve_dataset("gqa", "../../etc")
    _write(tmp_path / "bad/test.jsonl", [{"image": "x.jpg", "caption": "c"}], lines=True)
    with pytest.raises(ValueError, match="lacks label"):
        load_dataset("vsr", tmp_path / "bad")
    assert {"gqa", "vqav2", "okvqa", "textvqa", "textvqa:ocr", "vizwiz", "pope", "pope:random", "pope:popular",
            "pope:adversarial", "vsr", "vsr:random", "synthvqa"} | {
        f"synthvqa:{f}" for f in FAMILIES} == set(available_datasets())
