"""The harness on a Mamba-2 multimodal model, end to end: ``mambaprune eval``, ``table``, ``calibrate``, ``plan``,
``analyze``, ``flops`` and the demo pipeline, on ``runner_fixture_model:load_tiny_mamba2`` (random weights)."""
from __future__ import annotations

import json

import pytest

import runner_fixture_model as fx
from mambaprune.cli import main
from mambaprune.data.synthvqa import SynthConfig, generate_synthvqa
from mambaprune.demo import BASELINES, BUDGETS, run_demo
from mambaprune.eval.records import read_records
from mambaprune.workflows import ModelShape, flops_rows

MODEL = "runner_fixture_model:load_tiny_mamba2"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth2")
    generate_synthvqa(root, SynthConfig(seed=3, per_family=2, train_multiplier=1))
    return root


@pytest.fixture(scope="module")
def config():
    return fx.load_tiny_mamba2().lm.config


def mamba2_macs_by_hand(cfg, tokens_per_layer, head_positions=1):
    """The Mamba-2 count of mambaprune.flops' docstring, written out for the tiny model's config."""
    d, di, n, g, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.ngroups, cfg.d_conv
    h = di // cfg.headdim
    per_token = (d * (2 * di + 2 * g * n + h) + k * (di + 2 * g * n) + 3 * di * n + di + h + 2 * di + di * d)
    return per_token * sum(tokens_per_layer) + head_positions * d * cfg.padded_vocab_size


def test_eval_table_and_flops_on_mamba2(data, tmp_path, capsys, config):
    common = ["--model", MODEL, "--data", "synthvqa", "--data-root", str(data), "--limit", "4", "--no-progress"]
    runs = {"none": [], "dtp": ["--param", "keep_ratio=0.5", "--param", "early_layer=1", "--param", "late_layer=6"],
            "fastv": ["--param", "keep_ratio=0.25", "--param", "layer=2"]}
    for method, flags in runs.items():
        assert main(["eval", *common, "--method", method, *flags, "--out", str(tmp_path / method)]) == 0
        records = read_records(tmp_path / method / "samples.jsonl")
        assert len(records) == 4 and not any(r.get("error") for r in records)
        for r in records:                                        # the Mamba-2 count, per sample
            assert r["flops"] == mamba2_macs_by_hand(config, r["tokens_per_layer"])
            assert r["flops_baseline"] == mamba2_macs_by_hand(config, [r["n_visual"] + r["n_text"]] * 8)
        summary = json.loads((tmp_path / method / "summary.json").read_text())
        assert summary["n_samples"] == 4
        assert summary["flops"] == pytest.approx(sum(r["flops"] for r in records) / 4)
        assert (summary["flops_ratio"] == 1.0) == (method == "none")
    capsys.readouterr()
    assert main(["table", *(str(tmp_path / m) for m in runs), "--out", str(tmp_path / "t1")]) == 0
    printed = capsys.readouterr().out
    assert "Baseline" in printed and "dtp(" in printed and "fastv(" in printed
    assert main(["table", *(str(tmp_path / m) for m in runs), "--kind", "efficiency"]) == 0
    assert "Prefill" in capsys.readouterr().out

    # `mambaprune flops` on the model: a matched FastV keep ratio, its ratio from the Mamba-2 count
    assert main(["flops", "--model", MODEL, "--method", "fastv", "--target", "0.7", "--n-text", "20"]) == 0
    out = capsys.readouterr().out
    shape = ModelShape(config, fx.NUM_VISUAL, 20)
    line = next(l for l in out.splitlines() if l.startswith("| fastv("))
    keep = float(line.split("keep_ratio=")[1].split(")")[0])
    row = flops_rows(shape, [("x", "fastv", {"keep_ratio": keep})])[0]
    assert row["macs"] == mamba2_macs_by_hand(config, row["tokens_per_layer"])
    assert f"{100 * row['ratio']:.1f}%" in line and abs(row["ratio"] - 0.7) < 0.05


def test_calibrate_plan_and_analyze_on_mamba2(data, tmp_path, capsys):
    cal_dir = tmp_path / "cal"
    assert main(["calibrate", "--model", MODEL, "--data", "synthvqa", "--data-root", str(data), "--split", "val",
                 "--samples", "3", "--out", str(cal_dir)]) == 0
    cal = json.loads((cal_dir / "calibration.json").read_text())
    assert len(cal["std"]) == 8 and cal["n_samples"] == 3 and (cal_dir / "std_curve.png").stat().st_size > 0
    assert f"early_layer = {cal['early_layer']}, late_layer = {cal['late_layer']}" in capsys.readouterr().out

    policy = tmp_path / "policy.json"
    assert main(["plan", "--model", MODEL, "--budget", "0.9", "--data", "synthvqa", "--data-root", str(data),
                 "--split", "val", "--samples", "2", "--points", "3", "--out", str(policy), "--no-progress"]) == 0
    planned = json.loads(policy.read_text())
    assert planned["flops_ratio"] <= 0.9 and planned["method"] in ("dtp", "none")
    run = tmp_path / "planned"
    assert main(["eval", "--policy", str(policy), "--model", MODEL, "--data", "synthvqa", "--data-root", str(data),
                 "--limit", "2", "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["config"]["params"] == planned["params"]

    figures = tmp_path / "figures"
    assert main(["analyze", "--model", MODEL, "--data", "synthvqa", "--data-root", str(data), "--split", "test",
                 "--method", "fastv", "--param", "keep_ratio=0.5", "--out", str(figures)]) == 0
    for name in ("importance_scatter", "implicit_attention", "kept_tokens"):
        assert (figures / f"{name}.png").stat().st_size > 1000, name


def test_demo_pipeline_on_mamba2(tmp_path):
    result = run_demo(tmp_path, per_family=1, calib_samples=3, sweep=False, progress=False, log=lambda m: None,
                      model_name=MODEL)
    runs = result["runs"]
    assert len(runs) == 1 + len(BUDGETS) * (1 + len(BASELINES))
    assert runs["none"]["flops_ratio"] == 1.0 and all(r["n_samples"] == 5 for r in runs.values())
    # matched to two budgets (16 visual tokens beside ~50 text tokens: coarse, and 70% out of DTP's reach)
    for method in ["dtp"] + [m for m, _ in BASELINES]:
        assert runs[f"{method}-50"]["flops_ratio"] <= runs[f"{method}-70"]["flops_ratio"] < 1.0, method
    for name in ("std_curve", "importance_scatter", "implicit_attention", "kept_tokens"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0, name
    assert (tmp_path / "tables" / "table1.md").read_text().count("\n") > len(runs)
