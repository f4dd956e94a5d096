"""Random-Pre and Random-Intra (UniPruneBench, seed 004): a seeded uniform subset of the visual tokens.

``random_pre`` drops them before the LLM (layer 0 is the first on the reduced sequence); ``random_intra`` at
``layer`` (2 by default). The kept tokens stay in their original order; text tokens are never cut. The draw
comes from the pruner's generator, re-seeded with ``seed`` at every forward pass, so a run is deterministic.
"""
from __future__ import annotations

from .base import KeepVisualAtLayer, keep_visual, random_visual_subset, visual_keep_counts
from .registry import register


class _RandomVisual(KeepVisualAtLayer):
    def params(self):
        return dict(keep_ratio=self.keep_ratio, layer=self.layer_spec, seed=self.seed)

    def act(self, seq, layer):
        counts = visual_keep_counts(seq, self.keep_ratio)
        return keep_visual(seq, random_visual_subset(seq, counts, self.generator))


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
