"""Does a testbed recall an object's attributes by its name? Accuracy per attr template against the scene's majority.

    python research/testbed_recall.py [RUN] --data SYNTH [--images 400] [--split val]

``RUN`` is ``testbed`` (the shipped model, the default), a testbed folder, or a ``train-testbed --out`` folder
holding ``last.pt`` (the run's latest checkpoint). For each of the first ``--images`` scenes of the split, one
question of each attr template the scene allows (:func:`~mambaprune.data.synthvqa._attr_candidates`:
``color_of`` "What color is the star?", ``shape_of`` "What shape is the red object?", ``size_of`` "What size is
the blue circle?", and the two-object ``relate_color`` / ``relate_shape`` "... directly left of the ...") is asked
alone, as the harness asks it. Printed per template: the model's exact-match accuracy, and the accuracy of the
**scene majority**: answering with the scene's most common colour / shape / size, which a model that keeps a bag of
what the image holds, and recalls nothing by name, can reach (scenes take a theme colour and shape, so it is far
above 1/6 or 1/5). Only accuracy above the scene majority shows recall by name; ``size_of`` is the cleanest
(sizes are drawn independently per object: the majority is near 1/2).
"""
from __future__ import annotations

import argparse
import random
from collections import Counter, defaultdict
from pathlib import Path

import torch

TEMPLATES = ("color_of", "shape_of", "size_of", "relate_color", "relate_shape")
ATTRIBUTE = {"color_of": "color", "shape_of": "shape", "size_of": "size", "relate_color": "color",
             "relate_shape": "shape"}


def load_run(run: str):
    """The model of ``testbed``, a testbed folder, or a training run's ``last.pt``."""
    from mambaprune.models import load_model
    from mambaprune.models.testbed import TestbedConfig, build_testbed
    from mambaprune.models.vlm import load_tokenizer

    path = Path(run)
    if run == "testbed" or not (path / "last.pt").is_file():
        return load_model("testbed", None if run == "testbed" else run)
    ck = torch.load(path / "last.pt", map_location="cpu", weights_only=False)
    model = build_testbed(TestbedConfig.from_dict(ck["config"]), load_tokenizer(path / "tokenizer"))
    model.load_state_dict(ck["model"])
    return model


def recall_questions_of(scenes: list[dict], seed: int = 0) -> list[tuple[str, dict, str, str, str]]:
    """``[(template, scene, question, answer, scene-majority answer)]``: one question per template per scene."""
    from mambaprune.data.synthvqa import _attr_candidates

    rng = random.Random(seed)
    out = []
    for scene in scenes:
        candidates = _attr_candidates(scene["objects"])
        for template in TEMPLATES:
            if candidates[template]:
                q = rng.choice(candidates[template])
                counts = Counter(o[ATTRIBUTE[template]] for o in scene["objects"])
                majority = max(sorted(counts), key=lambda v: counts[v])
                out.append((template, scene, q["question"], q["answer"], majority))
    return out


def recall_table(model, data: Path, split: str = "val", n_images: int = 400, batch_size: int = 50) -> dict:
    """``{template: {"n", "model", "scene_majority"}}`` (accuracies as fractions)."""
    from mambaprune.data.synthvqa import image_file, load_scenes

    items = recall_questions_of(load_scenes(data, split)[:n_images])
    model.eval()
    answers = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            images = [Path(data) / image_file(sc["image_id"]) for _, sc, _, _, _ in batch]
            answers += model.answer(images, [q for _, _, q, _, _ in batch])
    table: dict = defaultdict(lambda: {"n": 0, "model": 0.0, "scene_majority": 0.0})
    for (template, _, _, answer, majority), got in zip(items, answers):
        row = table[template]
        row["n"] += 1
        row["model"] += got.strip().lower() == answer
        row["scene_majority"] += majority == answer
    return {t: {"n": r["n"], "model": r["model"] / r["n"], "scene_majority": r["scene_majority"] / r["n"]}
            for t, r in table.items()}


def run_arguments(description: str, images: int):
    """The arguments of the testbed diagnostics (a run, its data, a split, how many scenes), parsed; sets the
    torch threads."""
    p = argparse.ArgumentParser(description=description.split("\n\n")[0])
    p.add_argument("run", nargs="?", default="testbed")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, default=images)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = run_arguments(__doc__, images=400)
    table = recall_table(load_run(args.run), args.data, args.split, args.images)
    print(f"| template | questions | {args.run} | scene majority |\n|---|---|---|---|")
    for t in TEMPLATES:
        if t in table:
            r = table[t]
            print(f"| {t} | {r['n']} | {100 * r['model']:.1f} | {100 * r['scene_majority']:.1f} |")


if __name__ == "__main__":
    main()
