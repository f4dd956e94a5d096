"""flops / calibrate / analyze: the work behind the CLI sub-commands, on a tiny random testbed-shaped model."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mambaprune.cli import main
from mambaprune.data.readers import load_dataset
from mambaprune.data.synthvqa import SynthConfig, generate_synthvqa
from mambaprune.models.testbed import TestbedConfig as Config
from mambaprune.models.testbed import build_testbed, build_tokenizer
from mambaprune.models.testbed import testbed_prompt as prompt
from mambaprune.pruning import build
from mambaprune.pruning.base import num_to_keep
from mambaprune.pruning.calibration import calibrate_dtp
from mambaprune.train_testbed import init_mamba_
from mambaprune.workflows import (PAPER_SETTINGS, PRESETS, analysis_figures, calibrate, flops_rows,
                                  format_flops_rows, prepare_samples)

SMALL = Config(image_size=64, patch_size=8, vision_width=16, vision_layers=1,
               projector_hidden=32, d_model=24, n_layer=8, d_state=4, vocab_size=320)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthvqa(root, SynthConfig(per_family=3, train_multiplier=1))
    return root


@pytest.fixture(scope="module")
def model(data):
    texts = [prompt(s.question) + s.answers[0] for s in load_dataset("synthvqa", data, "train")]
    torch.manual_seed(0)
    m = build_testbed(SMALL, build_tokenizer(texts, vocab_size=SMALL.vocab_size))
    init_mamba_(m.lm, seed=1)
    return m.eval()


def test_mlmamba_preset_is_mamba2_2p7b_with_cobra_tokens():
    """ML-Mamba's preset: the mamba2-2.7b shape (80 heads of 64, d_state 128, one group), Cobra's 729 + 21 tokens;
    its per-token layer cost by hand from mamba_ssm's Mamba2 (in_proj 2*5120 + 2*128 + 80 wide, conv over
    5120 + 256 channels, the recurrent scan 3*d*n + d + heads, D, gate, out_proj)."""
    shape = PRESETS["mlmamba"]
    cfg = shape.config
    assert (cfg.layer, cfg.d_inner, cfg.padded_vocab_size, shape.n_visual, shape.n_text) == \
        ("Mamba2", 5120, 50288, 729, 21)
    per_token = (2560 * (2 * 5120 + 2 * 128 + 80) + 4 * (5120 + 256) + (3 * 5120 * 128 + 5120 + 80) + 5120 + 5120
                 + 5120 * 2560)
    rows = {r["label"]: r for r in flops_rows(shape, PAPER_SETTINGS)}
    assert rows["Baseline"]["macs"] == per_token * 750 * 64 + 2560 * 50288
    assert rows["DTP (r=0.5)"]["ratio"] < rows["DTP (r=0.9)"]["ratio"] < 1.0
    for name in PRESETS:                                     # the CLI offers every preset
        assert main(["flops", "--preset", name]) == 0


def test_paper_presets_reproduce_table_1_flops():
    rows = {r["label"]: r for r in flops_rows(PRESETS["cobra"], PAPER_SETTINGS)}
    assert round(rows["Baseline"]["macs"] / 1e12, 2) == 2.01
    expected = {"FastV (k=2, r=0.7)": 71.7, "VTW (k=45)": 71.1, "DTP (r=0.9)": 66.7, "FastV (k=2, r=0.5)": 53.0,
                "VTW (k=32)": 51.4, "DTP (r=0.5)": 49.2}
    for label, pct in expected.items():
        assert round(100 * rows[label]["ratio"], 1) == pct, label
    table = format_flops_rows(list(rows.values()))
    assert "| DTP (r=0.9) | 1.34 | 66.7% |" in table


def test_flops_cli(capsys):
    assert main(["flops", "--preset", "cobra"]) == 0
    out = capsys.readouterr().out
    assert "729 visual + 21 text tokens, 64 layers" in out and "| VTW (k=45) | 1.43 | 71.1% |" in out
    assert main(["flops", "--preset", "cobra", "--method", "fastv", "--param", "layer=2", "--target", "0.5"]) == 0
    out = capsys.readouterr().out
    # the keep ratio closest to 50% of the FLOPs with FastV at layer 2
    line = [l for l in out.splitlines() if l.startswith("| fastv(")][0]
    assert "layer=2" in line and abs(float(line.split("|")[3].strip().rstrip("%")) - 50.0) < 0.2


def _std_curve_by_hand(model, samples):
    """DTP's Eq. 6-7 outside the library: Δ = softplus(dt_proj(.) + bias) caught on each layer's dt_proj in a plain
    prefill, its mean over the channels per visual token (Eq. 6), the population Std over the visual tokens of
    each layer (Eq. 7), averaged over the samples; in fp64 and plain Python."""
    caught = {}
    handles = [layer.mixer.dt_proj.register_forward_hook(
        lambda mod, args, out, l=l: caught.__setitem__(l, out.detach().double() + mod.bias.double()))
        for l, layer in enumerate(model.lm.backbone.layers)]
    curves = []
    try:
        for s in samples:
            prepared = model.prepare(s.image, s.question)
            caught.clear()
            with torch.no_grad():
                model.prefill(prepared)
            visual = prepared.is_visual[0]
            curve = []
            for l in range(len(model.lm.backbone.layers)):
                importance = torch.nn.functional.softplus(caught[l][0][visual]).mean(-1).tolist()     # Eq. 6
                mean = sum(importance) / len(importance)
                curve.append(math.sqrt(sum((x - mean) ** 2 for x in importance) / len(importance)))  # Eq. 7
            curves.append(curve)
    finally:
        for h in handles:
            h.remove()
    return [sum(c[l] for c in curves) / len(curves) for l in range(len(curves[0]))]


def test_calibrate_matches_calibrate_dtp_and_writes_its_files(model, data, tmp_path):
    samples = load_dataset("synthvqa", data, "val")[:4]
    result = calibrate(model, samples, tmp_path, progress=False)
    direct = calibrate_dtp(model, prepare_samples(model, samples), progress=False)
    assert result["std"] == direct.std_curve and (result["early_layer"], result["late_layer"]) == (
        direct.early_layer, direct.late_layer)
    # the curve and the layers against an independent computation: Eq. 8 is the first minimum over layers
    # 0..int(0.25 * 8) = 0..2, Eq. 9 one past the largest |Std_{l+1} - Std_l| over l = int(0.7 * 8)..6 = 5..6
    std = _std_curve_by_hand(model, samples)
    assert result["std"] == pytest.approx(std, rel=1e-3)
    early = min(range(3), key=lambda l: (std[l], l))
    late = max(range(5, 7), key=lambda l: (abs(std[l + 1] - std[l]), -l)) + 1
    assert (result["early_layer"], result["late_layer"]) == (early, late) == (2, 6)
    # neither choice is a near-tie that the fp32 / fp64 difference (< 0.1%) could flip
    assert sorted(std[:3])[1] - sorted(std[:3])[0] > 0.05 * max(std)
    assert abs(abs(std[7] - std[6]) - abs(std[6] - std[5])) > 0.05 * max(std)
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["early_layer"] == result["early_layer"] and saved["n_samples"] == 4
    assert (tmp_path / "std_curve.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at least one sample"):
        calibrate(model, [], tmp_path)


def test_analysis_figures_show_what_dtp_keeps(model, data, tmp_path):
    sample = load_dataset("synthvqa", data, "test")[0]
    params = {"keep_ratio": 0.25, "early_layer": 1, "late_layer": 6}
    paths = analysis_figures(model, sample, tmp_path, method="dtp", params=params)
    assert set(paths) == {"importance_scatter", "implicit_attention", "kept_tokens"}
    for p in paths.values():
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 0
    with pytest.raises(ValueError, match="late_layer"):
        analysis_figures(model, sample, tmp_path, method="dtp", params={"early_layer": 5, "late_layer": 3})


def test_kept_token_count_in_the_figure_title(model, data, tmp_path, monkeypatch):
    """The kept-tokens panel draws exactly the visual tokens DTP lets into layer early + 1."""
    import mambaprune.analysis.plots as plots

    seen = {}

    def fake(image, grid, kept, path, title=None, **kw):
        seen["kept"], seen["grid"] = list(kept), grid
        return None

    monkeypatch.setattr(plots, "plot_kept_tokens", fake)
    sample = load_dataset("synthvqa", data, "test")[1]
    analysis_figures(model, sample, tmp_path, method="dtp",
                     params={"keep_ratio": 0.25, "early_layer": 1, "late_layer": 6})
    n_visual = model.vision.num_tokens
    assert seen["grid"] == (8, 8) and len(seen["kept"]) == num_to_keep(n_visual, 0.25)
    assert all(0 <= p < n_visual for p in seen["kept"]) and seen["kept"] == sorted(seen["kept"])
