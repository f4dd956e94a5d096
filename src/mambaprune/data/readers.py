"""Dataset readers for the public formats, behind one registry.

``load_dataset(name, root, split=None) -> list[Sample]`` reads a data folder ``root``; ``name`` is one of
:func:`available_datasets` (``"synthvqa:<family>"`` selects one SynthVQA family). Each reader finds its annotation
file in ``root`` or in a conventional sub-folder (``questions``, ``annotations``, ...) and builds image paths from a
template relative to ``root``; an image path that would leave ``root`` (``..`` or an absolute path elsewhere) is
refused with a ValueError. Images are not opened here: a missing image is the runner's business (an error record).

The datasets (``name``: annotation file(s), default split; image path template; answers; metric):

* ``gqa``: ``{split}_questions.json``, testdev_balanced; ``images/{imageId}.jpg``; one answer; exact_match.
* ``vqav2``: ``v2_OpenEnded_mscoco_{split}_questions.json`` + ``v2_mscoco_{split}_annotations.json``, val2014;
  ``{split}/COCO_{split}_{image_id:012d}.jpg``; 10 answers; vqa_accuracy.
* ``okvqa``: ``OpenEnded_mscoco_{split}_questions.json`` + ``mscoco_{split}_annotations.json``, val2014; as vqav2.
* ``textvqa``: ``TextVQA_0.5.1_{split}.json``, val; ``train_images/{image_id}.jpg`` (``test_images/`` for test);
  10 answers; vqa_accuracy.
* ``vizwiz``: ``{split}.json``, val; ``{split}/{image}``; 10 answers; vqa_accuracy.
* ``pope``: ``coco_pope_{split}.json`` (json lines; ``.jsonl`` accepted), split random, popular, adversarial or
  all (default); ``val2014/{image}``; yes / no; pope.
* ``vsr``: ``{split}.jsonl``, test; ``images/{image}``; true / false; vsr.
* ``synthvqa`` / ``synthvqa:<family>``: a SynthVQA folder, split train, val or test (default), read through the
  readers above, one per family; ``images/<id>.png``.

VSR has captions, not questions: a sample's question is ``VSR_PROMPT`` with the caption filled in ("Is this
statement true or false? The cat is left of the laptop.") and its answer "true" or "false". POPE's question is the
``text`` field. A sample's ``group`` is the unit a summary reports (``gqa``, ``pope_adversarial``,
``synthvqa:count``, ...); ``extra`` keeps format-specific fields (question/answer type, POPE split, relation...).
"""
from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import synthvqa

__all__ = [
    "VSR_PROMPT",
    "DatasetSpec",
    "Sample",
    "available_datasets",
    "load_dataset",
    "read_gqa",
    "read_pope",
    "read_synthvqa",
    "read_textvqa",
    "read_vqa",
    "read_vizwiz",
    "read_vsr",
    "register_dataset",
    "resolve_dataset",
]

#: The question a VSR caption is asked as; the expected answer is "true" or "false".
VSR_PROMPT = "Is this statement true or false? {caption}"

_SUBFOLDERS = ("", "questions", "annotations", "Questions", "Annotations", "splits")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


@dataclass
class Sample:
    """One evaluation item.

    ``id`` is unique within the loaded dataset; ``image`` an absolute path inside the data folder; ``answers`` the
    reference answers (10 humans for VQA-accuracy datasets, one label otherwise); ``metric`` a key of
    :data:`mambaprune.eval.metrics.METRICS`; ``group`` the reporting unit; ``extra`` format-specific fields.
    """

    id: str
    image: Path
    question: str
    answers: list[str]
    metric: str
    group: str
    extra: dict = field(default_factory=dict)


# --- file helpers ---------------------------------------------------------------------------------------------------

def _inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel``, refused (ValueError) when it leaves ``root``; checked on the path's text, so links placed
    inside the folder by the user are followed."""
    base = os.path.abspath(root)
    path = os.path.normpath(os.path.join(base, rel))
    if os.path.commonpath([base, path]) != base:
        raise ValueError(f"{what} path {rel!r} escapes the data folder {base}")
    return Path(path)


def _image(root: Path, template: str, record: dict, **more) -> Path:
    """The image path ``template`` formatted with a record's fields; a field holding an absolute path is refused
    (it would otherwise be spliced under the template's folder), and so is a result outside ``root``."""
    values = {**record, **more}
    for _, name, _, _ in string.Formatter().parse(template):
        value = values.get(name) if name else None
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith(("/", "\\"))):
            raise ValueError(f"image path {value!r} is absolute; image paths must be relative to the data folder "
                             f"{os.path.abspath(root)}")
    return _inside(root, template.format(**values), "image")


def _find(root: Path, names: Sequence[str], dataset: str) -> Path:
    """The first existing annotation file among ``names`` in ``root`` or its conventional sub-folders."""
    tried = []
    for name in names:
        for sub in _SUBFOLDERS:
            path = _inside(root, os.path.join(sub, name), "annotation")
            if path.is_file():
                return path
            tried.append(path)
    listing = ", ".join(str(p) for p in tried[:len(_SUBFOLDERS)])
    raise FileNotFoundError(f"{dataset}: annotation file {' or '.join(names)} not found in {root} "
                            f"(looked at {listing}{', ...' if len(tried) > len(_SUBFOLDERS) else ''})")


def _annotation(root: Path, given: str | None, names: Sequence[str], dataset: str) -> Path:
    """An explicitly given annotation file (relative to ``root``) or the first conventional one found."""
    if given is None:
        return _find(root, names, dataset)
    path = _inside(root, given, "annotation")
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: annotation file not found: {path}")
    return path


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _load_jsonl(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n} is not valid JSON: {err}") from None
    return records


def _fields(record, keys: tuple[str, ...], path: Path, where) -> tuple:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: record {where} is not a JSON object")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{path}: record {where} lacks {', '.join(missing)}")
    return tuple(record[k] for k in keys)


def _check_split(split: str) -> str:
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split) or ".." in split.split("/"):
        raise ValueError(f"invalid split name {split!r}")
    return split


# --- the public formats -------------------------------------------------------------------------------------------

def read_gqa(root, split: str = "testdev_balanced", *, questions: str | None = None,
             images: str = "images/{imageId}.jpg", group: str = "gqa") -> list[Sample]:
    """GQA questions json: ``{question_id: {imageId, question, answer, fullAnswer, types, ...}}``."""
    root = Path(root)
    path = _annotation(root, questions, [f"{_check_split(split)}_questions.json"], "gqa")
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a GQA questions file maps question ids to records")
    samples = []
    for qid, rec in data.items():
        image_id, question, answer = _fields(rec, ("imageId", "question", "answer"), path, qid)
        extra = {"full_answer": rec.get("fullAnswer", "")}
        if isinstance(rec.get("types"), dict):
            extra["types"] = rec["types"]
        samples.append(Sample(str(qid), _image(root, images, rec), question, [answer],
                              "exact_match", group, extra))
    return samples


def read_vqa(root, *, questions: str, annotations: str, images: str, group: str, dataset: str = "vqa",
             subtype: str = "") -> list[Sample]:
    """VQA format (VQAv2, OK-VQA): a questions json and an annotations json joined on ``question_id``.

    ``questions`` and ``annotations`` are file names looked up like any annotation file; ``images`` is formatted
    with the question record and ``split`` = ``subtype``.
    """
    root = Path(root)
    qpath = _find(root, [questions], dataset)
    apath = _find(root, [annotations], dataset)
    qdata, adata = _load_json(qpath), _load_json(apath)
    if not isinstance(qdata, dict) or "questions" not in qdata:
        raise ValueError(f"{qpath}: a VQA questions file has a 'questions' list")
    if not isinstance(adata, dict) or "annotations" not in adata:
        raise ValueError(f"{apath}: a VQA annotations file has an 'annotations' list")
    by_qid = {}
    for n, ann in enumerate(adata["annotations"]):
        qid, _ = _fields(ann, ("question_id", "answers"), apath, n)
        by_qid[qid] = ann
    samples = []
    for n, rec in enumerate(qdata["questions"]):
        qid, _, question = _fields(rec, ("question_id", "image_id", "question"), qpath, n)
        if qid not in by_qid:
            raise ValueError(f"{apath} has no annotation for question {qid} of {qpath}")
        ann = by_qid[qid]
        answers = [a["answer"] if isinstance(a, dict) else a for a in ann["answers"]]
        extra = {k: ann[k] for k in ("question_type", "answer_type", "multiple_choice_answer") if k in ann}
        samples.append(Sample(str(qid), _image(root, images, rec, split=subtype), question,
                              answers, "vqa_accuracy", group, extra))
    return samples


def read_textvqa(root, split: str = "val", *, annotations: str | None = None, images: str | None = None,
                 group: str = "textvqa") -> list[Sample]:
    """TextVQA json: ``{"data": [{question_id, image_id, question, answers (10), ...}]}``.

    Val images live in ``train_images/`` in the TextVQA release, test images in ``test_images/``.
    """
    root = Path(root)
    path = _annotation(root, annotations, [f"TextVQA_0.5.1_{_check_split(split)}.json"], "textvqa")
    if images is None:
        images = ("test_images" if split == "test" else "train_images") + "/{image_id}.jpg"
    data = _load_json(path)
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError(f"{path}: a TextVQA file has a 'data' list")
    samples = []
    for n, rec in enumerate(data["data"]):
        if "answers" not in rec:
            raise ValueError(f"{path}: record {n} has no answers (the TextVQA test split is not public)")
        qid, _, question, answers = _fields(rec, ("question_id", "image_id", "question", "answers"), path, n)
        samples.append(Sample(str(qid), _image(root, images, rec), question, list(answers),
                              "vqa_accuracy", group, {}))
    return samples


def read_vizwiz(root, split: str = "val", *, annotations: str | None = None, images: str = "{split}/{image}",
                group: str = "vizwiz") -> list[Sample]:
    """VizWiz json: ``[{image, question, answers: [{answer, answer_confidence}], answer_type, answerable}]``."""
    root = Path(root)
    path = _annotation(root, annotations, [f"{_check_split(split)}.json"], "vizwiz")
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a VizWiz file is a list of records")
    samples = []
    for n, rec in enumerate(data):
        if "answers" not in rec:
            raise ValueError(f"{path}: record {n} has no answers (the VizWiz test split is not public)")
        image, question, answers = _fields(rec, ("image", "question", "answers"), path, n)
        extra = {k: rec[k] for k in ("answer_type", "answerable") if k in rec}
        samples.append(Sample(Path(image).stem, _image(root, images, rec, split=split),
                              question, [a["answer"] if isinstance(a, dict) else a for a in answers],
                              "vqa_accuracy", group, extra))
    return samples


def read_pope(root, variant: str, *, annotations: str | None = None, images: str = "val2014/{image}",
              group: str | None = None) -> list[Sample]:
    """One POPE file, json lines ``{question_id, image, text, label}`` (``coco_pope_{variant}.json``)."""
    if variant not in synthvqa.POPE_VARIANTS:
        raise ValueError(f"unknown POPE split {variant!r}; known: {', '.join(synthvqa.POPE_VARIANTS)}")
    root = Path(root)
    path = _annotation(root, annotations, [f"coco_pope_{variant}.json", f"coco_pope_{variant}.jsonl"], "pope")
    samples = []
    for n, rec in enumerate(_load_jsonl(path), 1):
        qid, _, text, label = _fields(rec, ("question_id", "image", "text", "label"), path, f"on line {n}")
        if str(label).strip().lower() not in ("yes", "no"):
            raise ValueError(f"{path}: line {n} has label {label!r}, not yes/no")
        samples.append(Sample(f"{variant}/{qid}", _image(root, images, rec), text,
                              [str(label).strip().lower()], "pope", group or f"pope_{variant}",
                              {"pope_split": variant}))
    return samples


def read_vsr(root, split: str = "test", *, annotations: str | None = None, images: str = "images/{image}",
             group: str = "vsr") -> list[Sample]:
    """VSR json lines ``{image, caption, label (1/0), relation, ...}``, asked as :data:`VSR_PROMPT`."""
    root = Path(root)
    path = _annotation(root, annotations, [f"{_check_split(split)}.jsonl"], "vsr")
    samples = []
    for n, rec in enumerate(_load_jsonl(path), 1):
        _, caption, label = _fields(rec, ("image", "caption", "label"), path, f"on line {n}")
        if label not in (0, 1):  # also True / False
            raise ValueError(f"{path}: line {n} has label {label!r}, not 0/1")
        samples.append(Sample(str(n - 1), _image(root, images, rec),
                              VSR_PROMPT.format(caption=caption), ["true" if label else "false"], "vsr", group,
                              {"caption": caption, "relation": rec.get("relation", "")}))
    return samples


def read_synthvqa(root, split: str = "test", families: Iterable[str] = synthvqa.FAMILIES) -> list[Sample]:
    """A SynthVQA folder (see :mod:`mambaprune.data.synthvqa`) through the public-format readers, family by family.

    Sample ids are ``<family>/<id in the public file>``, groups ``synthvqa:<family>`` and ``extra["family"]`` is
    set; the exist family holds its three POPE files (``extra["pope_split"]``).
    """
    root = Path(root)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{root / 'manifest.json'} not found: not a SynthVQA folder "
                                "(write one with `mambaprune synth --out DIR`)")
    files = synthvqa.family_files(split)
    d = synthvqa.IMAGE_DIR
    samples = []
    for family in families:
        if family not in synthvqa.FAMILIES:
            raise ValueError(f"unknown SynthVQA family {family!r}; known: {', '.join(synthvqa.FAMILIES)}")
        group = f"synthvqa:{family}"
        if family == "attr":
            part = read_gqa(root, questions=files["attr"][0], images=d + "/{imageId}.png", group=group)
        elif family == "exist":
            part = [s for v, f in zip(synthvqa.POPE_VARIANTS, files["exist"])
                    for s in read_pope(root, v, annotations=f, images=d + "/{image}", group=group)]
        elif family == "read":
            part = read_textvqa(root, annotations=files["read"][0], images=d + "/{image_id}.png",
                                group=group)
        elif family == "count":
            part = read_vqa(root, questions=files["count"][0], annotations=files["count"][1],
                            images=d + "/{image_id}.png", group=group, dataset="synthvqa")
        else:
            part = read_vsr(root, annotations=files["spatial"][0], images=d + "/{image}", group=group)
        for s in part:
            s.id = f"{family}/{s.id}"
            s.extra["family"] = family
        samples.extend(part)
    return samples


# --- the registry -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its reader ``reader(root, split, variant)``, split names and ``name:variant`` forms.

    ``splits`` is None when any well-formed split name is accepted (it names a file).
    """

    name: str
    reader: Callable[[Path, str, str | None], list[Sample]]
    default_split: str
    splits: tuple[str, ...] | None = None
    variants: tuple[str, ...] = ()
    description: str = ""


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(name: str, *, default_split: str, splits: tuple[str, ...] | None = None,
                     variants: tuple[str, ...] = (), description: str = ""):
    """Decorator registering ``reader(root: Path, split: str, variant: str | None) -> list[Sample]`` as ``name``."""
    if ":" in name or name in _REGISTRY:
        raise ValueError(f"dataset name {name!r} is taken or has a colon")

    def decorate(reader):
        _REGISTRY[name] = DatasetSpec(name, reader, default_split, splits, tuple(variants), description)
        return reader

    return decorate


def available_datasets() -> list[str]:
    """Every name :func:`load_dataset` accepts, ``name:variant`` forms included."""
    names = []
    for spec in _REGISTRY.values():
        names.append(spec.name)
        names.extend(f"{spec.name}:{v}" for v in spec.variants)
    return sorted(names)


def resolve_dataset(name: str, split: str | None = None) -> tuple[DatasetSpec, str | None, str]:
    """(spec, variant, split) for a dataset name and split, checked without touching any file.

    Raises ValueError naming the bad value: an unknown dataset or variant, or a split the dataset does not have.
    """
    base, _, variant = name.partition(":")
    spec = _REGISTRY.get(base)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    if variant and variant not in spec.variants:
        raise ValueError(f"unknown variant {variant!r} of dataset {base!r}; known: {', '.join(spec.variants)}")
    split = spec.default_split if split is None else split
    if spec.splits is not None and split not in spec.splits:
        raise ValueError(f"dataset {base!r} has no split {split!r}; known: {', '.join(spec.splits)}")
    _check_split(split)
    return spec, variant or None, split


def load_dataset(name: str, root: str | os.PathLike, split: str | None = None) -> list[Sample]:
    """Read dataset ``name`` (see :func:`available_datasets`) from folder ``root``; ``split`` defaults per dataset."""
    spec, variant, split = resolve_dataset(name, split)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder for {name!r} not found: {root}")
    return spec.reader(root, split, variant)


@register_dataset("gqa", default_split="testdev_balanced", description="GQA balanced questions, exact match")
def _gqa(root, split, variant):
    return read_gqa(root, split)


def _coco_vqa(root, split, name, questions_prefix, annotations_prefix):
    """A COCO-image dataset in the VQA format (VQAv2, OK-VQA): questions + annotations json per split."""
    return read_vqa(root, questions=f"{questions_prefix}_{split}_questions.json",
                    annotations=f"{annotations_prefix}_{split}_annotations.json",
                    images="{split}/COCO_{split}_{image_id:012d}.jpg", group=name, dataset=name, subtype=split)


@register_dataset("vqav2", default_split="val2014", description="VQAv2 open-ended, VQA accuracy")
def _vqav2(root, split, variant):
    return _coco_vqa(root, split, "vqav2", "v2_OpenEnded_mscoco", "v2_mscoco")


@register_dataset("okvqa", default_split="val2014", description="OK-VQA (VQA format), VQA accuracy")
def _okvqa(root, split, variant):
    return _coco_vqa(root, split, "okvqa", "OpenEnded_mscoco", "mscoco")


@register_dataset("textvqa", default_split="val", description="TextVQA, VQA accuracy")
def _textvqa(root, split, variant):
    return read_textvqa(root, split)


@register_dataset("vizwiz", default_split="val", description="VizWiz VQA, VQA accuracy")
def _vizwiz(root, split, variant):
    return read_vizwiz(root, split)


@register_dataset("pope", default_split="all", splits=(*synthvqa.POPE_VARIANTS, "all"),
                  description="POPE (COCO) random / popular / adversarial, yes/no")
def _pope(root, split, variant):
    variants = synthvqa.POPE_VARIANTS if split == "all" else (split,)
    return [s for v in variants for s in read_pope(root, v)]


@register_dataset("vsr", default_split="test", description="VSR true/false captions")
def _vsr(root, split, variant):
    return read_vsr(root, split)


@register_dataset("synthvqa", default_split="test", splits=synthvqa.SPLITS, variants=synthvqa.FAMILIES,
                  description="SynthVQA, all families or one (synthvqa:<family>)")
def _synthvqa(root, split, variant):
    return read_synthvqa(root, split, (variant,) if variant else synthvqa.FAMILIES)
