"""Pruning: the token sequence every method sees (methods themselves come with the methods issue)."""
from .sequence import SIGNAL_NAMES, TokenSequence

__all__ = ["TokenSequence", "SIGNAL_NAMES"]
