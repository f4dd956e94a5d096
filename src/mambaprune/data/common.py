"""What every dataset reader shares: the :class:`Sample` an evaluation item becomes, VSR's question, and the file
helpers that keep paths inside the data folder (used by :mod:`mambaprune.data.readers` and
:mod:`mambaprune.data.vlm_eval` alike, which is why they live apart from both)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["VSR_PROMPT", "Sample"]

#: The question a VSR caption is asked as; the expected answer is "true" or "false".
VSR_PROMPT = "Is this statement true or false? {caption}"


@dataclass
class Sample:
    """One evaluation item.

    ``id`` is unique within the loaded dataset; ``image`` an absolute path inside the data folder; ``answers`` the
    reference answers (10 humans for VQA-accuracy datasets, one label otherwise); ``metric`` a key of
    :data:`mambaprune.eval.metrics.METRICS`; ``group`` the reporting unit; ``extra`` format-specific fields;
    ``ocr_tokens`` the OCR tokens a TextVQA file gives for the image (None: not given); ``answerable`` VizWiz's
    answerable flag (None: not a VizWiz sample).
    """

    id: str
    image: Path
    question: str
    answers: list[str]
    metric: str
    group: str
    extra: dict = field(default_factory=dict)
    ocr_tokens: list[str] | None = None
    answerable: bool | None = None


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel``, refused (ValueError) when it leaves ``root``; checked on the path's text, so links placed
    inside the folder by the user are followed."""
    base = os.path.abspath(root)
    path = os.path.normpath(os.path.join(base, rel))
    if os.path.commonpath([base, path]) != base:
        raise ValueError(f"{what} path {rel!r} escapes the data folder {base}")
    return Path(path)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _check_images_root(images_root, samples: Sequence[Sample], dataset: str) -> None:
    """One FileNotFoundError line when an images folder was given and is not there, naming files expected in it."""
    if images_root is None or Path(images_root).is_dir():
        return
    names = list(dict.fromkeys(s.image.name for s in samples[:3]))
    raise FileNotFoundError(f"{dataset}: images folder {images_root} not found"
                            + (f" (it should hold the annotated images, e.g. {', '.join(names)})" if names else ""))


def _fields(record, keys: tuple[str, ...], path: Path, where) -> tuple:
    """The values of ``keys`` in a JSON record; a ValueError names the file, the record and what it lacks."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: record {where} is not a JSON object")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{path}: record {where} lacks {', '.join(missing)}")
    return tuple(record[k] for k in keys)
