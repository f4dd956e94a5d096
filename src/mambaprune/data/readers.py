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

Released layouts recognised besides those flat files (the ``root`` given is looked at in this order):

* a vlm-evaluation root (the folder holding ``download/`` and ``datasets/`` that ``scripts/datasets/prepare.py`` of
  TRI-ML/vlm-evaluation, and of its Cobra fork h-zhao1997/vlm-evaluation, leaves): when
  ``root/datasets/<family>/metadata*.json`` exists it is read by :mod:`mambaprune.data.vlm_eval` for ``gqa``,
  ``vqav2``, ``textvqa``, ``vizwiz``, ``pope`` and ``vsr``; split ``slim-<n>`` reads its ``metadata-slim-<n>.json``;
* VSR's split folders (cambridgeltl/visual-spatial-reasoning, ``data/README.md``): ``splits/{zeroshot,random}/
  {train,dev,test}.jsonl`` with ``images/`` beside ``splits/`` (``root`` = the repository's ``data/``), or the same
  under ``data/`` (``root`` = the clone). ``vsr`` is the zero-shot split (what vlm-evaluation scores), ``vsr:random``
  the random split; a flat ``{split}.jsonl`` is taken to be the split the name says;
* POPE's repository (AoiDragon/POPE): its ``output/coco/coco_pope_{split}.json`` (CRLF json lines).

``load_dataset(..., images_root=DIR)`` reads the images from ``DIR`` instead of where the layout puts them: an image
is then ``DIR/<file name>`` (the layout's folder part is dropped), and a missing ``DIR`` is one FileNotFoundError line
naming the files expected there.

VSR has captions, not questions: a sample's question is ``VSR_PROMPT`` with the caption filled in ("Is this
statement true or false? The cat is left of the laptop.") and its answer "true" or "false". POPE's question is the
``text`` field. A sample's ``group`` is the unit a summary reports (``gqa``, ``pope_adversarial``,
``synthvqa:count``, ...); ``extra`` keeps format-specific fields (question/answer type, POPE split, relation...);
``ocr_tokens`` (TextVQA) and ``answerable`` (VizWiz) are set where the file carries them, None otherwise.
"""
from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import synthvqa, vlm_eval
from .common import VSR_PROMPT, Sample, _check_images_root, _fields, _inside, _load_json

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

_SUBFOLDERS = ("", "questions", "annotations", "Questions", "Annotations", "splits")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


# --- file helpers ---------------------------------------------------------------------------------------------------

def _image(root: Path, template: str, record: dict, images_root: Path | None = None, **more) -> Path:
    """The image path ``template`` formatted with a record's fields; a field holding an absolute path is refused
    (it would otherwise be spliced under the template's folder), and so is a result outside ``root``.

    With ``images_root`` the template's folder part is dropped and the file name is looked up in ``images_root``
    (and may not leave it).
    """
    if images_root is not None:
        root, template = Path(images_root), template.rsplit("/", 1)[-1]
    values = {**record, **more}
    for _, name, _, _ in string.Formatter().parse(template):
        value = values.get(name) if name else None
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith(("/", "\\"))):
            raise ValueError(f"image path {value!r} is absolute; image paths must be relative to the data folder "
                             f"{os.path.abspath(root)}")
    return _inside(root, template.format(**values), "image")


def _find(root: Path, names: Sequence[str], dataset: str, subfolders: Sequence[str] = _SUBFOLDERS) -> Path:
    """The first existing annotation file among ``names`` in ``root`` or its conventional sub-folders."""
    tried = []
    for name in names:
        for sub in subfolders:
            path = _inside(root, os.path.join(sub, name), "annotation")
            if path.is_file():
                return path
            tried.append(path)
    listing = ", ".join(str(p) for p in tried[:len(subfolders)])
    raise FileNotFoundError(f"{dataset}: annotation file {' or '.join(names)} not found in {root} "
                            f"(looked at {listing}{', ...' if len(tried) > len(subfolders) else ''})")


def _annotation(root: Path, given: str | None, names: Sequence[str], dataset: str,
                subfolders: Sequence[str] = _SUBFOLDERS) -> Path:
    """An explicitly given annotation file (relative to ``root``) or the first conventional one found."""
    if given is None:
        return _find(root, names, dataset, subfolders)
    path = _inside(root, given, "annotation")
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: annotation file not found: {path}")
    return path


def _load_jsonl(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n} is not valid JSON: {err}") from None
    return records


def _check_split(split: str) -> str:
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split) or ".." in split.split("/"):
        raise ValueError(f"invalid split name {split!r}")
    return split


# --- the public formats -------------------------------------------------------------------------------------------

def read_gqa(root, split: str = "testdev_balanced", *, questions: str | None = None,
             images: str = "images/{imageId}.jpg", group: str = "gqa", images_root=None) -> list[Sample]:
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
        samples.append(Sample(str(qid), _image(root, images, rec, images_root), question, [answer],
                              "exact_match", group, extra))
    _check_images_root(images_root, samples, "gqa")
    return samples


def read_vqa(root, *, questions: str, annotations: str, images: str, group: str, dataset: str = "vqa",
             subtype: str = "", images_root=None) -> list[Sample]:
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
        samples.append(Sample(str(qid), _image(root, images, rec, images_root, split=subtype), question,
                              answers, "vqa_accuracy", group, extra))
    _check_images_root(images_root, samples, dataset)
    return samples


def read_textvqa(root, split: str = "val", *, annotations: str | None = None, images: str | None = None,
                 group: str = "textvqa", images_root=None) -> list[Sample]:
    """TextVQA json: ``{"data": [{question_id, image_id, question, answers (10), ...}]}``.

    Val images live in ``train_images/`` in the TextVQA release, test images in ``test_images/``. A record's
    ``ocr_tokens`` list, where the file has one, becomes :attr:`Sample.ocr_tokens`.
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
        ocr = rec.get("ocr_tokens")
        samples.append(Sample(str(qid), _image(root, images, rec, images_root), question, list(answers),
                              "vqa_accuracy", group, {},
                              ocr_tokens=[str(t) for t in ocr] if isinstance(ocr, list) else None))
    _check_images_root(images_root, samples, "textvqa")
    return samples


def read_vizwiz(root, split: str = "val", *, annotations: str | None = None, images: str = "{split}/{image}",
                group: str = "vizwiz", images_root=None) -> list[Sample]:
    """VizWiz json: ``[{image, question, answers: [{answer, answer_confidence}], answer_type, answerable}]``.

    A sample's id is the image's stem (``VizWiz_val_00000000``); ``extra["answer_confidence"]`` keeps the
    confidences beside the answers and ``answerable`` the 0/1 flag (also in ``extra``).
    """
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
        if any(isinstance(a, dict) and "answer_confidence" in a for a in answers):
            extra["answer_confidence"] = [a.get("answer_confidence") if isinstance(a, dict) else None
                                          for a in answers]
        samples.append(Sample(Path(image).stem, _image(root, images, rec, images_root, split=split),
                              question, [a["answer"] if isinstance(a, dict) else a for a in answers],
                              "vqa_accuracy", group, extra,
                              answerable=bool(int(rec["answerable"])) if "answerable" in rec else None))
    _check_images_root(images_root, samples, "vizwiz")
    return samples


#: Where a POPE file is looked for: the conventional sub-folders, and ``output/coco/`` of a clone of the POPE
#: repository (AoiDragon/POPE, the commit vlm-evaluation pins, vlm_eval/tasks/registry.py lines 242-264).
_POPE_SUBFOLDERS = (*_SUBFOLDERS, "output/coco")


def read_pope(root, variant: str, *, annotations: str | None = None, images: str = "val2014/{image}",
              group: str | None = None, images_root=None) -> list[Sample]:
    """One POPE file, json lines ``{question_id, image, text, label}`` (``coco_pope_{variant}.json``).

    The released files (AoiDragon/POPE ``output/coco/``) end their lines with CRLF; ids are ``<variant>/<qid>``
    because question ids repeat across the three files.
    """
    if variant not in synthvqa.POPE_VARIANTS:
        raise ValueError(f"unknown POPE split {variant!r}; known: {', '.join(synthvqa.POPE_VARIANTS)}")
    root = Path(root)
    path = _annotation(root, annotations, [f"coco_pope_{variant}.json", f"coco_pope_{variant}.jsonl"], "pope",
                       _POPE_SUBFOLDERS)
    samples = []
    for n, rec in enumerate(_load_jsonl(path), 1):
        qid, _, text, label = _fields(rec, ("question_id", "image", "text", "label"), path, f"on line {n}")
        if str(label).strip().lower() not in ("yes", "no"):
            raise ValueError(f"{path}: line {n} has label {label!r}, not yes/no")
        samples.append(Sample(f"{variant}/{qid}", _image(root, images, rec, images_root), text,
                              [str(label).strip().lower()], "pope", group or f"pope_{variant}",
                              {"pope_split": variant}))
    _check_images_root(images_root, samples, "pope")
    return samples


#: VSR's two splits (cambridgeltl/visual-spatial-reasoning data/README.md lines 21-38): ``zeroshot`` (no concept
#: shared between train, dev and test; the split vlm-evaluation and InstructBLIP score) and ``random``.
VSR_SPLITS = ("zeroshot", "random")


def _vsr_file(root: Path, split: str, which: str) -> tuple[Path, str]:
    """(annotation file, image template) of a VSR split in one of the released layouts, the split folders first.

    The repository keeps ``data/splits/{random,zeroshot}/{train,dev,test}.jsonl`` and asks for the images in
    ``data/images/`` (data/README.md lines 13-19 and 21-36), so ``root`` may be the clone or its ``data/``; a flat
    ``{split}.jsonl`` (the Hugging Face copies cambridgeltl/vsr_zeroshot and vsr_random, which vlm-evaluation
    downloads, registry.py lines 283-300) has its images in ``images/``.
    """
    _check_split(split)
    tried = []
    for sub, images in (("", "images"), ("data", "data/images")):
        path = _inside(root, os.path.join(sub, "splits", which, f"{split}.jsonl"), "annotation")
        if path.is_file():
            return path, images + "/{image}"
        tried.append(path)
    try:
        return _find(root, [f"{split}.jsonl"], "vsr"), "images/{image}"
    except FileNotFoundError:
        tried.append(_inside(root, f"{split}.jsonl", "annotation"))
        raise FileNotFoundError(f"vsr: annotation file {split}.jsonl not found in {root} (looked at "
                                f"{', '.join(map(str, tried))}, ...)") from None


def read_vsr(root, split: str = "test", *, annotations: str | None = None, images: str | None = None,
             group: str = "vsr", images_root=None, which: str = "zeroshot") -> list[Sample]:
    """VSR json lines ``{image, image_link, caption, label (1/0), relation, ...}``, asked as :data:`VSR_PROMPT`.

    ``which`` picks the split folder (:data:`VSR_SPLITS`) when ``root`` holds VSR's ``splits/`` (see
    :func:`_vsr_file`). The lines have no id field: a sample's id is its line's position from 0 (as vlm-evaluation's
    ``example_id``, vlm_eval/tasks/harnesses/vsr.py line 52). Labels are ints 0/1 in the release (data/README.md
    line 57); booleans are accepted too. ``extra`` keeps the caption, relation and, where present, ``subj`` /
    ``obj`` (zero-shot files), ``reference_frame`` (random files) and ``image_link``.
    """
    root = Path(root)
    if which not in VSR_SPLITS:
        raise ValueError(f"unknown VSR split folder {which!r}; known: {', '.join(VSR_SPLITS)}")
    if annotations is not None:
        path, template = _annotation(root, annotations, [], "vsr"), "images/{image}"
    else:
        path, template = _vsr_file(root, split, which)
    template = template if images is None else images
    samples = []
    for n, rec in enumerate(_load_jsonl(path), 1):
        _, caption, label = _fields(rec, ("image", "caption", "label"), path, f"on line {n}")
        if label not in (0, 1):  # also True / False
            raise ValueError(f"{path}: line {n} has label {label!r}, not 0/1")
        extra = {"caption": caption, "relation": rec.get("relation", "")}
        extra.update({k: rec[k] for k in ("subj", "obj", "reference_frame", "image_link") if k in rec})
        samples.append(Sample(str(n - 1), _image(root, template, rec, images_root),
                              VSR_PROMPT.format(caption=caption), ["true" if label else "false"], "vsr", group,
                              extra))
    _check_images_root(images_root, samples, "vsr")
    return samples


def read_synthvqa(root, split: str = "test", families: Iterable[str] = synthvqa.FAMILIES, *,
                  images_root=None) -> list[Sample]:
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
    kw = {"images_root": images_root}
    samples = []
    for family in families:
        if family not in synthvqa.FAMILIES:
            raise ValueError(f"unknown SynthVQA family {family!r}; known: {', '.join(synthvqa.FAMILIES)}")
        group = f"synthvqa:{family}"
        if family == "attr":
            part = read_gqa(root, questions=files["attr"][0], images=d + "/{imageId}.png", group=group, **kw)
        elif family == "exist":
            part = [s for v, f in zip(synthvqa.POPE_VARIANTS, files["exist"])
                    for s in read_pope(root, v, annotations=f, images=d + "/{image}", group=group, **kw)]
        elif family == "read":
            part = read_textvqa(root, annotations=files["read"][0], images=d + "/{image_id}.png",
                                group=group, **kw)
        elif family == "count":
            part = read_vqa(root, questions=files["count"][0], annotations=files["count"][1],
                            images=d + "/{image_id}.png", group=group, dataset="synthvqa", **kw)
        else:
            part = read_vsr(root, annotations=files["spatial"][0], images=d + "/{image}", group=group, **kw)
        for s in part:
            s.id = f"{family}/{s.id}"
            s.extra["family"] = family
        samples.extend(part)
    return samples


# --- the registry -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its reader ``reader(root, split, variant)``, split names and ``name:variant`` forms.

    ``splits`` is None when any well-formed split name is accepted (it names a file). A reader may also take an
    ``images_root`` keyword (the built-in ones do); :func:`load_dataset` passes it only when one is given.
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
    A dataset vlm-evaluation prepares also takes ``slim-<n>`` (its ``metadata-slim-<n>.json``).
    """
    base, _, variant = name.partition(":")
    spec = _REGISTRY.get(base)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    if variant and variant not in spec.variants:
        raise ValueError(f"unknown variant {variant!r} of dataset {base!r}; known: {', '.join(spec.variants)}")
    split = spec.default_split if split is None else split
    if (spec.splits is not None and split not in spec.splits
            and not (base in vlm_eval.FAMILIES and vlm_eval.SLIM.fullmatch(str(split)))):
        raise ValueError(f"dataset {base!r} has no split {split!r}; known: {', '.join(spec.splits)}")
    _check_split(split)
    return spec, variant or None, split


def _expected(name: str, split: str) -> str:
    """The files a data folder for ``name`` / ``split`` should hold, in words (for one-line errors)."""
    base, _, variant = name.partition(":")
    own = {
        "gqa": f"{split}_questions.json",
        "vqav2": f"v2_OpenEnded_mscoco_{split}_questions.json and v2_mscoco_{split}_annotations.json",
        "okvqa": f"OpenEnded_mscoco_{split}_questions.json and mscoco_{split}_annotations.json",
        "textvqa": f"TextVQA_0.5.1_{split}.json",
        "vizwiz": f"{split}.json (or Annotations/{split}.json)",
        "pope": "coco_pope_{random,popular,adversarial}.json (or output/coco/...)",
        "vsr": f"splits/{variant or 'zeroshot'}/{split}.jsonl (or data/splits/..., or {split}.jsonl)",
        "synthvqa": "manifest.json (a SynthVQA folder)",
    }.get(base, "the dataset's annotation files")
    if base in vlm_eval.FAMILIES and not variant:
        own += f", or a vlm-evaluation root with {vlm_eval.expected_file(base, split)}"
    return own


def load_dataset(name: str, root: str | os.PathLike, split: str | None = None, *,
                 images_root: str | os.PathLike | None = None) -> list[Sample]:
    """Read dataset ``name`` (see :func:`available_datasets`) from folder ``root``; ``split`` defaults per dataset.

    ``root`` is any of the layouts the module docstring lists (recognised from what it holds); ``images_root``, when
    given, is where the images are instead (see :func:`_image`).
    """
    spec, variant, split = resolve_dataset(name, split)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder for {name!r} not found: {root} (it should hold "
                                f"{_expected(name, split)})")
    if images_root is None:
        return spec.reader(root, split, variant)
    return spec.reader(root, split, variant, images_root=Path(images_root))


def _release_or_vlm_eval(name: str, root: Path, split: str, images_root, read_release: Callable[[], list[Sample]]):
    """A vlm-evaluation root's metadata when ``root/datasets/<family>/`` holds one, else the dataset's own release;
    a missing file is one error line naming both layouts' files."""
    if vlm_eval.is_vlm_eval_root(root, name):
        return vlm_eval.read_vlm_eval(root, name, split, images_root=images_root)
    if vlm_eval.SLIM.fullmatch(split):
        raise FileNotFoundError(f"{name}: split {split!r} is a vlm-evaluation subset, but {root} is not a "
                                f"vlm-evaluation root (no {vlm_eval.expected_file(name, split)})")
    try:
        return read_release()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; or a vlm-evaluation root with {vlm_eval.expected_file(name, split)}") \
            from None


@register_dataset("gqa", default_split="testdev_balanced", description="GQA balanced questions, exact match")
def _gqa(root, split, variant, images_root=None):
    return _release_or_vlm_eval("gqa", root, split, images_root,
                                lambda: read_gqa(root, split, images_root=images_root))


def _coco_vqa(root, split, name, questions_prefix, annotations_prefix, images_root=None):
    """A COCO-image dataset in the VQA format (VQAv2, OK-VQA): questions + annotations json per split."""
    return read_vqa(root, questions=f"{questions_prefix}_{split}_questions.json",
                    annotations=f"{annotations_prefix}_{split}_annotations.json",
                    images="{split}/COCO_{split}_{image_id:012d}.jpg", group=name, dataset=name, subtype=split,
                    images_root=images_root)


@register_dataset("vqav2", default_split="val2014", description="VQAv2 open-ended, VQA accuracy")
def _vqav2(root, split, variant, images_root=None):
    return _release_or_vlm_eval("vqav2", root, split, images_root, lambda: _coco_vqa(
        root, split, "vqav2", "v2_OpenEnded_mscoco", "v2_mscoco", images_root))


@register_dataset("okvqa", default_split="val2014", description="OK-VQA (VQA format), VQA accuracy")
def _okvqa(root, split, variant, images_root=None):
    return _coco_vqa(root, split, "okvqa", "OpenEnded_mscoco", "mscoco", images_root)


@register_dataset("textvqa", default_split="val", variants=("ocr",),
                  description="TextVQA, VQA accuracy (textvqa: the question alone; textvqa:ocr: with its OCR tokens)")
def _textvqa(root, split, variant, images_root=None):
    samples = _release_or_vlm_eval("textvqa", root, split, images_root,
                                   lambda: read_textvqa(root, split, images_root=images_root))
    if variant != "ocr":
        return samples
    if any(s.ocr_tokens is None for s in samples):
        raise ValueError(f"textvqa:ocr needs each question's OCR tokens, and the TextVQA file in {root} has none "
                         f"(TextVQA_0.5.1_{split}.json carries them in 'ocr_tokens')")
    return [replace(s, group="textvqa:ocr") for s in samples]


@register_dataset("vizwiz", default_split="val", description="VizWiz VQA, VQA accuracy")
def _vizwiz(root, split, variant, images_root=None):
    return _release_or_vlm_eval("vizwiz", root, split, images_root,
                                lambda: read_vizwiz(root, split, images_root=images_root))


@register_dataset("pope", default_split="all", splits=(*synthvqa.POPE_VARIANTS, "all"),
                  variants=synthvqa.POPE_VARIANTS,
                  description="POPE (COCO) random / popular / adversarial, yes/no (pope: all three; pope:<split>)")
def _pope(root, split, variant, images_root=None):
    if variant is not None:
        split = variant
    variants = synthvqa.POPE_VARIANTS if split == "all" else (split,)
    return _release_or_vlm_eval("pope", root, split, images_root, lambda: [
        s for v in variants for s in read_pope(root, v, images_root=images_root)])


@register_dataset("vsr", default_split="test", variants=("random",),
                  description="VSR true/false captions, zero-shot split (vsr:random: the random split)")
def _vsr(root, split, variant, images_root=None):
    if variant == "random":
        return read_vsr(root, split, images_root=images_root, which="random", group="vsr:random")
    return _release_or_vlm_eval("vsr", root, split, images_root,
                                lambda: read_vsr(root, split, images_root=images_root))


@register_dataset("synthvqa", default_split="test", splits=synthvqa.SPLITS, variants=synthvqa.FAMILIES,
                  description="SynthVQA, all families or one (synthvqa:<family>)")
def _synthvqa(root, split, variant, images_root=None):
    return read_synthvqa(root, split, (variant,) if variant else synthvqa.FAMILIES, images_root=images_root)
