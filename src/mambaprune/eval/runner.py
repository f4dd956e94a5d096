"""The evaluation runner: one model, one pruning method, one dataset -> per-sample records and a summary.

``run_eval(EvalConfig(...))`` checks the whole configuration first (:func:`mambaprune.eval.config.validate`: the
method, its parameters, the dataset and split, and, when the model's loader can describe the model without loading
it, the method's layers against the model's depth), then answers every sample greedily with the pruner as the
model's hook (:mod:`mambaprune.eval.loop`), and writes into the output folder ``out`` (:mod:`mambaprune.eval.records`):
``run.json`` (the configuration, refusing a folder that holds another run), ``samples.jsonl`` (one record per
sample, resumable: a run killed at any point and started again ends with the records and summary of an
uninterrupted run, apart from the timing fields), ``state.json`` (the loop's wall time over restarts and the peak
memory) and, at the end, ``summary.json`` (:func:`mambaprune.eval.summary.summarize_records`).

The parts, one job per module of :mod:`mambaprune.eval`:

* :mod:`~mambaprune.eval.config`: :class:`EvalConfig`, its validation, model names and dtypes;
* :mod:`~mambaprune.eval.records`: the record store (the files above, atomic writes, resumption);
* :mod:`~mambaprune.eval.loop`: the sample loop, errors and timing (:data:`~mambaprune.eval.loop.TIMING_PROTOCOL`);
* :mod:`~mambaprune.eval.summary`: the summary of the records;
* :mod:`~mambaprune.eval.distributed`: several processes (torchrun) and how the samples are split among them;
* :mod:`~mambaprune.eval.cli`: the command-line flags, config and policy files;
* this module: :func:`run_eval`, which puts them together, and :func:`load_named_model`.

Command line: ``python -m mambaprune.eval.cli --config cfg.json`` (or ``mambaprune eval``; under ``torchrun``
for several processes) runs :func:`mambaprune.eval.cli.main`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .config import DTYPES, EvalConfig, check_device, method_label, resolve_loader, validate
from .distributed import barrier, dist_setup, dist_teardown, pick_device, rank_suffix, shard
from .loop import SampleLoop
from .protocols import default_protocol, get_protocol
from .records import check_run_json, read_records, read_state, record_protocol, write_atomic
from .summary import summarize_records

__all__ = ["load_named_model", "run_eval"]


def load_named_model(name: str, model_args: dict | None = None, device=None, dtype: str | None = None,
                     seed: int = 0):
    """The model ``name`` (see :func:`~mambaprune.eval.config.resolve_loader`) built with ``model_args`` under
    ``seed``, moved to ``device`` and ``dtype`` (one of :data:`~mambaprune.eval.config.DTYPES`' names) when given,
    in eval mode. An unknown dtype, or a device this machine does not have
    (:func:`~mambaprune.eval.config.check_device`), is a ValueError before anything is loaded."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    check_device(device)
    torch.manual_seed(seed)
    model = resolve_loader(name)(**(model_args or {}))
    if device is not None:
        model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=DTYPES[dtype])
    return model.eval()


def _load_model(config: EvalConfig, device: torch.device):
    return load_named_model(config.model, config.model_args, device, config.dtype, config.seed)


def run_eval(config: EvalConfig, progress: bool = True, model=None) -> dict | None:
    """Run (or resume) one evaluation; returns the summary (written to ``out/summary.json``).

    ``model``: an already loaded model to use instead of loading ``config.model`` (the demo runs many
    methods on one model); it must be what ``config.model`` / ``config.model_args`` would load.

    See :mod:`mambaprune.eval.records` for the files and the resumption, :mod:`mambaprune.eval.loop` for errors and
    timings and :mod:`mambaprune.eval.distributed` for several processes. Validation (:func:`validate`) happens
    before the model is loaded; the method's layers are checked before any sample runs. ``progress`` shows a
    progress bar over the samples (rank 0 only; :mod:`mambaprune.progress`).
    """
    from ..data.readers import load_dataset, resolve_dataset

    pruner = validate(config)
    loader = resolve_loader(config.model)
    rank, world, local_rank, created = dist_setup()
    try:
        samples = load_dataset(config.data, config.data_root, config.split, images_root=config.images_root)
        if config.limit is not None:
            samples = samples[:config.limit]
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset {config.data!r} has repeated sample ids; records could not be told apart")
        out = Path(config.out)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            check_run_json(out, config, world)
        barrier(world)

        suffix = rank_suffix(rank, world)
        records_path = out / f"samples{suffix}.jsonl"
        state_path = out / f"state{suffix}.json"
        mine = shard(samples, rank, world)
        done = {r["id"] for r in read_records(records_path)}
        pending = [(i, s) for i, s in mine if s.id not in done]
        device = pick_device(config.device, local_rank, world)
        state = read_state(state_path)
        state.setdefault("total_s", 0.0)
        task = resolve_dataset(config.data, config.split)[0].name
        max_new = config.max_new_tokens

        if pending:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            if model is None:
                model = _load_model(config, device)
            else:
                model = model.to(device=device).eval()
            if not callable(getattr(loader, "describe", None)):
                pruner.start(model.lm.config)           # layer checks, before any sample runs
            protocol = get_protocol(config.protocol or default_protocol(model.spec))
            declared = protocol.task_for(config.data)
            if max_new is None:
                max_new = declared.max_new_tokens or model.spec.max_new_tokens_for(task)
            state["max_new_tokens"] = max_new
            state["protocol"] = protocol.name
            if rank == 0:
                record_protocol(out, protocol.name, declared.scorer)
            with open(records_path, "a", encoding="utf-8") as f:
                loop = SampleLoop(config, model, pruner, device, max_new, f, task=declared)
                loop.warm_up([s for _, s in pending], config.warmup)
                bar = None
                if progress and rank == 0:
                    from ..progress import progress_bar

                    bar = progress_bar(total=len(mine), initial=len(mine) - len(pending), unit="sample",
                                       desc=method_label(config.method, config.params), file=sys.stderr)
                try:
                    loop.run(pending, state, state_path, bar)
                finally:
                    if bar is not None:
                        bar.close()
        state.setdefault("device", str(device))
        write_atomic(state_path, json.dumps(state))
        barrier(world)

        summary_path = out / "summary.json"
        if rank == 0:
            order = {s.id: i for i, s in enumerate(samples)}
            records = [r for k in range(world) for r in read_records(out / f"samples{rank_suffix(k, world)}.jsonl")]
            records = sorted((r for r in records if r["id"] in order), key=lambda r: order[r["id"]])
            missing = len(samples) - len(records)
            if missing:
                raise RuntimeError(f"{missing} sample(s) have no record in {out} after the run")
            if world > 1:
                write_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            states = [read_state(out / f"state{rank_suffix(k, world)}.json") for k in range(world)]
            peaks = [s.get("peak_mem_mb") for s in states if s.get("peak_mem_mb") is not None]
            kinds = {s.get("peak_mem_kind") for s in states if s.get("peak_mem_kind")}
            budgets = [s["max_new_tokens"] for s in states if s.get("max_new_tokens") is not None]
            protocols = sorted({s["protocol"] for s in states if s.get("protocol")})
            if len(protocols) > 1:
                raise RuntimeError(f"the records in {out} were answered under several protocols {protocols}")
            protocol_name = protocols[0] if protocols else config.protocol
            summary = summarize_records(
                records, config, protocol=protocol_name,
                final=get_protocol(protocol_name).task_for(config.data).final if protocol_name else None,
                max_new_tokens=budgets[0] if budgets else config.max_new_tokens,
                total_s=max(s.get("total_s", 0.0) for s in states),
                peak_mem_mb=max(peaks) if peaks else None,
                peak_mem_kind=kinds.pop() if len(kinds) == 1 else (sorted(kinds) or None),
                device=states[0].get("device", str(device)),
                world_size=world)
            write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
        barrier(world)
        if rank != 0:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        return summary
    finally:
        dist_teardown(created)
