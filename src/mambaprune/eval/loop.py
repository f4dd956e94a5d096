"""The sample loop of an evaluation run and how it is timed.

:class:`SampleLoop` answers the pending samples of one process greedily with the pruner as the model's hook,
scores them and appends one record per sample (:data:`RECORD_FIELDS`) to the record file
(:mod:`mambaprune.eval.records`); after each batch it adds the loop's wall time and the peak memory
(:func:`peak_memory`) to the state file.

Timings follow :data:`TIMING_PROTOCOL`. With ``batch_size > 1`` several samples are answered as one
left-padded batch and each of them gets the batch's times divided by the batch size (tokens per layer and
FLOPs stay per sample, counted from each sample's own token mask by :class:`_TokenCounter`).

Errors: a sample whose image is missing or unreadable, or whose preparation fails otherwise, is recorded with
``error`` set and no score (with ``fatal_errors`` the exception is raised instead); such a record is kept on a
restart (delete its line to retry it). An exception during generation itself is a bug or a resource problem
(e.g. out of memory) and is raised, whatever ``fatal_errors`` says; the run can be resumed afterwards.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .config import EvalConfig
from .protocols import postprocess, scorer_for
from .records import write_atomic

__all__ = ["RECORD_FIELDS", "SampleLoop", "TIMING_FIELDS", "TIMING_PROTOCOL", "peak_memory"]

#: How every time in the records and the summary is measured.
TIMING_PROTOCOL = (
    "Warm-up: before anything is timed, each process answers its first pending sample `warmup` times without "
    "recording. Then per sample: the prefill (the language model's forward pass over [visual | text] with the "
    "pruner as hook; vision tower and projector excluded) and each single-token decoding step are timed with "
    "time.perf_counter, with torch.cuda.synchronize before each timer is read when the model is on a GPU; "
    "method_ms is the pruner's own time (its method_seconds, also synchronised on a GPU) inside that prefill; "
    "with batch_size > 1 each sample gets its batch's times divided by the batch size; total_s is the wall "
    "time of the sample loop (warm-up and model loading excluded) summed over restarts.")

#: Keys of one record of ``samples.jsonl``.
RECORD_FIELDS = (
    "index", "id", "group", "metric", "question", "prediction", "answers", "score", "tokens_per_layer",
    "n_visual", "n_text", "flops", "flops_baseline", "prefill_ms", "decode_ms", "decode_ms_per_token",
    "n_decode_steps", "n_new_tokens", "method_ms", "batch_size", "error", "prompt", "generated", "choice",
    "answerable")
#: Record fields that are measured times (they differ from run to run).
TIMING_FIELDS = ("prefill_ms", "decode_ms", "decode_ms_per_token", "method_ms")


class _TokenCounter:
    """Wraps a hook and records, per sample, the real tokens each layer processes (for batches > 1, where
    ``MambaOutput.tokens_per_layer`` is summed over the batch)."""

    def __init__(self, hook, n_layer: int):
        self.hook, self.n_layer, self.counts = hook, n_layer, []

    def start(self, config):
        self.counts = []
        if hasattr(self.hook, "start"):
            self.hook.start(config)

    @property
    def signal_layers(self):
        return getattr(self.hook, "signal_layers", None)

    @property
    def method_seconds(self):
        return getattr(self.hook, "method_seconds", 0.0)

    def __call__(self, seq):
        new = self.hook(seq) if self.hook is not None else None
        if seq.layer < self.n_layer - 1:                # what layer seq.layer + 1 will process
            self.counts.append((seq if new is None else new).mask.sum(1))
        return new

    def per_sample(self) -> list[list[int]]:
        table = torch.stack(self.counts, dim=1).cpu().tolist() if self.counts else []
        return [[int(c) for c in row] for row in table]


def peak_memory(device: torch.device) -> tuple[float, str]:
    """``(MiB, kind)``: the CUDA allocator's peak on a GPU (``cuda_max_memory_allocated``), else the process's
    peak resident set size (``cpu_peak_rss``)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_memory_allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux, bytes on macOS
    mb = rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024
    return mb, "cpu_peak_rss"


class SampleLoop:
    """The per-process sample loop (driven by :func:`mambaprune.eval.runner.run_eval`): writes each record to
    ``record_file`` (opened for appending) as soon as its batch is answered."""

    def __init__(self, config: EvalConfig, model, pruner, device, max_new_tokens: int, record_file, task=None):
        from ..eval.metrics import get_metric
        from ..flops import lm_macs
        from .protocols import Task

        self.config, self.model, self.pruner, self.device = config, model, pruner, device
        self.max_new_tokens = max_new_tokens
        self.file = record_file
        self.get_metric, self.lm_macs = get_metric, lm_macs
        self.lm_config = model.lm.config
        self.task = task if task is not None else Task()
        self.candidate_ids = (model.candidate_ids([s for s, _ in self.task.candidates])
                              if self.task.answer == "choice" else None)

    def _prompts(self, samples) -> list[str]:
        """The exact text each sample's prompt is (the protocol's message in the model's template)."""
        from .protocols import build_prompt

        return [build_prompt(self.task, self.model.spec, s) for s in samples]

    def _prepare(self, images, samples):
        return self.model.prepare(images, [s.question for s in samples], prompts=self._prompts(samples))

    def _generate(self, prepared, timings: dict | None, hook, first_logits: list | None = None):
        options = {} if self.task.stop_at_eos else {"eos_token_id": None}
        return self.model.generate_prepared(prepared, pruner=hook, timings=timings, first_logits=first_logits,
                                            max_new_tokens=self.max_new_tokens, do_sample=False, **options)

    def warm_up(self, samples: Sequence, times: int) -> None:
        from ..models.vision import load_image

        if times < 1:
            return
        for s in samples:
            try:
                prepared = self._prepare([load_image(s.image)], [s])
            except Exception:
                continue
            for _ in range(times):
                self._generate(prepared, {}, self.pruner)
            return

    def run(self, pending: Sequence[tuple[int, object]], state: dict, state_path: Path, bar=None) -> None:
        """Answer ``pending`` ``[(dataset index, sample), ...]`` in batches of ``config.batch_size``. After each
        batch ``state`` gets ``total_s`` (its ``total_s`` from earlier starts plus this loop's wall time so far),
        ``peak_mem_mb`` (the maximum over starts), ``peak_mem_kind`` and ``device``, and is written to
        ``state_path``; ``bar`` (a progress bar, or None) advances by the batch's samples."""
        base_total = state["total_s"]
        t0 = time.perf_counter()
        for start in range(0, len(pending), self.config.batch_size):
            batch = pending[start:start + self.config.batch_size]
            self.run_batch(batch)
            peak, kind = peak_memory(self.device)
            state.update(total_s=base_total + time.perf_counter() - t0,
                         peak_mem_mb=max(peak, state.get("peak_mem_mb") or 0.0), peak_mem_kind=kind,
                         device=str(self.device))
            write_atomic(state_path, json.dumps(state))
            if bar is not None:
                bar.update(len(batch))

    def _error_record(self, index: int, sample, err: BaseException) -> dict:
        rec = dict.fromkeys(RECORD_FIELDS)
        rec.update(index=index, id=sample.id, group=sample.group, metric=scorer_for(self.task, sample), question=sample.question,
                   answers=list(sample.answers), error=f"{type(err).__name__}: {err}")
        return rec

    def _write(self, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def run_batch(self, batch: Sequence[tuple[int, object]]) -> list[dict]:
        """Answer, score and write the records of ``[(dataset index, sample), ...]``; returns the records."""
        from ..models.vision import load_image

        loaded, records = [], {}
        for index, sample in batch:
            try:
                loaded.append((index, sample, load_image(sample.image)))
            except Exception as e:
                if self.config.fatal_errors:
                    raise
                records[index] = self._error_record(index, sample, e)
        if loaded:
            try:
                prepared = self._prepare([im for _, _, im in loaded], [s for _, s, _ in loaded])
            except Exception:
                if len(loaded) == 1:
                    if self.config.fatal_errors:
                        raise
                    index, sample, _ = loaded[0]
                    records[index] = self._error_record(index, sample, sys.exc_info()[1])
                    prepared = None
                else:                                           # find the culprit sample by sample
                    for index, sample, _ in loaded:
                        records.update({r["index"]: r for r in self._answer_one(index, sample)})
                    prepared = None
            if prepared is not None:
                for rec in self._answer_prepared(loaded, prepared):
                    records[rec["index"]] = rec
        out = [records[index] for index, _ in batch]
        for rec in out:
            self._write(rec)
        return out

    def _choices(self, logits: torch.Tensor) -> list[dict]:
        """Each sample's candidate answer from its first-step logits, picked as vlm-evaluation's POPE and VSR
        scorers pick it (:func:`~mambaprune.eval.upstream_scorers.cobra_choice`: ``np.argmax``, the first of
        equals), with the probabilities renormalised over the candidates and over the whole vocabulary."""
        from .upstream_scorers import cobra_choice

        strings = [s for s, _ in self.task.candidates]
        labels = dict(self.task.candidates)
        vocab, renormalised = self.model.candidate_probabilities(logits, self.candidate_ids)
        return [{"candidates": strings, "probabilities": row, "vocab_probabilities": full,
                 "winner": labels[cobra_choice(row, strings)]}
                for row, full in zip(renormalised.tolist(), vocab.tolist())]

    def _answer_one(self, index: int, sample) -> list[dict]:
        """One sample alone (from a batch whose joint preparation failed)."""
        from ..models.vision import load_image

        try:
            image = load_image(sample.image)
            prepared = self._prepare([image], [sample])
        except Exception as e:
            if self.config.fatal_errors:
                raise
            return [self._error_record(index, sample, e)]
        return self._answer_prepared([(index, sample, image)], prepared)

    def _answer_prepared(self, loaded, prepared) -> list[dict]:
        b = len(loaded)
        timings: dict = {}
        hook = self.pruner if b == 1 else _TokenCounter(self.pruner, self.lm_config.n_layer)
        first_logits = [] if self.candidate_ids is not None else None
        tokens = self._generate(prepared, timings, hook, first_logits)
        eos = self.model.eos_token_id if self.task.stop_at_eos else None
        texts = self.model.decode(tokens, eos_token_id=eos)
        choices = self._choices(first_logits[0]) if first_logits is not None else [None] * b
        per_sample = [timings["tokens_per_layer"]] if b == 1 else hook.per_sample()
        steps = len(timings["decode_s"])
        prefill_ms = timings["prefill_s"] * 1000 / b
        decode_ms = sum(timings["decode_s"]) * 1000 / b
        method_ms = timings["method_s"] * 1000 / b
        out = []
        for i, (index, sample, _) in enumerate(loaded):
            row = tokens[i].tolist()
            n_new = row.index(eos) + 1 if eos is not None and eos in row else len(row)
            n_text = len(prepared.text_ids[i])
            tpl = [int(t) for t in per_sample[i]]
            metric = scorer_for(self.task, sample)
            prediction = choices[i]["winner"] if choices[i] is not None else postprocess(self.task, texts[i])
            rec = {
                "index": index, "id": sample.id, "group": sample.group, "metric": metric,
                "question": sample.question, "prediction": prediction, "answers": list(sample.answers),
                "score": float(self.get_metric(metric).score(prediction, sample.answers)),
                "tokens_per_layer": tpl, "n_visual": prepared.num_visual, "n_text": n_text,
                "flops": self.lm_macs(self.lm_config, tpl),
                "flops_baseline": self.lm_macs(self.lm_config, [prepared.num_visual + n_text] * len(tpl)),
                "prefill_ms": prefill_ms, "decode_ms": decode_ms,
                "decode_ms_per_token": decode_ms / steps if steps else None, "n_decode_steps": steps,
                "n_new_tokens": n_new, "method_ms": method_ms, "batch_size": b, "error": None,
                "prompt": prepared.prompts[i], "generated": texts[i], "choice": choices[i],
                "answerable": getattr(sample, "answerable", None),
            }
            out.append(rec)
        return out
