"""The vision-to-language projector of Cobra and RoboMamba.

Both released models use the same three-layer GELU MLP: Cobra's ``FusedMLPProjector`` ("fused-gelu-mlp",
2176 -> 8704 -> 2560 -> 2560) and RoboMamba's ``Projector`` (1024 -> 4096 -> 2560 -> 2560). In both the first
hidden width is four times the input width, and the layers sit in an ``nn.Sequential`` named ``projector``, so
their checkpoints hold ``projector.0.*``, ``projector.2.*`` and ``projector.4.*`` (the GELUs have no weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoints import CheckpointError, load_state_checked


class MLPProjector(nn.Sequential):
    """``Linear(in, hidden), GELU, Linear(hidden, out), GELU, Linear(out, out)``; weights ``0.*, 2.*, 4.*``.

    ``hidden_dim`` defaults to ``4 * in_dim`` (both released models). GELU is the exact (erf) one, as
    ``nn.GELU()`` in the released code.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        hidden_dim = 4 * in_dim if hidden_dim is None else hidden_dim
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MLPProjector: {name} must be a positive integer, got {value!r}")
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim), nn.GELU(),
                         nn.Linear(out_dim, out_dim))

    @property
    def in_dim(self) -> int:
        return self[0].in_features

    @property
    def hidden_dim(self) -> int:
        return self[0].out_features

    @property
    def out_dim(self) -> int:
        return self[4].out_features


def projector_from_state(state: dict[str, torch.Tensor], source: str) -> MLPProjector:
    """An :class:`MLPProjector` holding ``state`` (keys ``0.weight, 0.bias, 2.*, 4.*``), sizes read from the
    shapes; a missing, unexpected or mis-shaped key raises :class:`CheckpointError` naming it."""
    for key in ("0.weight", "2.weight"):
        if key not in state:
            raise CheckpointError(f"cannot load the projector from {source}: missing key {key!r} "
                                  f"(found {sorted(state)[:10]})")
        if state[key].dim() != 2:
            raise CheckpointError(f"cannot load the projector from {source}: {key} must be a matrix, "
                                  f"got shape {tuple(state[key].shape)}")
    hidden_dim, in_dim = state["0.weight"].shape
    out_dim = state["2.weight"].shape[0]
    projector = MLPProjector(in_dim, out_dim, hidden_dim)
    load_state_checked(projector, state, f"the projector from {source}")
    return projector
