"""The evaluation's command line: its flags (:func:`add_eval_arguments`), a config file of :class:`EvalConfig`
fields (:func:`load_config_file`, JSON or YAML), a policy file planned by ``mambaprune plan``
(:func:`load_policy_file`, :mod:`mambaprune.planner`), and the :class:`EvalConfig` they make together
(:func:`config_from_args`).

``python -m mambaprune.eval.cli --config cfg.json`` (or flags; ``--policy policy.json`` runs a planned policy)
runs :func:`main`; ``mambaprune eval`` (:mod:`mambaprune.cli`) takes the same flags. :func:`parse_value` and
:func:`key_value` read the ``KEY=VALUE`` flags of every command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .config import DTYPES, EvalConfig
from .runner import run_eval

__all__ = ["add_eval_arguments", "config_from_args", "key_value", "load_config_file", "load_policy_file", "main",
           "parse_value"]


def parse_value(text: str):
    """A command-line value: ``true``/``false`` -> bool, ``none``/``null`` -> None, then int, float, else the
    string itself."""
    if not isinstance(text, str):
        return text
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        if cast is float and not math.isfinite(value):
            return text
        return value
    return text


def key_value(text: str) -> tuple[str, object]:
    """An argparse ``type``: ``key=value`` -> ``(key, parse_value(value))``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), parse_value(value)


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The evaluation flags; every one defaults to None so that :func:`config_from_args` can tell a flag given
    on the command line (it overrides ``--config``) from one left out."""
    a = parser.add_argument
    a("--config", default=None, metavar="FILE", help="a YAML or JSON file of settings (flags override it)")
    a("--model", default=None, help="registered model name or module.path:function")
    a("--model-arg", action="append", type=key_value, default=None, metavar="KEY=VALUE",
      help="a keyword argument of the model's loader (repeatable)")
    a("--method", default=None, help="pruning method (default none)")
    a("--param", action="append", type=key_value, default=None, metavar="KEY=VALUE",
      help="a parameter of the method (repeatable), e.g. --param keep_ratio=0.5")
    a("--policy", default=None, metavar="FILE",
      help="a policy JSON (`mambaprune plan --out`): its method and params; --param may add parameters the "
           "policy does not set, and a --method or --param that contradicts it is an error")
    a("--data", default=None, help="dataset name, e.g. synthvqa, synthvqa:read, pope:adversarial")
    a("--data-root", default=None, help="the dataset's folder")
    a("--images-root", default=None, help="where the images are, when not where the dataset's release puts them (each image is looked up by its file name)")
    a("--split", default=None, help="dataset split (default: the dataset's)")
    a("--limit", type=int, default=None, help="only the first N samples")
    a("--seed", type=int, default=None, help="seed (default 0)")
    a("--out", default=None, help="output folder (resumable)")
    a("--batch-size", type=int, default=None, help="samples per batch (default 1)")
    a("--warmup", type=int, default=None, help="untimed warm-up repetitions (default 1)")
    a("--max-new-tokens", type=int, default=None, help="decoding budget (default: the model's for the task)")
    a("--protocol", default=None,
      help="evaluation protocol: official, cobra, robomamba (default: the model's own; see mambaprune.eval.protocols)")
    a("--fatal-errors", action="store_const", const=True, default=None,
      help="raise on a sample that cannot be prepared instead of recording an error")
    a("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    a("--dtype", default=None, help=f"one of {', '.join(DTYPES)} (default: the loader's)")
    return parser


def load_config_file(path) -> dict:
    """Settings from a JSON file (``.json``) or a YAML file (anything else)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    return data


def load_policy_file(path) -> tuple[str, dict]:
    """``(method, params)`` of a policy JSON (``mambaprune plan --out``: an object with ``method`` and ``params``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"policy file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not a JSON policy ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("method"), str) \
            or not isinstance(data.get("params", {}), dict):
        raise ValueError(f"{path} must hold a JSON object with a 'method' string and a 'params' object")
    return data["method"], dict(data.get("params") or {})


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An :class:`EvalConfig` from parsed :func:`add_eval_arguments` flags over the ``--config`` file.

    ``--policy FILE`` sets ``method`` and ``params`` from the policy (over the config file's); ``--param`` flags
    may add parameters the policy does not set (e.g. ``seed``). A ``--method`` other than the policy's, or a
    ``--param`` giving one of the policy's parameters another value, is a ValueError naming both: the policy would
    otherwise be silently changed or ignored. Only flags given on the command line count (their defaults are None)."""
    settings = load_config_file(args.config) if getattr(args, "config", None) else {}
    settings = dict(settings)
    policy = getattr(args, "policy", None)
    if policy:
        method, params = load_policy_file(policy)
        given = getattr(args, "method", None)
        if given is not None and given != method:
            raise ValueError(f"--method {given} contradicts --policy {policy}, whose method is {method!r}: give one "
                             "of them")
        clashes = [f"{k}={v!r} (the policy has {params[k]!r})" for k, v in (getattr(args, "param", None) or [])
                   if k in params and params[k] != v]
        if clashes:
            raise ValueError(f"--param {', '.join(clashes)} contradicts --policy {policy}: leave the policy's "
                             "parameters as planned, or give --method and --param without --policy")
        settings["method"], settings["params"] = method, params
    new_method = getattr(args, "method", None)
    if new_method is not None and new_method != settings.get("method", "none"):
        settings.pop("params", None)              # the file's params belong to the file's method
    for name in ("model", "method", "data", "data_root", "split", "limit", "seed", "out", "batch_size",
                 "warmup", "max_new_tokens", "fatal_errors", "device", "dtype", "protocol", "images_root"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    for flag, key in (("model_arg", "model_args"), ("param", "params")):
        pairs = getattr(args, flag, None)
        if pairs:
            settings[key] = {**(settings.get(key) or {}), **dict(pairs)}
    return EvalConfig.from_dict(settings)


def main(argv=None) -> int:
    """``python -m mambaprune.eval.cli``: run one evaluation from flags and print its accuracy line."""
    parser = argparse.ArgumentParser(prog="python -m mambaprune.eval.cli",
                                     description="Evaluate a Mamba MLLM with a pruning method on a dataset")
    add_eval_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    summary = run_eval(config_from_args(args), progress=not args.no_progress)
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        acc = ", ".join(f"{g} {v:.1f}" if v is not None else f"{g} -" for g, v in summary["accuracy"].items())
        print(f"{summary['label']}: {summary['n_samples']} samples ({summary['n_errors']} errors); accuracy (%) "
              f"{acc}; average {summary['average']}; FLOPs ratio {summary['flops_ratio']}")
    return 0


if __name__ == "__main__":                      # python -m mambaprune.eval.cli (also under torchrun)
    sys.exit(main())
