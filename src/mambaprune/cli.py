"""The ``mambaprune`` command.

Sub-commands: ``demo`` (the paper's experiments on the shipped testbed), ``eval`` (one model x method x dataset run,
resumable, ``torchrun``-shardable), ``table`` (runs -> the paper's Tables 1 and 3 and keep-ratio sweeps),
``calibrate`` (DTP's Std curve and layers), ``analyze`` (the figures for one sample), ``flops`` (the LM cost of
pruning settings, the paper's presets included), ``plan`` (a budgeted policy search), ``synth`` (write SynthVQA),
``train-testbed``, ``bench``.

Errors a user can fix (a bad setting, a missing file or folder, weights not found: :data:`EXPECTED_ERRORS`) are one
line on stderr, ``mambaprune <command>: error: <message>``, with exit status 2 (as argparse's usage errors); set
``MAMBAPRUNE_TRACEBACK=1`` to see the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

#: The errors :func:`main` prints as one line (exit status 2) instead of a traceback: ValueError (a bad setting or
#: value; :class:`~mambaprune.models.checkpoints.CheckpointError` and :class:`~mambaprune.models.hub.HubError` are
#: ValueErrors) and FileNotFoundError (a data folder, annotation file, image or weights file that is not there).
EXPECTED_ERRORS = (ValueError, FileNotFoundError)


def _run_benchmark(run, settings, format_result, json_path) -> int:
    """Run a benchmark with a one-line status on stderr, print its table, optionally save it as JSON."""
    from .bench import save_json
    from .progress import progress_bar

    bar = progress_bar(total=None, bar_format="{desc}", leave=False, file=sys.stderr)
    res = run(settings, progress=lambda msg: bar.set_description_str(f"bench: {msg}"))
    bar.close()
    print(format_result(res))
    if json_path:
        save_json(res, json_path)
        print(f"\nwritten {json_path}")
    return 0


def _bench(args) -> int:
    if args.pruning:
        return _bench_pruning(args)

    from .bench import BenchSettings, format_table, run_engine_benchmark

    s = BenchSettings(threads=args.threads, repeats=args.repeats, with_transformers=not args.no_transformers,
                      mamba2=not args.no_mamba2)
    if args.quick:
        s.d_model, s.n_layer, s.seq_len, s.scan_d_inner, s.scan_len = 128, 4, 96, 256, 96
        s.mamba2_headdim, s.mamba2_d_state = 32, 16
    if args.seq_len:
        s.seq_len = s.scan_len = args.seq_len
    return _run_benchmark(run_engine_benchmark, s, format_table, args.json)


def _bench_pruning(args) -> int:
    from .bench_pruning import PruningBenchSettings, format_pruning_table, run_pruning_benchmark

    s = PruningBenchSettings(threads=args.threads, repeats=args.repeats)
    if args.quick:
        s.d_model, s.n_layer, s.vocab_size, s.n_visual, s.n_text = 64, 8, 512, 64, 8
    return _run_benchmark(run_pruning_benchmark, s, format_pruning_table, args.json)


def _synth(args) -> int:
    from .data.synthvqa import SynthConfig, generate_synthvqa
    from .progress import progress_bar

    cfg = SynthConfig(seed=args.seed, per_family=args.per_family, train_multiplier=args.train_multiplier,
                      image_size=args.image_size, code_length=args.code_length)
    with progress_bar(total=sum(cfg.split_sizes().values()), desc="synth", unit="img", file=sys.stderr) as bar:
        manifest = generate_synthvqa(args.out, cfg, progress=bar.update)
    sizes = ", ".join(f"{split} {c['images']}" for split, c in manifest["splits"].items())
    print(f"SynthVQA written to {args.out}: images (= questions per family) {sizes}; "
          f"{len(manifest['files'])} files listed in manifest.json")
    return 0


def _train_testbed(args) -> int:
    from .train_testbed import settings_from_args, train

    info = train(settings_from_args(args), log=lambda m: print(m, flush=True))
    if info.get("stopped"):
        return 0
    acc = ", ".join(f"{k} {100 * v:.1f}" for k, v in info["test_accuracy"].items())
    print(f"testbed written to {args.out} after {info['steps_done']} steps; test accuracy (%): {acc}")
    return 0


def _load(args):
    from .eval.runner import load_named_model

    return load_named_model(args.model, dict(args.model_arg or []), args.device, args.dtype)


def _flops(args) -> int:
    from .flops import match_flops
    from .workflows import PAPER_SETTINGS, PRESETS, ModelShape, flops_rows, format_flops_rows

    if args.preset:
        shape = PRESETS[args.preset]
        unit, unit_name = 1e12, "T"
    else:
        model = _load(args)
        prompt = model.prepare(args.image, args.question) if args.image else None
        n_text = len(prompt.text_ids[0]) if prompt is not None else args.n_text
        shape = ModelShape(model.lm.config, model.vision.num_tokens, n_text)
        unit, unit_name = 1e9, "G"
    params = dict(args.param or [])
    if args.method is None:
        settings = PAPER_SETTINGS if args.preset else [("Baseline", "none", {})]
    else:
        if args.target is not None:
            value, _ = match_flops(args.method, args.target, shape.config, shape.n_visual, shape.n_text,
                                   param=args.match, **params)
            params[args.match or ("keep_ratio" if isinstance(value, float) else "layer")] = value
        label = args.method + "(" + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in params.items()) + ")"
        settings = [("Baseline", "none", {}), (label, args.method, params)]
    print(f"{shape.n_visual} visual + {shape.n_text} text tokens, {shape.config.n_layer} layers, "
          f"d_model {shape.config.d_model}; FLOPs = LM multiply-adds (the DTP paper's convention)")
    print(format_flops_rows(flops_rows(shape, settings), unit, unit_name))
    return 0


def _calibrate(args) -> int:
    from .data.readers import load_dataset
    from .workflows import calibrate, spread

    samples = load_dataset(args.data, args.data_root, args.split, images_root=args.images_root)
    if not samples:
        raise ValueError(f"no samples in {args.data} ({args.split}) under {args.data_root}")
    result = calibrate(_load(args), spread(samples, args.samples), args.out, signal=args.signal)
    std = ", ".join(f"{v:.4f}" for v in result["std"])
    print(f"Std per layer ({result['signal']}, {result['n_samples']} samples): {std}")
    print(f"early_layer = {result['early_layer']}, late_layer = {result['late_layer']}  (Eq. 8-9)")
    print(f"use: --method dtp --param early_layer={result['early_layer']} --param late_layer={result['late_layer']}")
    if args.out:
        print(f"written {args.out}/calibration.json and {args.out}/std_curve.png")
    return 0


def _analyze(args) -> int:
    from .data.readers import load_dataset
    from .workflows import analysis_figures

    samples = load_dataset(args.data, args.data_root, args.split, images_root=args.images_root)
    if not 0 <= args.index < len(samples):
        raise ValueError(f"--index {args.index} is outside the {len(samples)} samples")
    paths = analysis_figures(_load(args), samples[args.index], args.out, method=args.method,
                             params=dict(args.param or []))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _eval(args) -> int:
    from .eval.cli import config_from_args
    from .eval.runner import run_eval

    config = config_from_args(args)
    summary = run_eval(config, progress=not args.no_progress)
    if summary is not None:
        acc = ", ".join(f"{g} {v:.1f}" if v is not None else f"{g} -" for g, v in summary["accuracy"].items())
        print(f"{summary['label']}: {summary['n_samples']} samples ({summary['n_errors']} errors)\n"
              f"accuracy (%): {acc}; average {summary['average']:.2f}\n"
              f"FLOPs {summary['flops']:.4g} (ratio {summary['flops_ratio']:.3f}); prefill "
              f"{summary['prefill_ms_mean']:.2f} ms, decode {summary['decode_ms_per_token_mean']:.2f} ms/token, "
              f"method {summary['method_ms_mean']:.3f} ms; total {summary['total_s']:.1f} s\n"
              f"written {config.out}/summary.json and samples.jsonl")
    return 0


def _table(args) -> int:
    from .eval import report

    runs = report.load_runs(args.runs)
    if args.kind != "sweep" and not args.no_merge:
        runs = report.merge_runs(runs)
    if args.kind == "accuracy":
        table = report.accuracy_table(runs, flops_unit=args.flops_unit, levels=args.levels, title=args.title)
    elif args.kind == "efficiency":
        table = report.efficiency_table(runs, flops_unit=args.flops_unit, title=args.title)
    else:
        table = report.sweep_table(runs, param=args.param, title=args.title)
    print(table.to_markdown())
    if args.out:
        paths = table.save(args.out)
        print("\nwritten " + ", ".join(str(p) for p in paths))
    if args.plot:
        if args.kind != "sweep":
            raise ValueError("--plot draws the keep-ratio curve; use it with --kind sweep")
        print(f"written {report.plot_sweep(runs, args.plot, param=args.param)}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, per_family=args.per_family, calib_samples=args.calib_samples, sweep=not args.no_sweep,
             model_name=args.model, model_args=dict(args.model_arg or []))
    return 0


def _model_arguments(p: argparse.ArgumentParser) -> None:
    from .eval.cli import key_value

    p.add_argument("--model", default="testbed", help="a registered model name (default: testbed)")
    p.add_argument("--model-arg", action="append", type=key_value, metavar="KEY=VALUE",
                   help="an argument of the model's loader (repeatable), e.g. run_dir=/path/cobra+3b")
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where the loader puts it)")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16, float16, float32")


def _data_arguments(p: argparse.ArgumentParser, split: str | None) -> None:
    p.add_argument("--data", required=True, help="dataset name, e.g. synthvqa, synthvqa:read, gqa, pope:random")
    p.add_argument("--data-root", required=True, help="the dataset's folder")
    p.add_argument("--split", default=split, help=f"split (default: {split or 'the dataset default'})")
    p.add_argument("--images-root", default=None, help="where the images are, when not where the dataset's release puts them (each image is looked up by its file name)")


def build_parser() -> argparse.ArgumentParser:
    from .eval.cli import key_value

    p = argparse.ArgumentParser(prog="mambaprune", description="Training-free visual token pruning for Mamba MLLMs")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="engine speed: prefill vs transformers, chunked vs reference scan")
    b.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    b.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the minimum is reported")
    b.add_argument("--seq-len", type=int, default=None, help="prompt and scan length (default 760)")
    b.add_argument("--quick", action="store_true", help="a small model, for a smoke test")
    b.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    b.add_argument("--no-mamba2", action="store_true", help="skip the Mamba-2 prefill (a mamba2-130m-shaped model)")
    b.add_argument("--json", default=None, help="also write the results to this JSON file")
    b.add_argument("--pruning", action="store_true",
                   help="instead: FLOPs ratio vs prefill-time ratio of the pruning methods, and their own time")
    b.set_defaults(func=_bench)
    s = sub.add_parser("synth", help="write the SynthVQA benchmark (train/val/test, public formats) to a folder")
    s.add_argument("--out", required=True, help="output folder (new, empty, or an earlier SynthVQA folder)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same bytes")
    s.add_argument("--per-family", type=int, default=500, help="questions per family in val and test (default 500)")
    s.add_argument("--train-multiplier", type=int, default=10, help="train size = per-family x this (default 10)")
    s.add_argument("--image-size", type=int, default=224, help="image side in pixels (default 224)")
    s.add_argument("--code-length", type=int, default=3, help="characters of the code on the sign (default 3)")
    s.set_defaults(func=_synth)
    from .train_testbed import add_arguments

    t = sub.add_parser("train-testbed", help="train the testbed model on a SynthVQA folder (CPU, resumable)")
    add_arguments(t)
    t.set_defaults(func=_train_testbed)

    from .eval.cli import add_eval_arguments

    e = sub.add_parser("eval", help="one model x method x dataset run: samples.jsonl + summary.json (resumable; "
                                    "shards under torchrun)")
    add_eval_arguments(e)
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)

    tb = sub.add_parser("table", help="assemble run folders into the paper's Table 1 / Table 3 / keep-ratio sweep")
    tb.add_argument("runs", nargs="+", help="run folders, summary.json files, or folders holding run folders")
    tb.add_argument("--kind", choices=["accuracy", "efficiency", "sweep"], default="accuracy",
                    help="accuracy: Table 1 layout; efficiency: Table 3; sweep: accuracy vs a parameter (Fig. 11)")
    tb.add_argument("--levels", type=float, nargs="*", default=None,
                    help="group rows by FLOPs level, e.g. --levels 0.7 0.5 (Table 1's two blocks)")
    tb.add_argument("--flops-unit", type=float, default=1e9, help="FLOPs column unit (1e9: G, 1e12: T as the paper)")
    tb.add_argument("--param", default="keep_ratio", help="the swept parameter (--kind sweep)")
    tb.add_argument("--title", default=None)
    tb.add_argument("--no-merge", action="store_true",
                    help="one row per run folder (default: runs of one setting on several benchmarks form one row)")
    tb.add_argument("--out", default=None, help="also write OUT.md, OUT.csv and OUT.tex")
    tb.add_argument("--plot", default=None, help="with --kind sweep: draw the curve to this PNG")
    tb.set_defaults(func=_table)

    from .planner import add_plan_arguments, plan_command

    pl = sub.add_parser("plan", help="the best DTP policy for a FLOPs budget (DOP's divergence search, Eq. 7-10)")
    add_plan_arguments(pl)
    pl.set_defaults(func=plan_command)

    d = sub.add_parser("demo", help="the paper's tables and figures on the shipped testbed and SynthVQA")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--per-family", type=int, default=30, help="test questions per family (default 30)")
    d.add_argument("--calib-samples", type=int, default=16, help="DTP calibration questions (default 16)")
    d.add_argument("--no-sweep", action="store_true", help="skip the keep-ratio sweep (Figure 11)")
    d.add_argument("--model", default="testbed", help="the model (default: the testbed)")
    d.add_argument("--model-arg", action="append", type=key_value, metavar="KEY=VALUE",
                   help="a loader argument, e.g. folder=DIR for a testbed trained with `mambaprune train-testbed`")
    d.set_defaults(func=_demo)

    f = sub.add_parser("flops", help="LM FLOPs of pruning settings (multiply-adds, the DTP paper's convention)")
    f.add_argument("--preset", choices=["cobra", "mlmamba", "robomamba"], default=None,   # workflows.PRESETS
                   help="a released model's shape (no weights needed); without --method: the paper's Table 1 rows")
    _model_arguments(f)
    f.add_argument("--method", default=None, help="a pruning method (see `mambaprune eval --help`)")
    f.add_argument("--param", action="append", type=key_value, metavar="KEY=VALUE",
                   help="a method parameter (repeatable)")
    f.add_argument("--target", type=float, default=None, help="find the parameter value giving this FLOPs ratio")
    f.add_argument("--match", default=None, help="which parameter --target varies (default keep_ratio, else layer)")
    f.add_argument("--n-text", type=int, default=20, help="text tokens per prompt for --model (default 20)")
    f.add_argument("--image", default=None, help="with --question: count the text tokens of this prompt")
    f.add_argument("--question", default="What is in the image?")
    f.set_defaults(func=_flops)

    c = sub.add_parser("calibrate", help="DTP's Std curve (Eq. 7) and early/late layers (Eq. 8-9) for a model")
    _model_arguments(c)
    _data_arguments(c, None)
    c.add_argument("--samples", type=int, default=50, help="calibration samples (default 50, as the paper)")
    c.add_argument("--signal", default="delta", choices=["delta", "B", "C", "y"])
    c.add_argument("--out", default=None, help="folder for calibration.json and std_curve.png")
    c.set_defaults(func=_calibrate)

    a = sub.add_parser("analyze", help="importance scatter, implicit attention and kept tokens for one sample")
    _model_arguments(a)
    _data_arguments(a, None)
    a.add_argument("--index", type=int, default=0, help="which sample (default 0)")
    a.add_argument("--method", default="dtp")
    a.add_argument("--param", action="append", type=key_value, metavar="KEY=VALUE")
    a.add_argument("--out", required=True, help="folder for the figures")
    a.set_defaults(func=_analyze)
    return p


def main(argv=None) -> int:
    """Run one sub-command; its exit status. An expected error (:data:`EXPECTED_ERRORS`, or a command's own
    ``SystemExit`` message) is printed as ``mambaprune <command>: error: <message>`` on one line of stderr and
    gives 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EXPECTED_ERRORS as e:
        if os.environ.get("MAMBAPRUNE_TRACEBACK", "").strip() not in ("", "0"):
            raise
        message = str(e)
    except SystemExit as e:                     # e.g. `mambaprune plan`'s own "mambaprune plan: ..." message
        if not isinstance(e.code, str):
            raise
        message = e.code
        for prefix in (f"mambaprune {args.command}: ", "mambaprune: "):
            message = message.removeprefix(prefix)
    print(f"mambaprune {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
