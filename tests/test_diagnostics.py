"""The testbed diagnostics of research/ (the position probe and the recall-by-name table) and benchmarks/'s
kept-code-patches table."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mambaprune.data.synthvqa import GLYPH_H, GLYPH_W, SynthConfig, answer_question, generate_synthvqa, load_scenes
from mambaprune.pruning.base import Pruner, keep_visual

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESEARCH = ROOT / "research"


def _module(name: str, folder: Path = RESEARCH):
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    generate_synthvqa(out, SynthConfig(per_family=40, train_multiplier=1, image_size=160))
    return out


def test_probe_reads_a_linear_code_and_not_noise():
    probe = _module("testbed_position_probe").probe_accuracy
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (1000,), generator=gen)
    # classes written along a random direction each, plus noise: a linear probe reads them
    x = torch.nn.functional.one_hot(y, 4).float() @ torch.randn(4, 16, generator=gen)
    x = x + 0.1 * torch.randn(1000, 16, generator=gen)
    assert probe(x, y.tolist()) == 1.0
    # features that do not depend on the class: held-out accuracy near 1/4
    noise = torch.randn(1000, 16, generator=gen)
    assert abs(probe(noise, y.tolist()) - 0.25) < 0.08
    # class names of any kind (the objects' "red", "small", ...)
    assert probe(x, ["abcd"[k] for k in y.tolist()]) == 1.0


def test_recall_questions_of_ask_every_template_with_the_scene_majority(synth):
    mod = _module("testbed_recall")
    scenes = load_scenes(synth, "val")
    items = mod.recall_questions_of(scenes)
    assert items == mod.recall_questions_of(scenes)                 # seeded
    assert {t for t, *_ in items} == set(mod.TEMPLATES)
    for template, scene, question, answer, majority in items:
        assert answer_question(scene, "attr", question) == answer
        attribute = mod.ATTRIBUTE[template]
        values = [o[attribute] for o in scene["objects"]]
        assert values.count(majority) == max(values.count(v) for v in values)
        assert ("directly" in question) == template.startswith("relate")


def test_reorder_patches_by_hand():
    from mambaprune.train_testbed import reorder_patches as reorder
    visual = torch.arange(9.0).reshape(1, 9, 1).repeat(2, 1, 3)          # token i holds i in every channel
    rows = reorder(visual, 3, "rows-reversed")
    cols = reorder(visual, 3, "columns-reversed")
    assert rows[0, :, 0].tolist() == [6, 7, 8, 3, 4, 5, 0, 1, 2]
    assert cols[1, :, 2].tolist() == [2, 1, 0, 5, 4, 3, 8, 7, 6]
    sixteen = torch.arange(16.0).reshape(1, 16, 1)                    # a 4 x 4 grid: rows 2, 3, then 0, 1
    assert reorder(sixteen, 4, "rows-rotated")[0, :, 0].tolist() == [*range(8, 16), *range(8)]
    assert torch.equal(reorder(visual, 3, "scan"), visual)
    assert torch.equal(reorder(rows, 3, "rows-reversed"), visual)       # its own inverse
    with pytest.raises(ValueError, match="grid"):
        reorder(visual[:, :8], 3)
    with pytest.raises(ValueError, match="order"):
        reorder(visual, 3, "diagonal")


def test_kept_code_patches_counts_what_the_method_leaves(synth):
    """benchmarks/kept_code_patches.py on the shipped testbed: VTW at layer 3 leaves no visual token to layer 3
    (nothing kept, layer 3 the first to miss them: a method acting at layer k decides after layer k - 1), the
    unpruned model prunes nothing (an error naming it), and the method specs parse by hand."""
    from mambaprune.data.readers import load_dataset
    from mambaprune.models import load_model

    mod = _module("kept_code_patches", BENCH)
    assert mod.parse_method("dtp:keep_ratio=0.5,early_layer=3,late_layer=0.7") == (
        "dtp", {"keep_ratio": 0.5, "early_layer": 3, "late_layer": 0.7})
    assert mod.parse_method("vtw:layer=6") == ("vtw", {"layer": 6}) and mod.parse_method("none") == ("none", {})
    with pytest.raises(ValueError, match="key=value"):
        mod.parse_method("dtp:0.5")
    model = load_model("testbed")
    samples = load_dataset("synthvqa:read", synth, "test")[:3]
    scenes = {sc["image_id"]: sc for sc in load_scenes(synth, "test")}
    size = json.loads((synth / "scenes" / "test.json").read_text())["image_size"]     # the scenes' coordinates
    gone = mod.kept_shares(model, samples, scenes, size, "vtw", {"layer": 3})
    assert gone == {"code": 0.0, "objects": 0.0, "first_layer_missing": [3]}
    with pytest.raises(ValueError, match="pruned no visual token"):
        mod.kept_shares(model, samples, scenes, size, "none", {})


class _KeepHalf(Pruner):
    """A fixed pruner: at ``layer``, keeps the visual tokens of one half of the image, the ``left`` or the
    ``top`` half of the patch grid (the i-th visual token of the sequence is patch i, row-major)."""

    name = "keep_half"

    def __init__(self, layer: int, half: str, grid: int):
        super().__init__()
        self.layer, self.half, self.grid = layer, half, grid

    def setup(self, n_layer):
        return {self.layer}

    def act(self, seq, layer):
        visual = seq.is_visual & seq.mask
        patch = visual.long().cumsum(1) - 1                   # the visual tokens' rank in the sequence
        inside = patch % self.grid < self.grid // 2 if self.half == "left" else patch // self.grid < self.grid // 2
        return keep_visual(seq, visual & inside)


def test_kept_code_patches_counts_a_known_kept_set(synth, monkeypatch):
    """kept_code_patches.kept_shares with a method whose kept set is known (one half of the image, before the LM
    and at layer 5), against shares counted here from the scene descriptions alone. What is counted is patches
    (a patch holding two characters' centres counts once): the patch (row, column) of a point (x, y) of the
    scene is (y, x) scaled to the tower's pixels, divided by the patch size; it is kept iff its column (row) is
    in the left (top) half of the grid. A code character's centre is the middle of its glyph cell as the
    renderer lays it out (``code_mask``: character k spans columns k * (GLYPH_W + 1) * scale .. + GLYPH_W * scale
    and GLYPH_H * scale rows from the sign's text origin)."""
    import mambaprune.pruning
    from mambaprune.data.readers import load_dataset
    from mambaprune.models import load_model

    mod = _module("kept_code_patches", BENCH)
    model = load_model("testbed")
    grid = model.vision.image_size // model.vision.patch_size
    assert grid % 2 == 0
    samples = load_dataset("synthvqa:read", synth, "test")[:12]
    scenes = {sc["image_id"]: sc for sc in load_scenes(synth, "test")}
    size = json.loads((synth / "scenes" / "test.json").read_text())["image_size"]
    real_build = mambaprune.pruning.build
    monkeypatch.setattr(mambaprune.pruning, "build",
                        lambda name, **p: _KeepHalf(**p, grid=grid) if name == "keep_half" else real_build(name, **p))

    pixels_per_patch = model.vision.patch_size * size / model.vision.image_size      # in scene coordinates

    def cell(x: float, y: float) -> tuple[int, int]:
        row, col = math.floor(y / pixels_per_patch), math.floor(x / pixels_per_patch)
        assert 0 <= row < grid and 0 <= col < grid
        return row, col

    def expected(axis: int) -> tuple[float, float]:
        code, objects = [0, 0], [0, 0]
        shared = 0
        for s in samples:
            scene = scenes[int(Path(s.image).stem)]
            sign = scene["sign"]
            chars = {cell(sign["text_origin"][0] + (k * (GLYPH_W + 1) + GLYPH_W / 2) * sign["scale"],
                          sign["text_origin"][1] + GLYPH_H * sign["scale"] / 2) for k in range(len(scene["code"]))}
            shared += len(scene["code"]) - len(chars)
            for counts, cells in ((code, chars), (objects, {cell(*o["center"]) for o in scene["objects"]})):
                counts[0] += sum(c[1 - axis] < grid // 2 for c in cells)
                counts[1] += len(cells)
        assert shared > 0                                           # some characters do share a patch
        return code[0] / code[1], objects[0] / objects[1]

    shares = {}
    for half, axis, layer in (("left", 0, 0), ("top", 1, 5)):
        code, objects = expected(axis)
        assert 0 < code < 1 and 0 < objects < 1                     # the half splits both sets
        shares[half] = (code, objects)
        got = mod.kept_shares(model, samples, scenes, size, "keep_half", {"layer": layer, "half": half})
        assert got == {"code": code, "objects": objects, "first_layer_missing": [layer]}, half
    assert shares["left"] != shares["top"]                          # x and y cannot be swapped unnoticed
