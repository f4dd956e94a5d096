"""Analyses of the DTP paper: implicit attention (Eq. 3-5), the Std curve, importance scatter and attention
heatmaps (Figures 3-5), and the kept visual tokens over the image for any method at any layer."""
from .hooks import KeptTokenRecorder, ObservingHook
from .implicit_attention import (LayerImplicitAttention, implicit_attention, implicit_attention_maps,
                                 layer_implicit_attention, ssd_implicit_attention)
from .plots import (ImplicitAttentionPlot, StdCurvePlot, TopTokens, importance_scatter, plot_implicit_attention,
                    plot_kept_tokens, plot_std_curve)

__all__ = [
    "implicit_attention", "ssd_implicit_attention", "layer_implicit_attention", "implicit_attention_maps",
    "LayerImplicitAttention",
    "KeptTokenRecorder", "ObservingHook",
    "plot_std_curve", "StdCurvePlot", "importance_scatter", "TopTokens", "plot_implicit_attention",
    "ImplicitAttentionPlot", "plot_kept_tokens",
]
