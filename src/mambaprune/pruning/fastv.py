"""FastV as the DTP paper ran it in a Mamba MLLM (seed 000, Section 5.1).

At layer ``layer`` (K = 2) keep the top ``keep_ratio`` (the paper's r) of the visual tokens, ranked by the
Δ-importance (Eq. 6) of layer K - 1, the last layer that saw them all (FastV's own convention: the attention of
layer K - 1 decides what layer K sees; in a Mamba model Δ stands in for the attention the last token pays).
Text tokens are never cut; the order is kept.
"""
from __future__ import annotations

from .base import Pruner, check_ratio, keep_visual, num_to_keep, resolve_layer, topk_in_order, visual_keep_counts
from .registry import register


@register("fastv")
class FastV(Pruner):
    signal = "delta"

    def __init__(self, keep_ratio: float = 0.5, layer: int = 2, seed: int = 0):
        super().__init__(seed)
        self.keep_ratio = check_ratio(keep_ratio)
        self.layer_spec = layer

    def params(self):
        return dict(keep_ratio=self.keep_ratio, layer=self.layer_spec)

    def setup(self, n_layer):
        k = resolve_layer(self.layer_spec, n_layer, "layer")
        if k < 1:
            raise ValueError("fastv needs layer >= 1: its ranking reads the Δ of layer K - 1")
        return {k}

    def act(self, seq, layer):
        chosen = topk_in_order(self.importance(seq), seq.is_visual & seq.mask, visual_keep_counts(seq, self.keep_ratio))
        return keep_visual(seq, chosen)

    def expected_tokens(self, n_layer, n_visual, n_text):
        k = resolve_layer(self.layer_spec, n_layer, "layer")
        kept = num_to_keep(n_visual, self.keep_ratio)
        return [n_visual + n_text if l < k else kept + n_text for l in range(n_layer)]
