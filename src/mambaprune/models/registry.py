"""Multimodal models by name: the CLI and config files build models through :func:`load_model`.

A builder registers itself with ``@register_model("name")`` on its loading function; the built-in builders
(the modules in ``_BUILTIN_MODULES``) are imported the first time the registry is asked, so
``load_model("cobra", ...)`` works without importing :mod:`mambaprune.models.cobra` first.
"""
from __future__ import annotations

import importlib
from typing import Callable

#: modules of this package whose import registers the built-in models
_BUILTIN_MODULES = ("cobra", "mlmamba", "robomamba", "testbed")

_LOADERS: dict[str, Callable] = {}


def register_model(name: str):
    """Decorator: register ``fn(*args, **kwargs) -> MambaVLM`` under ``name`` (a second, different function
    under the same name is an error)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")

    def register(fn: Callable) -> Callable:
        old = _LOADERS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"model {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        _LOADERS[name] = fn
        return fn

    return register


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{module}")


def available_models() -> list[str]:
    """Registered model names, sorted."""
    _import_builtins()
    return sorted(_LOADERS)


def load_model(name: str, *args, **kwargs):
    """Build the model registered as ``name`` with the loader's arguments, e.g.
    ``load_model("cobra", run_dir, dino_dir=..., siglip_dir=..., tokenizer_dir=...)``."""
    _import_builtins()
    if name not in _LOADERS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(_LOADERS)}")
    return _LOADERS[name](*args, **kwargs)
