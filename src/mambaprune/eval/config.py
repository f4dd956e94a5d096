"""The configuration of one evaluation run: :class:`EvalConfig` and its checks.

:func:`validate` checks a whole configuration without loading the model (the method, its parameters, the dataset
and split, the integer settings, the dtype and device, the model's name and, when the model's loader can describe
the model without loading it, the method's layers against the model's depth) and returns the pruner it describes.
:func:`resolve_loader` turns a model name into its loader, :data:`DTYPES` names the precisions a run accepts and
:func:`method_label` is the short name of a method with its parameters used in summaries and tables.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace
from typing import Callable

import torch

__all__ = ["DTYPES", "EvalConfig", "check_device", "method_label", "resolve_loader", "validate"]

#: The precisions a run accepts (``EvalConfig.dtype``), by name.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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
        batch_size: samples answered together (see :mod:`mambaprune.eval.loop` for the timings then).
        warmup: untimed warm-up repetitions of the first pending sample.
        max_new_tokens: decoding budget; None: the model spec's default for the dataset
            (``spec.max_new_tokens_for(<dataset name before any ':'>)``).
        fatal_errors: raise on a sample that cannot be prepared instead of recording an error.
        device, dtype: where and in which precision to run (None: cuda if available else cpu; the loader's dtype).
        images_root: where the images are when not where the dataset's release puts them (None: there).
        protocol: the evaluation protocol (:mod:`mambaprune.eval.protocols`: ``official``, ``cobra``,
            ``robomamba``); None: the model's own (its spec's ``protocol``, else ``official``).
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
    protocol: str | None = None
    images_root: str | None = None

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


def check_device(name) -> None:
    """Refuse (ValueError, one line) a device that torch cannot name, or one this machine does not have: ``cuda``
    without a CUDA device (or ``cuda:N`` beyond the ones there are), ``mps`` without Apple's MPS backend. None (the
    default device) passes."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch reports no CUDA device (torch.cuda.is_available() is False); "
                             "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: torch reports {count} CUDA device{'s' if count != 1 else ''} "
                             f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"--device {name}: torch reports no MPS device (torch.backends.mps.is_available() is "
                             "False); use --device cpu")


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
    ``warmup`` < 0, ``max_new_tokens`` < 1, an unknown dtype, a device torch cannot name or this machine does not
    have (:func:`check_device`), an unknown model. When the model's loader
    has a ``describe`` attribute (called with ``model_args``, returning at least ``{"n_layer": ...}`` without
    loading weights) the method's layers are resolved against that depth here (e.g. DTP's late layer before its
    early layer, a layer outside the model); otherwise :func:`~mambaprune.eval.runner.run_eval` checks them right
    after loading.
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
    if config.dtype is not None and config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; known: {', '.join(DTYPES)}")
    check_device(config.device)
    if config.protocol is not None:
        from .protocols import get_protocol

        get_protocol(config.protocol).task_for(config.data)
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

