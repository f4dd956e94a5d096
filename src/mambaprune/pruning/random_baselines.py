"""Random-Pre and Random-Intra (UniPruneBench, seed 004): a seeded uniform subset of the visual tokens.

``random_pre`` drops them before the LLM (layer 0 is the first on the reduced sequence); ``random_intra`` at
``layer`` (2 by default). The kept tokens stay in their original order; text tokens are never cut. The draw
comes from the pruner's generator, re-seeded with ``seed`` at every forward pass, so a run is deterministic.
"""
from __future__ import annotations

from .base import Pruner, check_ratio, keep_visual, num_to_keep, random_visual_subset, resolve_layer, \
    visual_keep_counts
from .registry import register


class _RandomVisual(Pruner):
    def __init__(self, keep_ratio: float, layer: int, seed: int):
        super().__init__(seed)
        self.keep_ratio = check_ratio(keep_ratio)
        self.layer_spec = layer

    def params(self):
        return dict(keep_ratio=self.keep_ratio, layer=self.layer_spec, seed=self.seed)

    def setup(self, n_layer):
        return {resolve_layer(self.layer_spec, n_layer, "layer")}

    def act(self, seq, layer):
        counts = visual_keep_counts(seq, self.keep_ratio)
        return keep_visual(seq, random_visual_subset(seq, counts, self.generator))

    def expected_tokens(self, n_layer, n_visual, n_text):
        k = resolve_layer(self.layer_spec, n_layer, "layer")
        kept = num_to_keep(n_visual, self.keep_ratio)
        return [n_visual + n_text if l < k else kept + n_text for l in range(n_layer)]


@register("random_pre")
class RandomPre(_RandomVisual):
    def __init__(self, keep_ratio: float = 0.5, seed: int = 0):
        super().__init__(keep_ratio, 0, seed)

    def params(self):
        return dict(keep_ratio=self.keep_ratio, seed=self.seed)


@register("random_intra")
class RandomIntra(_RandomVisual):
    def __init__(self, keep_ratio: float = 0.5, layer: int = 2, seed: int = 0):
        super().__init__(keep_ratio, layer, seed)
