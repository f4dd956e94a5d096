"""Pruning: the token sequence every method sees, the pruner base class, and the methods' registry."""
from .base import NoPruning, Pruner
from .sequence import SIGNAL_NAMES, TokenSequence

__all__ = ["TokenSequence", "SIGNAL_NAMES", "Pruner", "NoPruning"]
