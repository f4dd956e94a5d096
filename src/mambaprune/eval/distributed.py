"""Several processes: joining torchrun's process group, picking each rank's device and splitting the samples.

Launched by ``torchrun --nproc-per-node N -m mambaprune.cli eval ...`` (or ``-m mambaprune.eval.cli``;
``WORLD_SIZE`` > 1), each process joins a ``torch.distributed`` group (gloo; a group the caller already
initialised is used as it is, whatever its size; :func:`dist_setup`), takes the samples ``samples[rank::N]``
(:func:`shard`) and writes ``samples.rank{r}.jsonl`` and ``state.rank{r}.json`` (:func:`rank_suffix`) with the
same resumable logic (:mod:`mambaprune.eval.records`); after a barrier rank 0 merges the rank files into
``samples.jsonl`` in dataset order and writes ``summary.json`` (its ``total_s`` and ``peak_mem_mb`` are the maxima
over the ranks, which run side by side); after a second barrier every rank returns that summary (the other ranks
read it back from the file) (:func:`mambaprune.eval.runner.run_eval`). Apart from the timing fields and
``world_size`` the summary equals a single-process run's. On a GPU each rank uses ``cuda:LOCAL_RANK`` when the
device is given as ``cuda`` or not at all (:func:`pick_device`).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

__all__ = ["barrier", "dist_setup", "dist_teardown", "pick_device", "rank_suffix", "shard"]


def dist_setup() -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, created) from torchrun's environment; joins the process group."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():           # a group the caller set up
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0, False
    dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank, True


def dist_teardown(created: bool) -> None:
    """Leave the process group when :func:`dist_setup` created it."""
    if created:
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def shard(samples: Sequence, rank: int, world: int) -> list[tuple[int, object]]:
    """``[(dataset index, sample), ...]`` of this rank: every ``world``-th sample from the ``rank``-th."""
    return list(enumerate(samples))[rank::world]


def rank_suffix(rank: int, world: int) -> str:
    """What a rank's record and state file names carry: ``""`` in a single process, else ``".rank{rank}"``."""
    return "" if world == 1 else f".rank{rank}"


def pick_device(name: str | None, local_rank: int, world_size: int) -> torch.device:
    """The device of this rank: ``name`` (None: cuda if available, else cpu); a bare ``cuda`` with several
    processes becomes ``cuda:local_rank``."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", local_rank)
    return device
