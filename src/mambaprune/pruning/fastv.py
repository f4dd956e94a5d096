"""FastV as the DTP paper ran it in a Mamba MLLM (seed 000, Section 5.1).

At layer ``layer`` (K = 2) keep the top ``keep_ratio`` (the paper's r) of the visual tokens, ranked by the
Δ-importance (Eq. 6) of layer K - 1, the last layer that saw them all (FastV's own convention: the attention of
layer K - 1 decides what layer K sees; in a Mamba model Δ stands in for the attention the last token pays).
Text tokens are never cut; the order is kept.
"""
from __future__ import annotations

from .base import KeepVisualAtLayer, keep_visual, topk_in_order, visual_keep_counts
from .registry import register


@register("fastv")
class FastV(KeepVisualAtLayer):
    signal = "delta"

    def __init__(self, keep_ratio: float = 0.5, layer: int = 2, seed: int = 0):
        super().__init__(keep_ratio, layer, seed)

    def act(self, seq, layer):
        chosen = topk_in_order(self.importance(seq), seq.is_visual & seq.mask, visual_keep_counts(seq, self.keep_ratio))
        return keep_visual(seq, chosen)
