"""The ``mambaprune`` command: ``bench`` (the engine, or with ``--pruning`` the methods) and ``synth``.

More sub-commands arrive with their issues."""
from __future__ import annotations

import argparse
import sys


def _run_benchmark(run, settings, format_result, json_path) -> int:
    """Run a benchmark with a one-line status on stderr, print its table, optionally save it as JSON."""
    from tqdm import tqdm

    from .bench import save_json

    bar = tqdm(total=None, bar_format="{desc}", leave=False, file=sys.stderr)
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

    s = BenchSettings(threads=args.threads, repeats=args.repeats, with_transformers=not args.no_transformers)
    if args.quick:
        s.d_model, s.n_layer, s.seq_len, s.scan_d_inner, s.scan_len = 128, 4, 96, 256, 96
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
    from tqdm import tqdm

    from .data.synthvqa import SynthConfig, generate_synthvqa

    cfg = SynthConfig(seed=args.seed, per_family=args.per_family, train_multiplier=args.train_multiplier,
                      image_size=args.image_size, code_length=args.code_length)
    with tqdm(total=sum(cfg.split_sizes().values()), desc="synth", unit="img", file=sys.stderr) as bar:
        manifest = generate_synthvqa(args.out, cfg, progress=bar.update)
    sizes = ", ".join(f"{split} {c['images']}" for split, c in manifest["splits"].items())
    print(f"SynthVQA written to {args.out}: images (= questions per family) {sizes}; "
          f"{len(manifest['files'])} files listed in manifest.json")
    return 0


def _train_testbed(args) -> int:
    from .train_testbed import settings_from_args, train

    info = train(settings_from_args(args), log=lambda m: print(m, flush=True))
    acc = ", ".join(f"{k} {100 * v:.1f}" for k, v in info["test_accuracy"].items())
    print(f"testbed written to {args.out} after {info['steps_done']} steps; test accuracy (%): {acc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mambaprune", description="Training-free visual token pruning for Mamba MLLMs")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="engine speed: prefill vs transformers, chunked vs reference scan")
    b.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    b.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the minimum is reported")
    b.add_argument("--seq-len", type=int, default=None, help="prompt and scan length (default 760)")
    b.add_argument("--quick", action="store_true", help="a small model, for a smoke test")
    b.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
