"""The planner's command line: ``mambaprune plan`` and ``python -m mambaprune.planner``.

Command line glue: :func:`add_plan_arguments` and :func:`plan_command` (``mambaprune plan``); the policy JSON it
writes (``--out``) holds ``method``, ``params``, ``flops_ratio``, ``predicted_divergence`` (and the measured curves,
so other budgets can be planned without new runs: ``--curves``), and ``mambaprune eval --policy`` runs it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .curves import Curves
from .divergence import DEFAULT_EPS, DEFAULT_K
from .measure import _prepared, check_additivity, measure_curves, plan
from .search import DEFAULT_ALPHA, INTERACTIONS

__all__ = ["add_plan_arguments", "main", "parse_number", "plan_command"]


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``mambaprune plan``."""
    from ..eval.cli import key_value

    a = parser.add_argument
    a("--model", default="testbed", help="registered model name or module.path:function (default: testbed)")
    a("--model-arg", action="append", type=key_value, default=None, metavar="KEY=VALUE",
      help="a keyword argument of the model's loader (repeatable)")
    a("--device", default=None, help="e.g. cuda, cpu (default: where the loader puts it)")
    a("--dtype", default=None, help="e.g. bfloat16, float16, float32")
    a("--budget", type=float, required=True, help="FLOPs ratio to stay within, in (0, 1] (1: no pruning)")
    a("--data", default="synthvqa", help="calibration dataset name (default synthvqa)")
    a("--data-root", default=None, help="the dataset's folder (not needed with --curves or --budget 1)")
    a("--images-root", default=None, help="where the images are, when not where the dataset's release puts them (each image is looked up by its file name)")
    a("--split", default=None, help="calibration split (default: the dataset's; pick one you do not evaluate on)")
    a("--samples", type=int, default=100, help="calibration samples, evenly spread over the split (default 100)")
    a("--out", default=None, metavar="FILE", help="write the policy JSON here (for `mambaprune eval --policy`)")
    a("--curves", default=None, metavar="FILE",
      help="reuse the divergences measured before (a policy JSON written by --out): no new runs")
    a("--check", type=int, default=0, metavar="N",
      help="also check the additive approximation on N random policies (Spearman's rho, DOP Appendix E.1)")
    a("--points", type=int, default=6, help="sampled points per divergence curve (default 6, as DOP)")
    a("--ref-early", type=parse_number, default=0.25,
      help="reference early layer of D_keep (int layer, or float fraction of the depth; default 0.25)")
    a("--ref-keep", type=parse_number, default=0.5,
      help="reference keep ratio (float) or token count (int) of D_early (default 0.5)")
    a("--interaction", choices=INTERACTIONS, default="additive",
      help="how early layer and keep ratio combine (default additive, DOP's Eq. 7)")
    a("--alpha", type=float, default=DEFAULT_ALPHA,
      help=f"Appendix C.4: at least alpha x n_e visual tokens after the early layer (default {DEFAULT_ALPHA})")
    a("--min-visual-tokens", type=int, default=None, help="a fixed n_min instead of the alpha rule")
    a("--k", type=int, default=DEFAULT_K, help=f"top-k of the divergence (default {DEFAULT_K})")
    a("--eps", type=float, default=DEFAULT_EPS, help=f"epsilon of the divergence (default {DEFAULT_EPS:g})")
    a("--seed", type=int, default=0, help="seed of the --check policies and of the model's construction")
    a("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_number(text: str):
    """``"3"`` -> 3 (int), ``"0.25"`` -> 0.25 (float)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _calibration_samples(args) -> list:
    from ..data.readers import load_dataset
    from ..workflows import spread

    if not args.data_root:
        raise ValueError("--data-root is needed to measure the divergences")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    samples = load_dataset(args.data, args.data_root, args.split, images_root=args.images_root)
    if not samples:
        raise ValueError(f"no samples in {args.data} ({args.split or 'default split'}) under {args.data_root}")
    return spread(samples, args.samples)


def plan_command(args: argparse.Namespace) -> int:
    """``mambaprune plan``: measure (or reuse) the divergences, plan, print, write ``--out``, optionally check."""
    from ..eval.runner import load_named_model

    try:
        model = load_named_model(args.model, dict(args.model_arg or []), args.device, args.dtype, args.seed)
        curves = None
        if args.curves:
            raw = json.loads(Path(args.curves).read_text(encoding="utf-8"))
            raw = raw.get("curves", raw) if isinstance(raw, dict) else None
            if not raw:
                raise ValueError(f"{args.curves} holds no measured curves")
            curves = Curves.from_dict(raw)
        need_samples = (curves is None and args.budget < 1.0) or args.check
        samples = _calibration_samples(args) if need_samples else []
        prepared = _prepared(model, samples)
        progress = not args.no_progress
        policy = plan(model, prepared, args.budget, curves=curves, interaction=args.interaction,
                      min_visual_tokens=args.min_visual_tokens, alpha=args.alpha, points=args.points,
                      ref_early=args.ref_early, ref_keep=args.ref_keep, k=args.k, eps=args.eps, progress=progress)
        print(f"planned policy for a FLOPs budget of {args.budget:g}:")
        print(f"  {policy.describe()}")
        if policy.curves is not None:
            c = policy.curves
            print(f"  from {c.runs} runs over {c.n_samples} samples; {policy.search.get('n_candidates')} policies "
                  f"within budget (at least {policy.search.get('min_visual_tokens')} visual tokens kept)")
            heads = {"early": f"D(e, n={c.ref_keep}, L={c.n_layer}) by early layer e",
                     "keep": f"D(e={c.ref_early}, n, L={c.n_layer}) by kept count n",
                     "late": f"D(no cut, N={c.n_visual}, l) by late layer l"}
            for name, head in heads.items():
                pts = ", ".join(f"{x}: {v:.4g}" for x, v in sorted(getattr(c, name).items()))
                print(f"  {head}: {pts}")
        if args.check:
            curves = policy.curves or measure_curves(model, prepared, points=args.points, ref_early=args.ref_early,
                                                     ref_keep=args.ref_keep, k=args.k, eps=args.eps,
                                                     progress=progress)
            check = check_additivity(model, prepared, args.check, curves=curves, seed=args.seed, progress=progress)
            policy.search["additivity_check"] = check
            rho = ", ".join(f"{name} {v:.3f}" for name, v in check["spearman"].items())
            print(f"additivity check (DOP Appendix E.1), {check['n_policies']} policies: Spearman's rho {rho}")
        if args.out:
            path = policy.to_json(args.out)
            print(f"written {path}; run it with: mambaprune eval --policy {path} ...")
    except ValueError as e:
        raise SystemExit(f"mambaprune plan: {e}") from None
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mambaprune.planner",
                                     description="Plan a pruning policy for a FLOPs budget (DOP's search over DTP)")
    add_plan_arguments(parser)
    return plan_command(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
