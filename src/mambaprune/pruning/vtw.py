"""VTW, visual token withdrawal (as the DTP paper ran it, seed 000 Section 5.1).

Every visual token is dropped from layer ``layer`` (K) on: layers ``0 .. K-1`` see them, layer K and later do
not; decoding is untouched. K is either given or searched (:func:`mambaprune.pruning.calibration.search_vtw_layer`:
the first layer, from layer 5 up, whose mean first-token KL(P_withdrawn || P_full) over calibration samples is
at most η). ``layer = n_layer`` means "never" (the unpruned model).
"""
from __future__ import annotations

from .base import Pruner, resolve_layer
from .registry import register


@register("vtw")
class VTW(Pruner):
    def __init__(self, layer: int | float = 0.7, seed: int = 0):
        super().__init__(seed)
        self.layer_spec = layer

    def params(self):
        return dict(layer=self.layer_spec)

    def setup(self, n_layer):
        k = resolve_layer(self.layer_spec, n_layer, "layer", allow_end=True)
        return {k} - {n_layer}

    def act(self, seq, layer):
        return seq.select(seq.mask & ~seq.is_visual)

    def expected_tokens(self, n_layer, n_visual, n_text):
        k = resolve_layer(self.layer_spec, n_layer, "layer", allow_end=True)
        return [n_visual + n_text if l < k else n_text for l in range(n_layer)]
