"""The demo's whole pipeline (SynthVQA, calibration, matched-FLOPs runs, tables, sweep, figures) on a tiny model."""
from __future__ import annotations

import json

import pytest

from mambaprune.demo import BASELINES, BUDGETS, SWEEP, plan_runs, run_demo

MODEL = "runner_fixture_model:load_tiny"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_plan_runs_matches_every_method_to_both_budgets():
    from runner_fixture_model import load_tiny

    from mambaprune.flops import lm_macs
    from mambaprune.pruning import build

    model = load_tiny()
    cfg, nv, nt = model.lm.config, model.vision.num_tokens, 10
    runs = plan_runs(model, early=1, late=6, n_text=nt)
    assert runs[0] == ("none", "none", {}) and len(runs) == 1 + len(BUDGETS) * (1 + len(BASELINES))
    base = lm_macs(cfg, [nv + nt] * cfg.n_layer)
    for name, method, params in runs[1:]:
        target = int(name.rsplit("-", 1)[1]) / 100
        ratio = lm_macs(cfg, build(method, **params).expected_tokens(cfg.n_layer, nv, nt)) / base
        assert abs(ratio - target) < 0.08, (name, params, ratio)     # 16 visual tokens: coarse steps


def test_demo_writes_tables_figures_and_resumes(tmp_path):
    lines = []
    result = run_demo(tmp_path, per_family=2, calib_samples=3, progress=False, log=lines.append,
                      model_name=MODEL)
    runs = result["runs"]
    assert runs["none"]["flops_ratio"] == 1.0 and all(r["n_samples"] == 10 for r in runs.values())
    assert len(runs) == 1 + len(BUDGETS) * (1 + len(BASELINES)) + len(SWEEP)
    for stem in ("table1", "table3", "sweep"):
        for ext in ("md", "csv", "tex"):
            assert (tmp_path / "tables" / f"{stem}.{ext}").stat().st_size > 0
    table1 = (tmp_path / "tables" / "table1.md").read_text()
    assert "dtp(keep_ratio=" in table1 and "fastv(" in table1 and "attr" in table1
    for name in ("std_curve", "keep_ratio_curve", "importance_scatter", "implicit_attention", "kept_tokens"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0, name
    cal = json.loads((tmp_path / "figures" / "calibration.json").read_text())
    dtp = json.loads((tmp_path / "runs" / "dtp-50" / "summary.json").read_text())
    assert dtp["config"]["params"]["early_layer"] == cal["early_layer"]
    # a second run finds every record and answers nothing again
    before = (tmp_path / "runs" / "none" / "samples.jsonl").read_text()
    again = run_demo(tmp_path, per_family=2, calib_samples=3, progress=False, log=lambda m: None,
                     model_name=MODEL, sweep=False, figures=False)
    assert (tmp_path / "runs" / "none" / "samples.jsonl").read_text() == before
    assert again["runs"]["dtp-70"]["accuracy"] == runs["dtp-70"]["accuracy"]
