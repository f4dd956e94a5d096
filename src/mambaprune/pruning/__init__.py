"""Pruning: the token sequence every method sees, the pruner base class, the methods and their registry.

``build(name, **params)`` returns the pruner object that ``MambaLM.forward/generate(hook=...)`` and the
multimodal model's ``generate/answer(pruner=...)`` take. Methods: ``none``, ``dtp``, ``fastv``, ``vtw``, ``dart``,
``random_pre``, ``random_intra``, ``divprune``, ``mtr`` (see each module; the layer convention is in ``base``).
"""
from . import dart, divprune, dtp, fastv, mtr, random_baselines, vtw  # noqa: F401  (register the methods)
from .base import NoPruning, Pruner
from .registry import available_methods, build, method_params, register
from .sequence import SIGNAL_NAMES, TokenSequence

register("none")(NoPruning)

__all__ = ["TokenSequence", "SIGNAL_NAMES", "Pruner", "NoPruning", "build", "register", "available_methods",
           "method_params"]
