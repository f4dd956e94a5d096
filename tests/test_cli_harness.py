"""The harness sub-commands end to end: eval writes a run, table reads it back, bad settings fail early."""
from __future__ import annotations

import json

import pytest

from mambaprune.cli import main
from mambaprune.data.synthvqa import SynthConfig, generate_synthvqa


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthvqa(root, SynthConfig(per_family=2, train_multiplier=1))
    return root


@pytest.mark.parametrize("flags, needle", [
    (["--method", "dtp", "--param", "keep_ratio=1.5"], "1.5"),
    (["--method", "fastv", "--param", "keep_ratio=0"], "keep_ratio"),
    (["--method", "dtp", "--param", "early_layer=6", "--param", "late_layer=3"], "late_layer"),
    (["--method", "vtw", "--param", "layer=99"], "99"),
    (["--method", "nosuch"], "nosuch"),
    (["--method", "dtp", "--param", "ratio=0.5"], "ratio"),
    (["--data", "nosuchdata"], "nosuchdata"),
])
def test_eval_rejects_bad_settings_before_loading(data, tmp_path, capsys, flags, needle):
    args = ["eval", "--model", "runner_fixture_model:load_forbidden", "--data", "synthvqa",
            "--data-root", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args + flags) == 2              # load_forbidden raises RuntimeError if the model is loaded
    err = capsys.readouterr().err
    assert needle in err and err.startswith("mambaprune eval: error: ") and err.count("\n") == 1


def test_eval_yaml_config_with_flag_override_then_table(data, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: runner_fixture_model:load_tiny\ndata: synthvqa\ndata_root: {data}\n"
                   f"method: fastv\nparams: {{keep_ratio: 0.5, layer: 2}}\nlimit: 4\n")
    out_a, out_b = tmp_path / "a", tmp_path / "none"
    assert main(["eval", "--config", str(cfg), "--param", "keep_ratio=0.25", "--out", str(out_a),
                 "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads((out_a / "summary.json").read_text())
    assert summary["config"]["params"] == {"keep_ratio": 0.25, "layer": 2} and summary["n_samples"] == 4
    assert main(["eval", "--config", str(cfg), "--method", "none", "--out", str(out_b), "--device", "cpu",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["table", str(out_b), str(out_a), "--out", str(tmp_path / "t1")]) == 0
    printed = capsys.readouterr().out
    assert "Baseline" in printed and "fastv(" in printed and (tmp_path / "t1.csv").is_file()
    assert main(["table", str(out_b), str(out_a), "--kind", "efficiency"]) == 0
    assert "Prefill" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["table", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambaprune table: error: ") and "no summary.json" in err and err.count("\n") == 1
