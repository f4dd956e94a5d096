"""The loaders' error, :class:`CheckpointError`: here so that :mod:`~mambaprune.models.checkpoints` (which defined it
and still exports it) and :mod:`~mambaprune.models.hub` (whose :class:`~mambaprune.models.hub.HubError` is one, and
which :mod:`~mambaprune.models.checkpoints` uses) share it without importing each other."""
from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as asked; the message says what is wrong."""
