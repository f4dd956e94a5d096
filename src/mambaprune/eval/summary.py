"""The summary of an evaluation run (``summary.json``) from its per-sample records: accuracy per group, FLOPs and
mean timings (:func:`summarize_records`)."""
from __future__ import annotations

from typing import Sequence

from .config import EvalConfig, method_label
from .loop import TIMING_PROTOCOL
from .records import jsonable

__all__ = ["SUMMARY_TIMING_FIELDS", "summarize_records"]

#: Summary fields that are measured times or memory, or depend on the number of processes.
SUMMARY_TIMING_FIELDS = ("prefill_ms_mean", "decode_ms_per_token_mean", "method_ms_mean", "total_s",
                         "peak_mem_mb")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _answerable_split(recs: Sequence[dict]) -> dict:
    """Mean score (percent) of the answerable and of the unanswerable questions, where records carry VizWiz's
    ``answerable`` flag (as VizWiz's own evaluation and vlm-evaluation's ``harnesses/vizwiz.py`` l. 311-353 report
    them); nothing otherwise."""
    out = {}
    for key, flag in (("accuracy_answerable", True), ("accuracy_unanswerable", False)):
        scores = [r["score"] for r in recs if r.get("answerable") is flag]
        if scores:
            out[key] = 100.0 * sum(scores) / len(scores)
    return out


def summarize_records(records: Sequence[dict], config: EvalConfig | dict, final: str | None = None,
                      **extra) -> dict:
    """The summary of a run from its records (in dataset order); ``extra`` adds or overrides keys.

    Keys: ``config``, ``label``, ``n_samples`` (records, errors included), ``n_errors``, ``n_scored``,
    ``accuracy`` ``{group: percent}`` (the group metric's summary "accuracy" x 100 over the records without an
    error; None for a group with none), ``metrics`` ``{group: the metric's full summary in percent, plus n
    (scored) and n_errors}``, ``average`` (mean of the group accuracies), ``flops`` and ``flops_baseline`` (mean
    LM multiply-adds per scored sample, :func:`mambaprune.flops.lm_macs`), ``flops_ratio`` (sum of flops / sum
    of flops_baseline), ``tokens_per_layer_mean``, ``prefill_ms_mean``, ``method_ms_mean`` (means per sample),
    ``decode_ms_per_token_mean`` (all decoding time / all decoding steps), ``timing_protocol``, ``scorer`` (the
    metric names the records were scored with). ``average`` over POPE's three splits (groups) is POPE-final as
    vlm-evaluation reports it (the mean of the split accuracies); a group of VizWiz questions also gets
    ``accuracy_answerable`` / ``accuracy_unanswerable`` in ``metrics``. With ``final`` (a protocol task's, e.g.
    ``"pope"``), ``accuracy_final`` is ``{final: average}``, the column a paper's table shows for the dataset.
    """
    from ..eval.metrics import get_metric

    config_dict = config.to_dict() if isinstance(config, EvalConfig) else dict(config)
    ok = [r for r in records if r.get("error") is None]
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["group"], [])
        if r.get("error") is None:
            groups[r["group"]].append(r)
    accuracy, metrics = {}, {}
    for group, recs in groups.items():
        n_err = sum(1 for r in records if r["group"] == group and r.get("error") is not None)
        if not recs:
            accuracy[group] = None
            metrics[group] = {"n": 0, "n_errors": n_err}
            continue
        names = {r["metric"] for r in recs}
        if len(names) != 1:
            raise ValueError(f"group {group!r} mixes metrics {sorted(names)}")
        summary = get_metric(names.pop()).summarize([r["prediction"] for r in recs], [r["answers"] for r in recs])
        metrics[group] = {**{k: 100.0 * v for k, v in summary.items()}, "n": len(recs), "n_errors": n_err}
        metrics[group].update(_answerable_split(recs))
        accuracy[group] = 100.0 * summary["accuracy"]
    flops = sum(r["flops"] for r in ok)
    base = sum(r["flops_baseline"] for r in ok)
    tpl = [r["tokens_per_layer"] for r in ok]
    steps = sum(r["n_decode_steps"] or 0 for r in ok)
    out = {
        "config": jsonable(config_dict),
        "label": method_label(config_dict["method"], config_dict.get("params") or {}),
        "n_samples": len(records),
        "n_errors": len(records) - len(ok),
        "n_scored": len(ok),
        "accuracy": accuracy,
        "metrics": metrics,
        "average": _mean(accuracy.values()),
        "flops": flops / len(ok) if ok else None,
        "flops_baseline": base / len(ok) if ok else None,
        "flops_ratio": flops / base if base else None,
        "tokens_per_layer_mean": [sum(col) / len(col) for col in zip(*tpl)] if tpl else None,
        "prefill_ms_mean": _mean(r["prefill_ms"] for r in ok),
        "decode_ms_per_token_mean": sum(r["decode_ms"] for r in ok) / steps if steps else None,
        "method_ms_mean": _mean(r["method_ms"] for r in ok),
        "timing_protocol": TIMING_PROTOCOL,
        "scorer": sorted({r["metric"] for r in records if r.get("metric")}),
    }
    if final is not None:
        out["accuracy_final"] = {final: out["average"]}
    out.update(extra)
    return out
