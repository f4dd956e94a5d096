"""Which visual tokens does a pruning method keep on the read questions? The share of the code's patches it keeps.

    python benchmarks/kept_code_patches.py --data-root demo_out/synthvqa [--n 30] [--model-arg folder=DIR]
        [--method dtp:keep_ratio=0.9,early_layer=3,late_layer=15 ...]

For each of the first ``--n`` read questions of the test split, the method prunes the shipped testbed's prefill
with a :class:`~mambaprune.analysis.KeptTokenRecorder` around it; at the first layer where some visual tokens are
gone (0 for a method that prunes before the LM), it counts the patches holding a code character's centre
(``train_testbed.scene_patches``, from the scene description the generator keeps) and those holding an
object's centre that are still there. A method that keeps
the code's patches can still read the code in a later layer; one that drops them cannot (README, "Quick start"; docs/testbed.md, "What the demo shows on it").
The defaults are the demo's methods at about 70% of the FLOPs, DART also at 50%, and DTP at keep 0.9.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_METHODS = ("dtp:keep_ratio=0.9,early_layer=3,late_layer=15", "dtp:keep_ratio=0.57,early_layer=3,late_layer=15",
                   "fastv:layer=2,keep_ratio=0.59", "dart:layer=2,keep_ratio=0.59", "dart:layer=2,keep_ratio=0.31",
                   "random_pre:keep_ratio=0.64")


def parse_method(spec: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, params), values parsed as the harness's ``--param`` values
    (:func:`~mambaprune.eval.cli.key_value`)."""
    from mambaprune.eval.cli import key_value

    name, _, rest = spec.partition(":")
    try:
        return name, dict(key_value(item) for item in filter(None, rest.split(",")))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--method {spec!r}: {e}") from None


def kept_shares(model, samples, scenes: dict, scene_size: int, name: str, params: dict) -> dict:
    """Share of code-character patches and of object-centre patches a method keeps, over ``samples``."""
    from mambaprune.analysis import KeptTokenRecorder
    from mambaprune.pruning import build
    from mambaprune.train_testbed import scene_patches

    counts = {"code": [0, 0], "objects": [0, 0]}
    layers = set()
    for s in samples:
        scene = scenes[int(Path(s.image).stem)]
        objects, chars = scene_patches(scene, scene_size, model.vision.image_size, model.vision.patch_size)
        prepared = model.prepare(s.image, s.question)
        pruner = build(name, **params)
        pruner.start(model.lm.config)
        recorder = KeptTokenRecorder(pruner)
        model.prefill(prepared, pruner=recorder)
        cut = next((l for l in sorted(recorder.positions_by_layer)
                    if len(recorder.positions_by_layer[l][0]) < prepared.num_visual), None)
        if cut is None:
            raise ValueError(f"{name}{params} pruned no visual token of {s.id}")
        layers.add(cut + 1)
        kept = set(recorder.positions_by_layer[cut][0])      # visual token i (patch i) has position i (models.vlm)
        for key, cells in (("code", set(chars)), ("objects", set(objects))):
            counts[key][0] += sum(c in kept for c in cells)
            counts[key][1] += len(cells)
    return {"code": counts["code"][0] / counts["code"][1], "objects": counts["objects"][0] / counts["objects"][1],
            "first_layer_missing": sorted(layers)}


def main(argv=None) -> None:
    import torch

    from mambaprune.data.readers import load_dataset
    from mambaprune.eval.cli import key_value
    from mambaprune.models import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="a SynthVQA folder (e.g. the demo's demo_out/synthvqa)")
    p.add_argument("--n", type=int, default=30, help="read questions of the test split (default 30)")
    p.add_argument("--model-arg", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="testbed loader argument, e.g. folder=DIR (default: the shipped testbed)")
    p.add_argument("--method", action="append", default=None, help="name:key=value,... (repeatable)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model("testbed", **dict(args.model_arg))
    root = Path(args.data_root)
    scene_file = json.loads((root / "scenes" / "test.json").read_text())
    scenes = {sc["image_id"]: sc for sc in scene_file["scenes"]}
    samples = load_dataset("synthvqa:read", root, "test")[:args.n]
    print(f"| method | first layer missing tokens | code patches kept | object patches kept |  ({len(samples)} read questions)")
    print("|---|---|---|---|")
    for spec in args.method or DEFAULT_METHODS:
        name, params = parse_method(spec)
        r = kept_shares(model, samples, scenes, scene_file["image_size"], name, params)
        print(f"| `{spec}` | {', '.join(map(str, r['first_layer_missing']))} | {100 * r['code']:.0f}% "
              f"| {100 * r['objects']:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
