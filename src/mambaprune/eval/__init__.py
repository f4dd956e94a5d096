"""Evaluation: answer metrics (exported here); the runner (:mod:`.runner` with :mod:`.config`, :mod:`.records`,
:mod:`.loop`, :mod:`.summary`, :mod:`.distributed`, :mod:`.cli`) and the reports (:mod:`.report`) are submodules."""
from .metrics import METRICS, Metric, get_metric, gqa_exact_match, normalize_answer, pope_parse, pope_summary, \
    vqa_accuracy, vsr_accuracy, vsr_parse

__all__ = [
    "METRICS", "Metric", "get_metric", "gqa_exact_match", "normalize_answer", "pope_parse", "pope_summary",
    "vqa_accuracy", "vsr_accuracy", "vsr_parse",
]
