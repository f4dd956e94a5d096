"""One registry of pruning methods, by name; the CLI and the config files read it."""
from __future__ import annotations

import inspect
from typing import Callable

from .base import Pruner

_METHODS: dict[str, type[Pruner]] = {}


def register(name: str) -> Callable[[type[Pruner]], type[Pruner]]:
    """Class decorator: make a :class:`Pruner` subclass buildable as ``build(name, **params)``."""
    def wrap(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"a pruning method named {name!r} is already registered ({_METHODS[name].__name__})")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return wrap


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Pruner]:
    if name not in _METHODS:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(available_methods())}")
    return _METHODS[name]


def method_params(name: str) -> dict[str, object]:
    """The parameters a method takes, with their defaults."""
    sig = inspect.signature(method_class(name).__init__)
    return {p.name: p.default for p in list(sig.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build(name: str, **params) -> Pruner:
    """The pruner object that ``MambaVLM.generate/answer`` and ``MambaLM.forward(hook=...)`` take.

    ``build("none")`` is the unpruned model. An unknown method or parameter is a ValueError that names it.
    """
    cls = method_class(name)
    known = method_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(unknown)}; "
                         f"its parameters: {', '.join(f'{k}={v!r}' for k, v in known.items())}")
    return cls(**params)
