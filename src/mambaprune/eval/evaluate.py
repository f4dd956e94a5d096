"""Answer a list of :class:`~mambaprune.data.readers.Sample` with a model and score the answers per group.

``answer_samples`` runs :meth:`MambaVLM.answer` over batches (samples of a batch are left-padded; the pruner, if
any, acts per sample), and ``score_samples`` applies each sample's metric (:mod:`mambaprune.eval.metrics`) and
summarises per group (e.g. ``synthvqa:read``) with the metric's own summary (POPE: accuracy, precision,
recall, F1, yes ratio; the others: accuracy). Summaries are fractions in [0, 1].
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .metrics import get_metric


def answer_samples(model, samples: Sequence, pruner=None, batch_size: int = 16, progress: bool | str = False,
                   **options) -> list[str]:
    """The model's answer to every sample, in order. ``progress`` shows a progress bar (a string is its label; :mod:`mambaprune.progress`);
    ``options`` are generation options of :meth:`MambaVLM.answer` (e.g. ``max_new_tokens``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    samples = list(samples)
    starts = range(0, len(samples), batch_size)
    if progress:
        from ..progress import progress_bar

        starts = progress_bar(starts, desc=progress if isinstance(progress, str) else "answering", unit="batch",
                      leave=False)
    answers = []
    with torch.no_grad():
        for start in starts:
            batch = samples[start:start + batch_size]
            answers += model.answer([s.image for s in batch], [s.question for s in batch], pruner=pruner,
                                    **options)
    return answers


def score_samples(samples: Sequence, predictions: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{group: summary}`` over the samples of each group (their metric's summary, plus ``n``)."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.group].append(i)
    out = {}
    for group, idx in groups.items():
        metrics = {samples[i].metric for i in idx}
        if len(metrics) != 1:
            raise ValueError(f"group {group!r} mixes metrics {sorted(metrics)}")
        metric = get_metric(metrics.pop())
        summary = metric.summarize([predictions[i] for i in idx], [samples[i].answers for i in idx])
        out[group] = {**summary, "n": len(idx)}
    return out
