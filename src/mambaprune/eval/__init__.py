"""Evaluation: answer metrics (the runner, timing and reports arrive with their issue)."""
from .metrics import METRICS, Metric, get_metric, gqa_exact_match, normalize_answer, pope_parse, pope_summary, \
    vqa_accuracy, vsr_accuracy, vsr_parse

__all__ = [
    "METRICS", "Metric", "get_metric", "gqa_exact_match", "normalize_answer", "pope_parse", "pope_summary",
    "vqa_accuracy", "vsr_accuracy", "vsr_parse",
]
