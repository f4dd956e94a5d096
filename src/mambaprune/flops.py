"""Theoretical cost of a Mamba LM, counted from per-layer token counts, under one stated convention.

Convention (multiply-adds, "MACs"; FLOPs = 2 x MACs where this project prints FLOPs):

* per token and layer: in_proj ``2*d_model*d_inner``, depthwise conv ``d_conv*d_inner``,
  x_proj ``d_inner*(dt_rank + 2*d_state)``, dt_proj ``dt_rank*d_inner``, out_proj ``d_inner*d_model``;
* the selective scan as the VMamba counter counts it, ``9*d_inner*d_state``, plus ``d_inner`` each for the
  D skip and the silu(z) gate;
* norms, activations, softplus and the embedding lookup are not counted; the LM head is counted for the
  positions whose logits are computed (``d_model * vocab`` each).

The vision tower and projector of a multimodal model are not part of this count (the DTP paper's
convention: FLOPs of the language model alone).
"""
from __future__ import annotations

from typing import Sequence


def layer_macs_per_token(config) -> int:
    """Multiply-adds of one Mamba layer for one token (see module docstring)."""
    d, di, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv
    projections = 2 * d * di + di * (r + 2 * n) + r * di + di * d
    return projections + k * di + 9 * di * n + 2 * di


def lm_macs(config, tokens_per_layer: Sequence[int], head_positions: int = 1) -> int:
    """Multiply-adds of a prefill in which layer ``l`` processed ``tokens_per_layer[l]`` tokens."""
    if len(tokens_per_layer) != config.n_layer:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries, the model has "
                         f"{config.n_layer} layers")
    return layer_macs_per_token(config) * int(sum(tokens_per_layer)) + head_positions * config.d_model * \
        config.padded_vocab_size
