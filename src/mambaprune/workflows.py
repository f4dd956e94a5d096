"""The work behind ``mambaprune flops``, ``calibrate`` and ``analyze`` (and the demo), as plain functions.

* :func:`flops_rows` - the LM cost of pruning settings on a model shape, as the DTP paper's Table 1 counts it
  (multiply-adds of the LLM, see :mod:`mambaprune.flops`); :data:`PRESETS` holds the released models' shapes
  (no weights needed) and :data:`PAPER_SETTINGS` the settings of the paper's Tables 1 and 2.
* :func:`calibrate` - DTP's Std curve (Eq. 7) over calibration samples, the layers Eq. 8-9 choose, its plot.
* :func:`analysis_figures` - for one sample: the importance scatter (Fig. 4), the implicit attention heatmaps
  (Eq. 3-5, Fig. 5), and the visual tokens a method keeps drawn over the image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from .flops import expected_macs, lm_macs
from .models.mamba_lm import MambaConfig
from .pruning import build


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs of a prefill depend on: the LM's config and the visual / text token counts."""

    config: MambaConfig
    n_visual: int
    n_text: int
    note: str = ""


#: Released models' LM shapes (mamba-2.8b: 2560 wide, 64 layers, vocabulary 50280) and token counts: Cobra 729
#: visual tokens (27 x 27 patches at 384 px) + ~21 prompt tokens (the DTP paper's ~750 tokens, 2.01 T);
#: RoboMamba 256 visual tokens (the DTP paper, Sec. 5.2) + ~10 prompt tokens (its 0.70 T).
PRESETS = {
    "cobra": ModelShape(MambaConfig(d_model=2560, n_layer=64, vocab_size=50280), 729, 21,
                        "Cobra-3B: mamba-2.8b-zephyr, DINOv2+SigLIP 384 px"),
    "robomamba": ModelShape(MambaConfig(d_model=2560, n_layer=64, vocab_size=50280), 256, 10,
                            "RoboMamba: mamba-2.8b, CLIP 256 tokens"),
    "mlmamba": ModelShape(MambaConfig(layer="Mamba2", d_model=2560, n_layer=64, vocab_size=50277, d_state=128,
                                      headdim=64, pad_vocab_size_multiple=16), 729, 21,
                          "ML-Mamba: mamba2-2.7b, Cobra's DINOv2+SigLIP 384 px and prompt"),
}

#: The settings of the DTP paper's Tables 1-2 (label, method, params); DTP with its reported layers 15 / 45.
PAPER_SETTINGS = (
    ("Baseline", "none", {}),
    ("FastV (k=2, r=0.7)", "fastv", {"layer": 2, "keep_ratio": 0.7}),
    ("VTW (k=45)", "vtw", {"layer": 45}),
    ("DART (r=0.66)", "dart", {"layer": 2, "keep_ratio": 0.66}),
    ("DTP (r=0.9)", "dtp", {"keep_ratio": 0.9, "early_layer": 15, "late_layer": 45}),
    ("FastV (k=2, r=0.5)", "fastv", {"layer": 2, "keep_ratio": 0.5}),
    ("VTW (k=32)", "vtw", {"layer": 32}),
    ("DART (r=0.44)", "dart", {"layer": 2, "keep_ratio": 0.44}),
    ("DTP (r=0.5)", "dtp", {"keep_ratio": 0.5, "early_layer": 15, "late_layer": 45}),
)


def flops_rows(shape: ModelShape, settings: Sequence[tuple[str, str, dict]]) -> list[dict]:
    """``[{label, method, params, macs, ratio, tokens_per_layer}]``: each setting's expected LM multiply-adds on
    one sample of ``shape`` and its ratio to the unpruned prefill."""
    cfg = shape.config
    base = lm_macs(cfg, [shape.n_visual + shape.n_text] * cfg.n_layer)
    rows = []
    for label, method, params in settings:
        pruner = build(method, **params)
        tokens = pruner.expected_tokens(cfg.n_layer, shape.n_visual, shape.n_text)
        macs = expected_macs(pruner, cfg, shape.n_visual, shape.n_text)
        rows.append({"label": label, "method": method, "params": dict(params), "macs": macs,
                     "ratio": macs / base, "tokens_per_layer": tokens})
    return rows


def format_flops_rows(rows: list[dict], unit: float = 1e12, unit_name: str = "T") -> str:
    """A Markdown table: setting, FLOPs (multiply-adds, in ``unit``), FLOPs ratio."""
    lines = [f"| Setting | FLOPs ({unit_name}) | FLOPs ratio |", "|---|---:|---:|"]
    lines += [f"| {r['label']} | {r['macs'] / unit:.2f} | {100 * r['ratio']:.1f}% |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- calibration
def prepare_samples(model, samples) -> list:
    """One prepared input per :class:`~mambaprune.data.readers.Sample` (batch of 1 each)."""
    return [model.prepare(s.image, s.question) for s in samples]


def calibrate(model, samples, out_dir=None, signal: str = "delta", progress: bool = True) -> dict:
    """DTP's calibration (Eq. 7-9) on ``samples`` (reader Samples); with ``out_dir``, writes
    ``calibration.json`` and the Std curve figure ``std_curve.png`` there. Returns the calibration as a dict
    (``std``, ``early_layer``, ``late_layer``, ``n_samples``, ``signal``, plus ``figure``)."""
    from .analysis.plots import plot_std_curve
    from .pruning.calibration import calibrate_dtp

    samples = list(samples)
    if not samples:
        raise ValueError("calibration needs at least one sample")
    result = calibrate_dtp(model, prepare_samples(model, samples), signal=signal, progress=progress)
    out = {"std": result.std_curve, "early_layer": result.early_layer, "late_layer": result.late_layer,
           "n_samples": result.n_samples, "signal": result.signal}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "calibration.json").write_text(json.dumps(out, indent=1))
        figure = out_dir / "std_curve.png"
        plot_std_curve(result.std_curve, result.early_layer, result.late_layer, figure,
                       title=f"Std of visual-token importance ({signal}), {result.n_samples} samples")
        out["figure"] = str(figure)
    return out


# ---------------------------------------------------------------------------------------------- analysis
def analysis_figures(model, sample, out_dir, method: str = "dtp", params: dict | None = None,
                     scatter_layers: Sequence[int] | None = None,
                     attention_layers: Sequence[int] | None = None) -> dict[str, str]:
    """Figures for one reader Sample into ``out_dir``; returns ``{name: path}``.

    * ``importance_scatter.png``: Eq. 6 importance of every visual token at ``scatter_layers`` (default: the
      first layer, DTP's early layer, the middle, the last), the top half in red (Fig. 4);
    * ``implicit_attention.png``: implicit attention (Eq. 5) of the unpruned model at ``attention_layers``
      (default: the first, the middle and the last layer; Fig. 5);
    * ``kept_tokens.png``: the visual tokens ``method`` keeps (after its first cut), over the image.
    """
    from .analysis import KeptTokenRecorder, implicit_attention_maps
    from .analysis.plots import importance_scatter, plot_implicit_attention, plot_kept_tokens
    from .pruning.calibration import importance_by_layer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_layer = model.lm.config.n_layer
    pruner = build(method, **(params or {}))
    pruner.start(model.lm.config)                        # resolves (and checks) its layers for this model
    prepared = model.prepare(sample.image, sample.question)
    paths = {}

    if scatter_layers is None:
        early = getattr(pruner, "resolve", lambda n: (n // 4, 0))(n_layer)[0]
        scatter_layers = sorted({0, early, n_layer // 2, n_layer - 1})
    by_layer = importance_by_layer(model, prepared)
    paths["importance_scatter"] = str(out_dir / "importance_scatter.png")
    importance_scatter({l: by_layer[l][0] for l in scatter_layers}, paths["importance_scatter"],
                       title=f"Δ importance of the visual tokens: {sample.question}")

    if attention_layers is None:
        attention_layers = sorted({0, n_layer // 2, n_layer - 1})
    maps = implicit_attention_maps(model.lm, list(attention_layers), inputs_embeds=prepared.inputs_embeds,
                                   attention_mask=prepared.attention_mask, is_visual=prepared.is_visual)
    paths["implicit_attention"] = str(out_dir / "implicit_attention.png")
    plot_implicit_attention(maps, paths["implicit_attention"], title="Implicit attention (Eq. 5), unpruned")

    recorder = KeptTokenRecorder(pruner)
    model.prefill(prepared, pruner=recorder)
    full = prepared.num_visual
    kept_layer = next((l for l in sorted(recorder.positions_by_layer)
                       if 0 < len(recorder.positions_by_layer[l][0]) < full), None)
    if kept_layer is not None:
        kept = recorder.positions_by_layer[kept_layer][0]
        paths["kept_tokens"] = str(out_dir / "kept_tokens.png")
        plot_kept_tokens(prepared.images[0].permute(1, 2, 0).numpy(), prepared.grid, kept, paths["kept_tokens"],
                         title=f"{method}: {len(kept)}/{full} visual tokens enter layer {kept_layer + 1}")
    return paths


def spread(samples: Sequence, n: int) -> list:
    """``n`` samples evenly spread over ``samples`` (every ``len // n``-th from the first; all if fewer)."""
    step = max(1, len(samples) // max(1, n))
    return list(samples[::step][:n])
