"""DTP: Delta-guided Two-stage Pruning (seed 000, Section 4).

Token importance (Eq. 6): ``s_j = (1/D) sum_d Δ_{j,d}``, the mean over the d_inner channels of
Δ = softplus(dt_proj(dt)) of one layer, read in that layer's mixer (``TokenSequence.signals["delta"]``). In a
Mamba-2 layer Δ is one value per head, shared by the head's headdim channels, so the same mean over channels is
the mean over heads (what its mixer reports); the method reads the signal and is the same for both layer kinds.

Two stages, in the terms of the pruning convention of :mod:`mambaprune.pruning.base` (layer ``k`` is the first
layer that processes a reduced sequence):

* **selective pruning at ``early_layer``**: the visual tokens are ranked by the importance of layer
  ``early_layer`` itself (the layer Eq. 8 picks by its Std), computed in that layer's mixer from every token it
  received; right after ``early_layer`` has run, only the top ``keep_ratio`` of the visual tokens go on (text
  tokens are never cut), in their original order, hidden state and residual alike. Layer ``early_layer + 1`` is
  the first on the reduced sequence (so DTP's decision is the base convention's "act at ``early_layer + 1``").
* **complete pruning at ``late_layer``**: layer ``late_layer`` (``k_late`` of Eq. 9, the first layer of the high-Std
  regime) and every later layer process no visual token at all.

Ablations (Tables 4-6): ``signal`` in ``delta`` (default), ``B``, ``C``, ``y``; ``selection`` in ``topk_visual``
(default), ``topk_all`` (rank every token, text included, keeping as many tokens in total as ``topk_visual``
keeps), ``random`` (a seeded uniform subset of the visual tokens, same count); ``late_pruning`` on/off.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import (Pruner, check_ratio, keep_visual, num_to_keep, random_visual_subset, resolve_layer,
                   topk_in_order, visual_keep_counts)
from .registry import register
from .sequence import SIGNAL_NAMES

SELECTIONS = ("topk_visual", "topk_all", "random")


def delta_importance(delta: torch.Tensor) -> torch.Tensor:
    """Eq. 6: per-token importance, the mean of Δ over its last (channel) dimension: (..., L, D) -> (..., L)."""
    return delta.float().mean(-1)


def layer_std(importance: torch.Tensor) -> torch.Tensor:
    """Eq. 7: the population standard deviation (1/N) of one layer's N visual-token importances."""
    s = importance.float().reshape(-1)
    if s.numel() == 0:
        raise ValueError("layer_std needs at least one visual token")
    return torch.sqrt(((s - s.mean()) ** 2).mean())


def select_layers(std_per_layer: Sequence[float] | torch.Tensor, num_layers: int) -> tuple[int, int]:
    """Eq. 8-9: (early_layer, late_layer) from the layer-wise Std curve of token importance, layers from 0.

    * ``early_layer = argmin_l Std_l`` over ``0 <= l <= int(0.25 L)`` (Eq. 8);
    * ``late_layer = argmax_l |Std_{l+1} - Std_l| + 1`` over ``int(0.7 L) <= l < L - 1`` (Eq. 9).

    Rounding convention: both range bounds are ``int(fraction * L)`` (floor). With L = 64 the early candidates
    are 0..16 and the late candidates l = 44..62, so the paper's late layer 45 (l = 44) is reachable; a ceiling
    (45) would make it unreachable. Ties go to the smallest l. ``std_per_layer`` must hold exactly ``num_layers``
    finite values, and ``num_layers >= 3`` (the late range must not be empty).
    """
    std = torch.as_tensor(std_per_layer, dtype=torch.float64).reshape(-1)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 3:
        raise ValueError(f"num_layers must be an integer >= 3, got {num_layers!r}")
    if std.numel() != num_layers:
        raise ValueError(f"the Std curve has {std.numel()} values, expected one per layer ({num_layers})")
    if not bool(torch.isfinite(std).all()):
        raise ValueError("the Std curve holds NaN or infinite values")
    early_hi = int(0.25 * num_layers)
    early = int(torch.argmin(std[: early_hi + 1]))                   # first minimum
    late_lo = min(int(0.7 * num_layers), num_layers - 2)
    jumps = (std[late_lo + 1:] - std[late_lo:-1]).abs()               # |Std_{l+1} - Std_l|, l = late_lo..L-2
    late = late_lo + int(torch.argmax(jumps)) + 1
    return early, late


@register("dtp")
class DTP(Pruner):
    """DTP (module docstring). ``early_layer``/``late_layer``: int layer indices or float fractions of the
    depth (``int(f * L)``); the defaults 0.25 and 0.7 stand in until ``mambaprune calibrate`` gives Eq. 8-9's
    layers for the model at hand (``calibration.calibrate_dtp``)."""

    def __init__(self, keep_ratio: float = 0.5, early_layer: int | float = 0.25, late_layer: int | float = 0.7,
                 signal: str = "delta", selection: str = "topk_visual", late_pruning: bool = True, seed: int = 0):
        super().__init__(seed)
        self.keep_ratio = check_ratio(keep_ratio)
        if signal not in SIGNAL_NAMES:
            raise ValueError(f"signal must be one of {SIGNAL_NAMES}, got {signal!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self.early_spec, self.late_spec = early_layer, late_layer
        self.signal_name, self.selection, self.late_pruning = signal, selection, bool(late_pruning)
        self.signal = None if selection == "random" else signal
        self.early_layer = self.late_layer = None

    def params(self):
        return dict(keep_ratio=self.keep_ratio, early_layer=self.early_spec, late_layer=self.late_spec,
                    signal=self.signal_name, selection=self.selection, late_pruning=self.late_pruning,
                    seed=self.seed)

    def resolve(self, n_layer: int) -> tuple[int, int]:
        """(early_layer, late_layer) for an ``n_layer``-layer model; late is ``n_layer`` when switched off."""
        early = resolve_layer(self.early_spec, n_layer, "early_layer")
        if early > n_layer - 2:
            raise ValueError(f"early_layer = {early} leaves no layer after it to prune (model has {n_layer})")
        late = resolve_layer(self.late_spec, n_layer, "late_layer", allow_end=True) if self.late_pruning \
            else n_layer
        if late <= early:
            raise ValueError(f"late_layer ({late}) must come after early_layer ({early})")
        return early, late

    def setup(self, n_layer):
        self.early_layer, self.late_layer = self.resolve(n_layer)
        return {self.early_layer + 1, self.late_layer} - {n_layer}

    def scored_layers(self):
        return set() if self.early_layer is None else {self.early_layer + 1}

    def act(self, seq, layer):
        if layer == self.late_layer:                                   # complete pruning
            return seq.select(seq.mask & ~seq.is_visual)
        counts = visual_keep_counts(seq, self.keep_ratio)
        if self.selection == "random":
            return keep_visual(seq, random_visual_subset(seq, counts, self.generator))
        scores = self.importance(seq)
        if self.selection == "topk_visual":
            return keep_visual(seq, topk_in_order(scores, seq.is_visual & seq.mask, counts))
        total = counts + (seq.mask & ~seq.is_visual).sum(1)            # topk_all: same number of tokens
        return seq.select(topk_in_order(scores, seq.mask, total))

    def expected_tokens(self, n_layer, n_visual, n_text):
        early, late = self.resolve(n_layer)
        kept = num_to_keep(n_visual, self.keep_ratio)
        return [n_visual + n_text if l <= early else (kept + n_text if l < late else n_text)
                for l in range(n_layer)]
