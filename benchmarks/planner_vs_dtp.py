"""The budget planner (DOP's search, :mod:`mambaprune.planner`) against DTP's Std rule and the baselines, at matched
FLOPs (about 70% and 50% by default), in the harness's Table 1 layout.

    python benchmarks/planner_vs_dtp.py --data-root synth --out planner_out [--samples 100] [--per-family 30]

1. a SynthVQA folder at ``--data-root`` (written with ``--per-family`` questions per family if it holds none);
2. the divergence curves of the planner (Eq. 8-10 of DOP) on ``--samples`` validation questions, one set of runs
   for every budget; DTP's calibration (Std curve, Eq. 7-9 of DTP) on ``--calib-samples`` of them;
3. per budget: the planned policy (Eq. 7 of DOP, ``mambaprune plan``), DTP with its calibrated layers at the keep
   ratio matching the budget (:func:`mambaprune.flops.match_flops`) and the baselines FastV, VTW, DART, Random-Pre
   matched the same way (as ``mambaprune demo`` does), each evaluated on the test split with the harness
   (:func:`mambaprune.eval.runner.run_eval`);
4. prints the planned and DTP policies with their predicted (additive) and measured (joint) divergences on the
   calibration questions, and the accuracy table (:func:`mambaprune.eval.report.accuracy_table`), saved under
   ``OUT/tables/``.

The shipped testbed is the default model; ``--model`` takes any name the runner accepts, e.g. the tiny random
fixture ``runner_fixture_model:load_tiny`` (with ``tests`` on PYTHONPATH; its 52 text tokens against 16 visual
ones put 70% out of reach, try ``--budgets 0.9 0.85``). A budget no policy meets is reported and skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from mambaprune.eval.cli import key_value
    from mambaprune.planner import DEFAULT_ALPHA, INTERACTIONS

    p = argparse.ArgumentParser(prog="planner_vs_dtp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="SynthVQA folder (written there if it holds none)")
    p.add_argument("--out", default="planner_out", help="output folder (runs/, policies/, tables/; resumable)")
    p.add_argument("--samples", type=int, default=100, help="planner calibration questions (val; default 100)")
    p.add_argument("--per-family", type=int, default=30, help="questions per family when writing SynthVQA (default 30)")
    p.add_argument("--calib-samples", type=int, default=16, help="DTP Std-rule calibration questions (default 16)")
    p.add_argument("--model", default="testbed", help="model name or module.path:function (default testbed)")
    p.add_argument("--model-arg", action="append", type=key_value, default=None, metavar="KEY=VALUE")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5], help="FLOPs levels (default 0.7 0.5)")
    p.add_argument("--points", type=int, default=6, help="sampled points per divergence curve (default 6)")
    p.add_argument("--interaction", choices=INTERACTIONS, default="additive")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="Appendix C.4's alpha")
    p.add_argument("--check", type=int, default=0, metavar="N", help="also the Spearman check on N policies")
    p.add_argument("--limit", type=int, default=None, help="only the first N test questions")
    p.add_argument("--no-baselines", action="store_true", help="only the unpruned model, DTP and the planner")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    from mambaprune import planner as P
    from mambaprune.data.readers import load_dataset
    from mambaprune.data.synthvqa import SynthConfig, generate_synthvqa
    from mambaprune.demo import plan_runs
    from mambaprune.eval.config import EvalConfig, method_label, resolve_loader
    from mambaprune.eval.report import accuracy_table, load_runs
    from mambaprune.eval.runner import run_eval
    from mambaprune.planner.measure import _prepared
    from mambaprune.pruning.base import num_to_keep
    from mambaprune.workflows import calibrate, spread

    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    t0 = time.perf_counter()
    out, root = Path(args.out), Path(args.data_root)
    if not (root / "manifest.json").is_file():
        print(f"writing SynthVQA ({args.per_family} per family) to {root}")
        generate_synthvqa(root, SynthConfig(per_family=args.per_family, train_multiplier=1))
    model_args = dict(args.model_arg or [])
    model = resolve_loader(args.model)(**model_args).eval()
    L, N = model.lm.config.n_layer, model.vision.num_tokens
    val = load_dataset("synthvqa", root, "val")
    test = load_dataset("synthvqa", root, "test")
    calib = _prepared(model, spread(val, args.samples))

    curves_path = out / "curves.json"
    if curves_path.is_file():
        curves = P.Curves.from_dict(json.loads(curves_path.read_text()))
        print(f"divergence curves read from {curves_path}")
    else:
        curves = P.measure_curves(model, calib, points=args.points, progress=progress)
        curves_path.parent.mkdir(parents=True, exist_ok=True)
        curves_path.write_text(json.dumps(curves.to_dict(), indent=1) + "\n")
    print(f"planner: {curves.runs} runs over {curves.n_samples} questions ({time.perf_counter() - t0:.0f} s so far)")
    cal = calibrate(model, spread(val, args.calib_samples), out / "calibration", progress=progress)
    early, late = cal["early_layer"], cal["late_layer"]
    print(f"DTP Std rule: early layer {early}, late layer {late} (of {L})")

    n_text = round(sum(len(model.prepare(s.image, s.question).text_ids[0]) for s in test[:20]) / min(20, len(test)))
    runs = plan_runs(model, early, late, n_text, budgets=tuple(args.budgets))
    if args.no_baselines:
        runs = [r for r in runs if r[1] in ("none", "dtp")]
    labels = {}
    lines = []
    for budget in args.budgets:
        tag = f"{round(100 * budget)}"
        try:
            policy = P.plan(model, [], budget, curves=curves, interaction=args.interaction, alpha=args.alpha,
                            n_text=n_text)                     # FLOPs at the test prompts' length, as DTP's match
        except ValueError as e:
            print(f"budget {budget:g}: {e}; skipped")
            continue
        policy.to_json(out / "policies" / f"planner-{tag}.json")
        runs.append((f"planner-{tag}", policy.method, policy.params))
        labels[f"planner-{tag}"] = f"Planner {method_label(policy.method, policy.params)}"
        dtp = next((params for name, m, params in runs if name == f"dtp-{tag}"), None)
        rows = [("planner", policy.method, policy.params, policy.policy)]
        if dtp is not None:
            labels[f"dtp-{tag}"] = f"DTP Std rule {method_label('dtp', dtp)}"
            rows.append(("DTP Std", "dtp", dtp, {"early_layer": early, "n_keep": num_to_keep(N, dtp["keep_ratio"]),
                                                 "late_layer": late}))
        for who, method, params, pol in rows:
            e = -1 if pol["early_layer"] is None else pol["early_layer"]
            predicted = P.predict_divergence(curves, e, pol["n_keep"], pol["late_layer"], args.interaction) \
                if method != "none" else 0.0
            measured = P.measure_divergence(model, calib, method, params, curves.k, curves.eps)
            ratio = float(P.flops_ratios(model.lm.config, N, n_text, e, pol["n_keep"], pol["late_layer"]))
            lines.append(f"  {budget:g}  {who:8s} {method_label(method, params)}: FLOPs {100 * ratio:.1f}%, "
                         f"predicted D {predicted:.4g}, measured D {measured:.4g}")
    print("policies (FLOPs at the test prompts' mean length; D = DOP's divergence on the calibration questions):")
    print("\n".join(lines))

    if args.check:
        check = P.check_additivity(model, calib, args.check, curves=curves, progress=progress)
        (out / "additivity_check.json").write_text(json.dumps(check, indent=1) + "\n")
        print("additivity check, Spearman's rho: " + ", ".join(f"{k} {v:.3f}" for k, v in check["spearman"].items()))

    for name, method, params in runs:
        cfg = EvalConfig(model=args.model, model_args=model_args, method=method, params=params, data="synthvqa",
                         data_root=str(root), split="test", limit=args.limit, out=str(out / "runs" / name))
        summary = run_eval(cfg, progress=progress, model=model)
        print(f"  {name:16s} FLOPs {100 * summary['flops_ratio']:5.1f}%  avg {summary['average']:5.1f}")

    summaries = load_runs([out / "runs" / name for name, _, _ in runs])
    for (name, _, _), summary in zip(runs, summaries):
        if name in labels:
            summary["label"] = labels[name]
    table = accuracy_table(summaries, levels=tuple(args.budgets), flops_unit=1e9,
                           title=f"Planner vs DTP's Std rule and the baselines: {args.model} on SynthVQA test")
    paths = table.save(out / "tables" / "planner_vs_dtp")
    print(table.to_markdown())
    print(f"written {', '.join(str(p) for p in paths)}; done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
