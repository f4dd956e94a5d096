"""The testbed diagnostics of research/ (the position probe and the recall-by-name table) and benchmarks/'s
kept-code-patches table."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mambaprune.data.synthvqa import SynthConfig, answer_question, generate_synthvqa, load_scenes

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
