"""The record store of an evaluation run: the files of its output folder ``out``, written so that a run can be
killed at any point and resumed.

* ``run.json``: the configuration, the library versions and the number of processes, written at the start
  (:func:`check_run_json`). A folder whose ``run.json`` holds a different configuration (``out`` and
  ``fatal_errors`` aside) or another number of processes is refused: runs are never mixed.
* ``samples.jsonl``: one JSON record per sample (:data:`mambaprune.eval.loop.RECORD_FIELDS`), appended, flushed and
  fsync'ed one by one. A run is **resumable**: started again with the same configuration it truncates a
  half-written last line (:func:`read_records`), skips the samples already recorded and appends the others, so a
  run killed at any point ends with the records and summary of an uninterrupted run (apart from the timing
  fields, :data:`mambaprune.eval.loop.TIMING_FIELDS`), each sample once. A record with ``error`` set (a sample
  that could not be prepared, :mod:`mambaprune.eval.loop`) is kept on a restart (delete its line to retry it).
* ``state.json``: the running total of the sample loop's wall time over (re)starts and the peak memory
  (:func:`read_state`).
* ``summary.json``: written atomically (:func:`write_atomic`) at the end from all records in dataset order
  (:func:`mambaprune.eval.summary.summarize_records`).

With several processes each rank has its own ``samples.rank{r}.jsonl`` and ``state.rank{r}.json``
(:mod:`mambaprune.eval.distributed`).
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from .config import EvalConfig

__all__ = ["check_run_json", "jsonable", "read_records", "read_state", "write_atomic"]

#: Configuration fields a restart may change without being refused.
_RESTART_FREE = ("out", "fatal_errors")


def jsonable(d):
    """``d`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(d))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsync'ed temporary file and a rename: a reader sees the old file or
    the whole new one."""
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
    return {k: v for k, v in jsonable(config_dict).items() if k not in _RESTART_FREE}


def check_run_json(out: Path, config: EvalConfig, world_size: int) -> None:
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
    write_atomic(path, json.dumps({"config": jsonable(config.to_dict()), "versions": _versions(),
                                   "world_size": world_size}, indent=2) + "\n")


def record_protocol(out: Path, protocol: str, scorer: str) -> None:
    """Add the evaluation protocol and the task's scorer, resolved once the model is known, to ``run.json``; a
    folder whose records were answered under another protocol is refused (one line naming both)."""
    path = out / "run.json"
    run = json.loads(path.read_text(encoding="utf-8"))
    if run.get("protocol") not in (None, protocol):
        raise ValueError(f"{out} holds a run under protocol {run['protocol']!r}, this one is {protocol!r}; use "
                         "another output folder or the same protocol")
    if run.get("protocol") != protocol or run.get("scorer") != scorer:
        run.update(protocol=protocol, scorer=scorer)
        write_atomic(path, json.dumps(run, indent=2) + "\n")


def read_state(path: Path) -> dict:
    """The contents of a ``state*.json`` file; ``{}`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}

