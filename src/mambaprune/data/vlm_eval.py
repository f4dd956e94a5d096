"""A vlm-evaluation root read into :class:`~mambaprune.data.readers.Sample` lists.

vlm-evaluation (TRI-ML/vlm-evaluation; h-zhao1997/vlm-evaluation is the Cobra authors' fork with the same data
code) prepares each dataset family with ``scripts/datasets/prepare.py``: phase 1 downloads and extracts the raw
release into ``<root>/download/<family>/`` (vlm_eval/tasks/download.py line 121), phase 2 writes index files into
``<root>/datasets/<family>/`` (prepare.py lines 64-71, vlm_eval/tasks/builders.py). Each index file is one json
object ``{question id: record}`` whose ``img_path`` is relative to ``<root>``; ``load_dataset(name, root)``
recognises such a root when ``root/datasets/<family>/`` holds a ``metadata*.json`` (:func:`is_vlm_eval_root`).

The families read (``name`` here -> vlm-evaluation family; index files; record; the harness that writes it, in
vlm_eval/tasks/harnesses/):

* ``vqav2`` -> ``vqa-v2``: ``metadata.json`` and ``metadata-slim-<n>.json``; ``{question_id, question, img_path
  (download/vqa-v2/images_val2014/COCO_val2014_<id:012d>.jpg), answer (the multiple-choice answer), question_type,
  answer_type, all_answers (10)}`` (vqav2.py lines 41-78). Answers: ``all_answers``.
* ``gqa`` -> ``gqa``: ``metadata-full.json`` (not the registry's ``metadata.json``: gqa.py line 39 writes
  ``metadata-full``) and slims; ``{question_id, question, img_path (download/gqa/images/<imageId>.jpg), answer,
  fullAnswer, semanticStr, entailed, equivalent}`` (gqa.py lines 57-74).
* ``vizwiz`` -> ``vizwiz``: ``metadata.json`` and slims; ``{question_id (the record's position in val.json),
  question, img_path (download/vizwiz/val_images/<image>), answers, answerable (0/1)}`` where ``answers`` is the
  release's list of ``{answer, answer_confidence}`` *wrapped in one more list* (vizwiz.py line 64:
  ``"answers": [example["answers"]]``); there is no ``answer`` key.
* ``textvqa`` -> ``text-vqa``: ``metadata.json`` and slims; ``{question_id, question, img_path
  (download/text-vqa/train_val_images/<image_id>.jpg), answers (10)}``; the question is LLaVA's
  ``textvqa_val_v051_ocr.jsonl`` ``text``, i.e. the question, then ``"\\nReference OCR token: "`` and the OCR
  tokens joined by ``", "`` (textvqa.py lines 49-58; the harness asks the part before that line as "TextVQA-Pure",
  line 166, and the whole as "TextVQA-OCR", line 165).
* ``pope`` -> ``pope``: ``metadata-full.json`` and ``metadata-slim-<n>.json`` (the first ``n`` of each POPE split);
  ``{question_id (Python's salted ``hash(f"{split}-{question_id}")``), question, img_path
  (download/pope/val_images/<image>), answer (yes/no), split, split_question_id}`` (pope.py lines 41-117).
* ``vsr`` -> ``vsr``: ``metadata-full.json`` only (no slim: vsr.py line 38); the zero-shot test split
  (registry.py line 290); ``{example_id (line position in test.jsonl), caption, img_path (download/vsr/images/
  <image>), true_false (bool), subj, obj, relation}`` (vsr.py lines 52-71).

OK-VQA is not a vlm-evaluation family. Samples get the same ids, groups, metrics and ``extra`` keys as the
dataset's own-release reader in :mod:`mambaprune.data.readers`, with these exceptions kept from the metadata:
VizWiz ids are vlm-evaluation's ``question_id`` (position in ``val.json``; the release reader uses the image stem,
which is ``VizWiz_val_<position:08d>``), and POPE ids are ``<split>/<split_question_id>`` like the release reader
(the metadata's hashed key differs between Python processes; it is kept in ``extra["question_id"]``).

Splits: the split vlm-evaluation prepared (the dataset's default: ``val2014``, ``testdev_balanced``, ``val``,
``test``; for POPE ``all`` or one of its three splits, selected by the records' ``split`` field) reads the full
index file; ``slim-<n>`` reads ``metadata-slim-<n>.json`` (e.g. ``load_dataset("gqa", root, "slim-1024")``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from . import synthvqa
from .common import VSR_PROMPT, Sample, _check_images_root, _fields, _inside, _load_json

__all__ = ["FAMILIES", "SLIM", "expected_file", "index_file", "is_vlm_eval_root", "read_vlm_eval"]

#: Registry name -> vlm-evaluation dataset family (vlm_eval/tasks/registry.py ``DATASET_REGISTRY`` keys).
FAMILIES = {"vqav2": "vqa-v2", "gqa": "gqa", "vizwiz": "vizwiz", "textvqa": "text-vqa", "pope": "pope",
            "vsr": "vsr"}

#: The full index file each harness writes (the registry's ``index_files`` say ``metadata.json`` for all, but
#: gqa.py, pope.py and vsr.py write ``metadata-full.json``).
_FULL = {"vqa-v2": "metadata.json", "gqa": "metadata-full.json", "vizwiz": "metadata.json",
         "text-vqa": "metadata.json", "pope": "metadata-full.json", "vsr": "metadata-full.json"}

#: The split of each dataset vlm-evaluation prepares (our split names).
_PREPARED = {"vqav2": ("val2014",), "gqa": ("testdev_balanced",), "vizwiz": ("val",), "textvqa": ("val",),
             "pope": ("all", *synthvqa.POPE_VARIANTS), "vsr": ("test",)}

#: A slim subset's split name: ``slim-<n>`` reads ``metadata-slim-<n>.json``.
SLIM = re.compile(r"slim-(\d+)")

_OCR_LINE = "\nReference OCR token:"


def _family_dir(root: Path, name: str) -> Path:
    return Path(root) / "datasets" / FAMILIES[name]


def is_vlm_eval_root(root, name: str) -> bool:
    """Whether ``root/datasets/<family>/`` holds a vlm-evaluation index file (``metadata*.json``) for ``name``."""
    if name not in FAMILIES:
        return False
    folder = _family_dir(Path(root), name)
    return folder.is_dir() and any(folder.glob("metadata*.json"))


def expected_file(name: str, split: str) -> str:
    """The index file (relative to a vlm-evaluation root) that dataset ``name`` / ``split`` reads."""
    family = FAMILIES[name]
    m = SLIM.fullmatch(split)
    return f"datasets/{family}/" + (f"metadata-slim-{m.group(1)}.json" if m else _FULL[family])


def index_file(root, name: str, split: str) -> Path:
    """The index file of dataset ``name`` / ``split`` under vlm-evaluation root ``root``.

    Raises ValueError for a split vlm-evaluation does not prepare, FileNotFoundError (one line, naming the file and
    the index files that are there) when the file is missing.
    """
    root = Path(root)
    if name not in FAMILIES:
        raise ValueError(f"{name}: not a vlm-evaluation dataset family (known: {', '.join(FAMILIES)})")
    if not SLIM.fullmatch(split) and split not in _PREPARED[name]:
        raise ValueError(f"{name}: a vlm-evaluation root holds only the {' / '.join(_PREPARED[name])} split and "
                         f"its slim-<n> subsets, not {split!r}")
    path = root / expected_file(name, split)
    if path.is_file():
        return path
    if not SLIM.fullmatch(split):  # the other full name, should a version write the registry's metadata.json
        other = path.with_name("metadata.json" if path.name == "metadata-full.json" else "metadata-full.json")
        if other.is_file():
            return other
    there = sorted(p.name for p in path.parent.glob("metadata*.json")) if path.parent.is_dir() else []
    raise FileNotFoundError(f"{name}: vlm-evaluation index file {path} not found (written by vlm-evaluation's "
                            f"scripts/datasets/prepare.py; there: {', '.join(there) or 'none'})")


def _records(path: Path) -> list[tuple[str, dict]]:
    data = _load_json(path)
    if not isinstance(data, dict) or not all(isinstance(r, dict) for r in data.values()):
        raise ValueError(f"{path}: a vlm-evaluation index file maps question ids to records")
    return list(data.items())


def _img(root: Path, rec: dict, images_root) -> Path:
    """``root / img_path`` (refused when it leaves ``root``), or the file name in ``images_root``."""
    rel = str(rec["img_path"])
    if images_root is not None:
        return _inside(Path(images_root), os.path.basename(rel.replace("\\", "/")), "image")
    return _inside(root, rel, "image")


def split_ocr(question: str) -> tuple[str, list[str] | None]:
    """(question without the OCR line, OCR tokens) of a LLaVA/vlm-evaluation TextVQA question.

    The tokens are the text after ``"\\nReference OCR token:"`` up to the next line break, split at ``", "``; None
    when the question has no such line.
    """
    head, sep, tail = question.partition(_OCR_LINE)
    if not sep:
        return question, None
    line = tail.split("\n", 1)[0].strip()
    return head, (line.split(", ") if line else [])


def read_vlm_eval(root, name: str, split: str, *, images_root=None) -> list[Sample]:
    """Dataset ``name`` (a key of :data:`FAMILIES`) from vlm-evaluation root ``root``, split ``split``."""
    root = Path(root)
    path = index_file(root, name, split)
    samples = []
    for key, rec in _records(path):
        if name == "vqav2":
            qid, question, _, answer = _fields(rec, ("question_id", "question", "img_path", "answer"), path, key)
            extra = {k: rec[k] for k in ("question_type", "answer_type") if k in rec}
            extra["multiple_choice_answer"] = answer
            answers = list(rec.get("all_answers") or [answer])
            samples.append(Sample(str(qid), _img(root, rec, images_root), question, answers, "vqa_accuracy",
                                  "vqav2", extra))
        elif name == "gqa":
            qid, question, _, answer = _fields(rec, ("question_id", "question", "img_path", "answer"), path, key)
            samples.append(Sample(str(qid), _img(root, rec, images_root), question, [answer], "exact_match", "gqa",
                                  {"full_answer": rec.get("fullAnswer", "")}))
        elif name == "vizwiz":
            qid, question, _, answers = _fields(rec, ("question_id", "question", "img_path", "answers"), path, key)
            if len(answers) == 1 and isinstance(answers[0], list):  # vizwiz.py line 64 wraps the list once more
                answers = answers[0]
            extra = {"image": os.path.basename(str(rec["img_path"]))}
            if "answerable" in rec:
                extra["answerable"] = rec["answerable"]
            if any(isinstance(a, dict) and "answer_confidence" in a for a in answers):
                extra["answer_confidence"] = [a.get("answer_confidence") if isinstance(a, dict) else None
                                              for a in answers]
            samples.append(Sample(str(qid), _img(root, rec, images_root), question,
                                  [a["answer"] if isinstance(a, dict) else a for a in answers], "vqa_accuracy",
                                  "vizwiz", extra,
                                  answerable=bool(int(rec["answerable"])) if "answerable" in rec else None))
        elif name == "textvqa":
            qid, question, _, answers = _fields(rec, ("question_id", "question", "img_path", "answers"), path, key)
            bare, ocr = split_ocr(question)
            samples.append(Sample(str(qid), _img(root, rec, images_root), question, list(answers), "vqa_accuracy",
                                  "textvqa", {"question_without_ocr": bare},
                                  ocr_tokens=ocr if ocr is not None else []))
        elif name == "pope":
            _, question, _, answer, pope_split, sqid = _fields(
                rec, ("question_id", "question", "img_path", "answer", "split", "split_question_id"), path, key)
            if pope_split not in synthvqa.POPE_VARIANTS:
                raise ValueError(f"{path}: record {key} has POPE split {pope_split!r}")
            if split in synthvqa.POPE_VARIANTS and pope_split != split:
                continue
            label = str(answer).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{path}: record {key} has answer {answer!r}, not yes/no")
            samples.append(Sample(f"{pope_split}/{sqid}", _img(root, rec, images_root), question, [label], "pope",
                                  f"pope_{pope_split}", {"pope_split": pope_split, "question_id": str(key)}))
        else:  # vsr
            eid, caption, _, label = _fields(rec, ("example_id", "caption", "img_path", "true_false"), path, key)
            if label not in (0, 1):  # True / False as written (vsr.py line 65); 0 / 1 accepted
                raise ValueError(f"{path}: record {key} has true_false {label!r}, not a boolean")
            extra = {"caption": caption, "relation": rec.get("relation", "")}
            extra.update({k: rec[k] for k in ("subj", "obj") if k in rec})
            samples.append(Sample(str(eid), _img(root, rec, images_root), VSR_PROMPT.format(caption=caption),
                                  ["true" if label else "false"], "vsr", "vsr", extra))
    _check_images_root(images_root, samples, name)
    return samples
