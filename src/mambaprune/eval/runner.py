"""The evaluation runner: one model, one pruning method, one dataset -> per-sample records and a summary.

``run_eval(EvalConfig(...))`` checks the whole configuration first (:func:`validate`: the method, its parameters,
the dataset and split, and, when the model's loader can describe the model without loading it, the method's
layers against the model's depth), then answers every sample greedily with the pruner as the model's hook, and
writes into the output folder ``out``:

* ``run.json``: the configuration, the library versions and the number of processes, written at the start. A
  folder whose ``run.json`` holds a different configuration (``out`` and ``fatal_errors`` aside) or another
  number of processes is refused: runs are never mixed.
* ``samples.jsonl``: one JSON record per sample (:data:`RECORD_FIELDS`), appended, flushed and fsync'ed one by
  one. A run is **resumable**: started again with the same configuration it truncates a half-written last line,
  skips the samples already recorded and appends the others, so a run killed at any point ends with the records
  and summary of an uninterrupted run (apart from the timing fields, :data:`TIMING_FIELDS`), each sample once.
  A sample whose image is missing or unreadable, or whose preparation fails otherwise, is recorded with
  ``error`` set and no score (with ``fatal_errors`` the exception is raised instead); such a record is kept on a
  restart (delete its line to retry it). An exception during generation itself is a bug or a resource problem
  (e.g. out of memory) and is raised, whatever ``fatal_errors`` says; the run can be resumed afterwards.
* ``state.json``: the running total of the sample loop's wall time over (re)starts and the peak memory.
* ``summary.json``: written atomically at the end from all records in dataset order (:func:`summarize_records`).

Timings follow :data:`TIMING_PROTOCOL`. With ``batch_size > 1`` several samples are answered as one
left-padded batch and each of them gets the batch's times divided by the batch size (tokens per layer and
FLOPs stay per sample, counted from each sample's own token mask).

**Several processes.** Launched by ``torchrun --nproc-per-node N -m mambaprune.eval.runner --config cfg.json``
(``WORLD_SIZE`` > 1), each process joins a ``torch.distributed`` group (gloo; a group the caller already
initialised is used as it is, whatever its size), takes the samples ``samples[rank::N]`` and writes
``samples.rank{r}.jsonl`` and ``state.rank{r}.json`` with the same resumable logic; after a barrier rank 0
merges the rank files into ``samples.jsonl`` in dataset order and writes ``summary.json`` (its ``total_s`` and
``peak_mem_mb`` are the maxima over the ranks, which run side by side); after a second barrier every rank
returns that summary (the other ranks read it back from the file). Apart from the timing fields and
``world_size`` the summary equals a single-process run's. On a GPU each rank uses ``cuda:LOCAL_RANK`` when the
device is given as ``cuda`` or not at all.

Command line: ``python -m mambaprune.eval.runner --config cfg.json`` (a JSON or YAML file of
:class:`EvalConfig` fields) or flags (:func:`add_eval_arguments`, :func:`config_from_args`);
``--policy policy.json`` runs a policy planned by ``mambaprune plan`` (:mod:`mambaprune.planner`).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

__all__ = [
    "EvalConfig", "RECORD_FIELDS", "SUMMARY_TIMING_FIELDS", "TIMING_FIELDS", "TIMING_PROTOCOL",
    "add_eval_arguments", "config_from_args", "load_config_file", "load_policy_file", "main", "method_label",
    "parse_value",
    "read_records", "resolve_loader", "run_eval", "summarize_records", "validate",
]

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
    "n_decode_steps", "n_new_tokens", "method_ms", "batch_size", "error")
#: Record fields that are measured times (they differ from run to run).
TIMING_FIELDS = ("prefill_ms", "decode_ms", "decode_ms_per_token", "method_ms")
#: Summary fields that are measured times or memory, or depend on the number of processes.
SUMMARY_TIMING_FIELDS = ("prefill_ms_mean", "decode_ms_per_token_mean", "method_ms_mean", "total_s",
                         "peak_mem_mb")

#: Configuration fields a restart may change without being refused.
_RESTART_FREE = ("out", "fatal_errors")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ configuration
@dataclass(kw_only=True)
class EvalConfig:
    """One evaluation run.

    Attributes:
        model: a registered model name (:func:`mambaprune.models.available_models`) or ``"module.path:function"``
            (imported, then called like a registered loader).
        model_args: keyword arguments of the loader (e.g. ``{"folder": "..."}``).
        method, params: the pruning method and its parameters (:func:`mambaprune.pruning.build`); the method's
            ``seed`` is ``seed`` unless ``params`` sets it.
        data, data_root, split: the dataset name (``"synthvqa"``, ``"synthvqa:read"``, ``"pope:adversarial"``...),
            its folder and split (None: the dataset's default).
        limit: only the first ``limit`` samples (in dataset order).
        seed: seeds torch before the model is built and is the pruner's seed.
        out: output folder.
        batch_size: samples answered together (see the module docstring for the timings then).
        warmup: untimed warm-up repetitions of the first pending sample.
        max_new_tokens: decoding budget; None: the model spec's default for the dataset
            (``spec.max_new_tokens_for(<dataset name before any ':'>)``).
        fatal_errors: raise on a sample that cannot be prepared instead of recording an error.
        device, dtype: where and in which precision to run (None: cuda if available else cpu; the loader's dtype).
    """

    model: str
    data: str
    data_root: str
    out: str
    model_args: dict = field(default_factory=dict)
    method: str = "none"
    params: dict = field(default_factory=dict)
    split: str | None = None
    limit: int | None = None
    seed: int = 0
    batch_size: int = 1
    warmup: int = 1
    max_new_tokens: int | None = None
    fatal_errors: bool = False
    device: str | None = None
    dtype: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalConfig":
        """An EvalConfig from a dict of its fields; an unknown or missing required field is a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"an evaluation config must be a mapping of settings, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown evaluation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        missing = [k for k in ("model", "data", "data_root", "out") if d.get(k) in (None, "")]
        if missing:
            raise ValueError(f"missing required evaluation setting(s): {', '.join(missing)}")
        return cls(**d)


def _int_setting(value, name: str, lo: int, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}{' or None' if allow_none else ''}, got {value!r}")


def resolve_loader(name: str) -> Callable:
    """The loader function of a model: registered under ``name``, or ``"module.path:function"`` imported."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string, got {name!r}")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({e})") from e
        loader = getattr(module, attr, None)
        if not callable(loader):
            raise ValueError(f"model {name!r}: module {module_name!r} has no function {attr!r}")
        return loader
    from ..models import registry

    if name not in registry.available_models():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(registry.available_models())} "
                         "(or give 'module.path:function')")
    return registry._LOADERS[name]


def _resolved_params(config: EvalConfig) -> dict:
    """The method's parameters as the run builds it: ``params`` plus ``seed`` when the method takes one."""
    from ..pruning import method_params

    known = method_params(config.method)
    params = dict(config.params)
    if "seed" in known and "seed" not in params:
        params["seed"] = config.seed
    return params


def _build_pruner(config: EvalConfig):
    from ..pruning import build, method_params

    if not isinstance(config.method, str):
        raise ValueError(f"method must be a string, got {config.method!r}")
    if not isinstance(config.params, dict):
        raise ValueError(f"params must be a mapping of parameter names to values, got {config.params!r}")
    known = method_params(config.method)                     # ValueError naming an unknown method
    unknown = sorted(set(config.params) - set(known))
    if unknown:
        raise ValueError(f"method {config.method!r} has no parameter(s) {', '.join(map(str, unknown))}; its "
                         f"parameters: {', '.join(known)}")
    if "keep_ratio" in known:
        ratio = config.params.get("keep_ratio", known["keep_ratio"])
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1] (0 would drop every visual token), got {ratio!r}")
    return build(config.method, **_resolved_params(config))   # the constructor checks the other values


def validate(config: EvalConfig):
    """Check ``config`` without loading the model; returns the pruner it describes.

    A ValueError names the bad value: an unknown method or parameter, a parameter value the method refuses
    (``keep_ratio`` must be in (0, 1]), an unknown dataset, variant or split, ``limit``/``batch_size`` < 1,
    ``warmup`` < 0, ``max_new_tokens`` < 1, an unknown dtype or device, an unknown model. When the model's loader
    has a ``describe`` attribute (called with ``model_args``, returning at least ``{"n_layer": ...}`` without
    loading weights) the method's layers are resolved against that depth here (e.g. DTP's late layer before its
    early layer, a layer outside the model); otherwise :func:`run_eval` checks them right after loading.
    """
    from ..data.readers import resolve_dataset

    if not isinstance(config, EvalConfig):
        raise ValueError(f"expected an EvalConfig, got {type(config).__name__}")
    for name in ("data", "data_root", "out"):
        value = getattr(config, name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    pruner = _build_pruner(config)
    resolve_dataset(config.data, config.split)
    _int_setting(config.limit, "limit", 1, allow_none=True)
    _int_setting(config.batch_size, "batch_size", 1)
    _int_setting(config.warmup, "warmup", 0)
    _int_setting(config.max_new_tokens, "max_new_tokens", 1, allow_none=True)
    _int_setting(config.seed, "seed", 0)
    if config.dtype is not None and config.dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; known: {', '.join(_DTYPES)}")
    if config.device is not None:
        try:
            torch.device(config.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"invalid device {config.device!r}: {e}") from None
    if not isinstance(config.model_args, dict):
        raise ValueError(f"model_args must be a mapping, got {config.model_args!r}")
    loader = resolve_loader(config.model)
    describe = getattr(loader, "describe", None)
    if callable(describe):
        info = describe(**config.model_args)
        pruner.start(SimpleNamespace(n_layer=int(info["n_layer"])))
    return pruner


def method_label(method: str, params: dict) -> str:
    """``"none"``, ``"dtp"``, ``"dtp(keep_ratio=0.5)"``: the method and the parameters given to it."""
    if not params:
        return method
    return f"{method}({', '.join(f'{k}={v}' for k, v in params.items())})"


# ------------------------------------------------------------------------------------------------ files
def _jsonable(d):
    return json.loads(json.dumps(d))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_records(path, repair: bool = True) -> list[dict]:
    """The records of a ``samples*.jsonl`` file, each id once (the first), in file order.

    A last line without its newline, or a last line that is not valid JSON, is what a killed run leaves behind:
    with ``repair`` it is cut off the file (else ignored). Any other invalid line is a ValueError.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1                                   # bytes up to the last complete line
    lines = data[:keep].split(b"\n")[:-1]
    records, seen, offset = [], set(), 0
    for n, line in enumerate(lines, 1):
        start = offset
        offset += len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("not a record")
        except ValueError:
            if n == len(lines):                                    # a damaged last line: cut it too
                keep = start
                break
            raise ValueError(f"{path}, line {n}, is not a JSON record; the file is damaged") from None
        if rec["id"] not in seen:
            seen.add(rec["id"])
            records.append(rec)
    if repair and keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return records


def _versions() -> dict:
    import mambaprune

    out = {"mambaprune": mambaprune.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def _identity(config_dict: dict) -> dict:
    return {k: v for k, v in _jsonable(config_dict).items() if k not in _RESTART_FREE}


def _check_run_json(out: Path, config: EvalConfig, world_size: int) -> None:
    """Write ``run.json``, or refuse a folder holding another run (see the module docstring)."""
    path = out / "run.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            old_config = old["config"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} is not a run.json written by this runner; use another output folder") from None
        mine, theirs = _identity(config.to_dict()), _identity(old_config)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            what = "; ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in diff)
            raise ValueError(f"{out} holds another run ({what}); refusing to mix runs: use another output "
                             "folder or the same settings")
        if old.get("world_size", 1) != world_size:
            raise ValueError(f"{out} holds a run with world_size {old.get('world_size', 1)}, this one has "
                             f"{world_size}; resume it with the same number of processes")
        return
    leftovers = sorted(p.name for p in out.glob("samples*.jsonl"))
    if leftovers:
        raise ValueError(f"{out} holds records ({', '.join(leftovers)}) but no run.json; refusing to mix runs")
    _write_atomic(path, json.dumps({"config": _jsonable(config.to_dict()), "versions": _versions(),
                                    "world_size": world_size}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ running
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


def _pick_device(config: EvalConfig, local_rank: int, world_size: int) -> torch.device:
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", local_rank)
    return device


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_memory_allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux, bytes on macOS
    mb = rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024
    return mb, "cpu_peak_rss"


class _Runner:
    """The per-process sample loop (see :func:`run_eval`)."""

    def __init__(self, config: EvalConfig, model, pruner, device, max_new_tokens: int, record_file):
        from ..eval.metrics import get_metric
        from ..flops import lm_macs

        self.config, self.model, self.pruner, self.device = config, model, pruner, device
        self.max_new_tokens = max_new_tokens
        self.file = record_file
        self.get_metric, self.lm_macs = get_metric, lm_macs
        self.lm_config = model.lm.config

    def _generate(self, prepared, timings: dict | None, hook):
        return self.model.generate_prepared(prepared, pruner=hook, timings=timings,
                                            max_new_tokens=self.max_new_tokens, do_sample=False)

    def warm_up(self, samples: Sequence, times: int) -> None:
        from ..models.vision import load_image

        if times < 1:
            return
        for s in samples:
            try:
                prepared = self.model.prepare(load_image(s.image), s.question)
            except Exception:
                continue
            for _ in range(times):
                self._generate(prepared, {}, self.pruner)
            return

    def _error_record(self, index: int, sample, err: BaseException) -> dict:
        rec = dict.fromkeys(RECORD_FIELDS)
        rec.update(index=index, id=sample.id, group=sample.group, metric=sample.metric, question=sample.question,
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
                prepared = self.model.prepare([im for _, _, im in loaded], [s.question for _, s, _ in loaded])
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

    def _answer_one(self, index: int, sample) -> list[dict]:
        """One sample alone (from a batch whose joint preparation failed)."""
        from ..models.vision import load_image

        try:
            image = load_image(sample.image)
            prepared = self.model.prepare(image, sample.question)
        except Exception as e:
            if self.config.fatal_errors:
                raise
            return [self._error_record(index, sample, e)]
        return self._answer_prepared([(index, sample, image)], prepared)

    def _answer_prepared(self, loaded, prepared) -> list[dict]:
        b = len(loaded)
        timings: dict = {}
        hook = self.pruner if b == 1 else _TokenCounter(self.pruner, self.lm_config.n_layer)
        tokens = self._generate(prepared, timings, hook)
        texts = self.model.decode(tokens)
        per_sample = [timings["tokens_per_layer"]] if b == 1 else hook.per_sample()
        eos = self.model.eos_token_id
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
            rec = {
                "index": index, "id": sample.id, "group": sample.group, "metric": sample.metric,
                "question": sample.question, "prediction": texts[i], "answers": list(sample.answers),
                "score": float(self.get_metric(sample.metric).score(texts[i], sample.answers)),
                "tokens_per_layer": tpl, "n_visual": prepared.num_visual, "n_text": n_text,
                "flops": self.lm_macs(self.lm_config, tpl),
                "flops_baseline": self.lm_macs(self.lm_config, [prepared.num_visual + n_text] * len(tpl)),
                "prefill_ms": prefill_ms, "decode_ms": decode_ms,
                "decode_ms_per_token": decode_ms / steps if steps else None, "n_decode_steps": steps,
                "n_new_tokens": n_new, "method_ms": method_ms, "batch_size": b, "error": None,
            }
            out.append(rec)
        return out


# ------------------------------------------------------------------------------------------------ summary
def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize_records(records: Sequence[dict], config: EvalConfig | dict, **extra) -> dict:
    """The summary of a run from its records (in dataset order); ``extra`` adds or overrides keys.

    Keys: ``config``, ``label``, ``n_samples`` (records, errors included), ``n_errors``, ``n_scored``,
    ``accuracy`` ``{group: percent}`` (the group metric's summary "accuracy" x 100 over the records without an
    error; None for a group with none), ``metrics`` ``{group: the metric's full summary in percent, plus n
    (scored) and n_errors}``, ``average`` (mean of the group accuracies), ``flops`` and ``flops_baseline`` (mean
    LM multiply-adds per scored sample, :func:`mambaprune.flops.lm_macs`), ``flops_ratio`` (sum of flops / sum
    of flops_baseline), ``tokens_per_layer_mean``, ``prefill_ms_mean``, ``method_ms_mean`` (means per sample),
    ``decode_ms_per_token_mean`` (all decoding time / all decoding steps), ``timing_protocol``.
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
        accuracy[group] = 100.0 * summary["accuracy"]
    flops = sum(r["flops"] for r in ok)
    base = sum(r["flops_baseline"] for r in ok)
    tpl = [r["tokens_per_layer"] for r in ok]
    steps = sum(r["n_decode_steps"] or 0 for r in ok)
    out = {
        "config": _jsonable(config_dict),
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
    }
    out.update(extra)
    return out


# ------------------------------------------------------------------------------------------------ entry point
def _dist_setup() -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, created) from torchrun's environment; joins the process group."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():           # a group the caller set up
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0, False
    dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank, True


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def load_named_model(name: str, model_args: dict | None = None, device=None, dtype: str | None = None,
                     seed: int = 0):
    """The model ``name`` (see :func:`resolve_loader`) built with ``model_args`` under ``seed``, moved to
    ``device`` and ``dtype`` (one of :data:`_DTYPES`' names) when given, in eval mode."""
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
    torch.manual_seed(seed)
    model = resolve_loader(name)(**(model_args or {}))
    if device is not None:
        model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=_DTYPES[dtype])
    return model.eval()


def _load_model(config: EvalConfig, device: torch.device):
    return load_named_model(config.model, config.model_args, device, config.dtype, config.seed)


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run_eval(config: EvalConfig, progress: bool = True, model=None) -> dict | None:
    """Run (or resume) one evaluation; returns the summary (written to ``out/summary.json``).

    ``model``: an already loaded model to use instead of loading ``config.model`` (the demo runs many
    methods on one model); it must be what ``config.model`` / ``config.model_args`` would load.

    See the module docstring for the files, the resumption, errors and several processes. Validation
    (:func:`validate`) happens before the model is loaded; the method's layers are checked before any sample
    runs. ``progress`` shows a progress bar over the samples (rank 0 only; :mod:`mambaprune.progress`).
    """
    from ..data.readers import load_dataset, resolve_dataset

    pruner = validate(config)
    loader = resolve_loader(config.model)
    rank, world, local_rank, created = _dist_setup()
    try:
        samples = load_dataset(config.data, config.data_root, config.split)
        if config.limit is not None:
            samples = samples[:config.limit]
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset {config.data!r} has repeated sample ids; records could not be told apart")
        out = Path(config.out)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _check_run_json(out, config, world)
        _barrier(world)

        suffix = "" if world == 1 else f".rank{rank}"
        records_path = out / f"samples{suffix}.jsonl"
        state_path = out / f"state{suffix}.json"
        mine = list(enumerate(samples))[rank::world]
        done = {r["id"] for r in read_records(records_path)}
        pending = [(i, s) for i, s in mine if s.id not in done]
        device = _pick_device(config, local_rank, world)
        state = _read_state(state_path)
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
            if max_new is None:
                max_new = model.spec.max_new_tokens_for(task)
            state["max_new_tokens"] = max_new
            with open(records_path, "a", encoding="utf-8") as f:
                runner = _Runner(config, model, pruner, device, max_new, f)
                runner.warm_up([s for _, s in pending], config.warmup)
                bar = None
                if progress and rank == 0:
                    from ..progress import progress_bar

                    bar = progress_bar(total=len(mine), initial=len(mine) - len(pending), unit="sample",
                               desc=method_label(config.method, config.params), file=sys.stderr)
                try:
                    base_total = state["total_s"]
                    t0 = time.perf_counter()
                    for start in range(0, len(pending), config.batch_size):
                        batch = pending[start:start + config.batch_size]
                        runner.run_batch(batch)
                        peak, kind = _peak_memory(device)
                        state.update(total_s=base_total + time.perf_counter() - t0,
                                     peak_mem_mb=max(peak, state.get("peak_mem_mb") or 0.0), peak_mem_kind=kind,
                                     device=str(device))
                        _write_atomic(state_path, json.dumps(state))
                        if bar is not None:
                            bar.update(len(batch))
                finally:
                    if bar is not None:
                        bar.close()
        state.setdefault("device", str(device))
        _write_atomic(state_path, json.dumps(state))
        _barrier(world)

        summary_path = out / "summary.json"
        if rank == 0:
            order = {s.id: i for i, s in enumerate(samples)}
            if world == 1:
                records = read_records(records_path)
            else:
                records = [r for k in range(world) for r in read_records(out / f"samples.rank{k}.jsonl")]
            records = sorted((r for r in records if r["id"] in order), key=lambda r: order[r["id"]])
            missing = len(samples) - len(records)
            if missing:
                raise RuntimeError(f"{missing} sample(s) have no record in {out} after the run")
            if world > 1:
                _write_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            states = [_read_state(out / f"state{'' if world == 1 else f'.rank{k}'}.json") for k in range(world)]
            peaks = [s.get("peak_mem_mb") for s in states if s.get("peak_mem_mb") is not None]
            kinds = {s.get("peak_mem_kind") for s in states if s.get("peak_mem_kind")}
            budgets = [s["max_new_tokens"] for s in states if s.get("max_new_tokens") is not None]
            summary = summarize_records(
                records, config,
                max_new_tokens=budgets[0] if budgets else config.max_new_tokens,
                total_s=max(s.get("total_s", 0.0) for s in states),
                peak_mem_mb=max(peaks) if peaks else None,
                peak_mem_kind=kinds.pop() if len(kinds) == 1 else (sorted(kinds) or None),
                device=states[0].get("device", str(device)),
                world_size=world)
            _write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
        _barrier(world)
        if rank != 0:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        return summary
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ command line
def parse_value(text: str):
    """A command-line value: ``true``/``false`` -> bool, ``none``/``null`` -> None, then int, float, else the
    string itself."""
    if not isinstance(text, str):
        return text
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        if cast is float and not math.isfinite(value):
            return text
        return value
    return text


def key_value(text: str) -> tuple[str, object]:
    """An argparse ``type``: ``key=value`` -> ``(key, parse_value(value))``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), parse_value(value)


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The evaluation flags; every one defaults to None so that :func:`config_from_args` can tell a flag given
    on the command line (it overrides ``--config``) from one left out."""
    a = parser.add_argument
    a("--config", default=None, metavar="FILE", help="a YAML or JSON file of settings (flags override it)")
    a("--model", default=None, help="registered model name or module.path:function")
    a("--model-arg", action="append", type=key_value, default=None, metavar="KEY=VALUE",
      help="a keyword argument of the model's loader (repeatable)")
    a("--method", default=None, help="pruning method (default none)")
    a("--param", action="append", type=key_value, default=None, metavar="KEY=VALUE",
      help="a parameter of the method (repeatable), e.g. --param keep_ratio=0.5")
    a("--policy", default=None, metavar="FILE",
      help="a policy JSON (`mambaprune plan --out`): its method and params; --method/--param override them")
    a("--data", default=None, help="dataset name, e.g. synthvqa, synthvqa:read, pope:adversarial")
    a("--data-root", default=None, help="the dataset's folder")
    a("--split", default=None, help="dataset split (default: the dataset's)")
    a("--limit", type=int, default=None, help="only the first N samples")
    a("--seed", type=int, default=None, help="seed (default 0)")
    a("--out", default=None, help="output folder (resumable)")
    a("--batch-size", type=int, default=None, help="samples per batch (default 1)")
    a("--warmup", type=int, default=None, help="untimed warm-up repetitions (default 1)")
    a("--max-new-tokens", type=int, default=None, help="decoding budget (default: the model's for the task)")
    a("--fatal-errors", action="store_const", const=True, default=None,
      help="raise on a sample that cannot be prepared instead of recording an error")
    a("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    a("--dtype", default=None, help=f"one of {', '.join(_DTYPES)} (default: the loader's)")
    return parser


def load_config_file(path) -> dict:
    """Settings from a JSON file (``.json``) or a YAML file (anything else)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    return data


def load_policy_file(path) -> tuple[str, dict]:
    """``(method, params)`` of a policy JSON (``mambaprune plan --out``: an object with ``method`` and ``params``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"policy file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not a JSON policy ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("method"), str) \
            or not isinstance(data.get("params", {}), dict):
        raise ValueError(f"{path} must hold a JSON object with a 'method' string and a 'params' object")
    return data["method"], dict(data.get("params") or {})


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An :class:`EvalConfig` from parsed :func:`add_eval_arguments` flags over the ``--config`` file.

    ``--policy FILE`` sets ``method`` and ``params`` from the policy (over the config file's); ``--param`` flags
    are merged over the policy's params, and a ``--method`` other than the policy's makes the policy unused
    (its params belong to its own method)."""
    settings = load_config_file(args.config) if getattr(args, "config", None) else {}
    settings = dict(settings)
    policy = getattr(args, "policy", None)
    if policy:
        method, params = load_policy_file(policy)
        if getattr(args, "method", None) in (None, method):
            settings["method"], settings["params"] = method, params
    new_method = getattr(args, "method", None)
    if new_method is not None and new_method != settings.get("method", "none"):
        settings.pop("params", None)              # the file's params belong to the file's method
    for name in ("model", "method", "data", "data_root", "split", "limit", "seed", "out", "batch_size",
                 "warmup", "max_new_tokens", "fatal_errors", "device", "dtype"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    for flag, key in (("model_arg", "model_args"), ("param", "params")):
        pairs = getattr(args, flag, None)
        if pairs:
            settings[key] = {**(settings.get(key) or {}), **dict(pairs)}
    return EvalConfig.from_dict(settings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mambaprune.eval.runner",
                                     description="Evaluate a Mamba MLLM with a pruning method on a dataset")
    add_eval_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    summary = run_eval(config_from_args(args), progress=not args.no_progress)
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        acc = ", ".join(f"{g} {v:.1f}" if v is not None else f"{g} -" for g, v in summary["accuracy"].items())
        print(f"{summary['label']}: {summary['n_samples']} samples ({summary['n_errors']} errors); accuracy (%) "
              f"{acc}; average {summary['average']}; FLOPs ratio {summary['flops_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
