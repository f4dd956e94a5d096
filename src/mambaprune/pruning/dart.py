"""DART (Wen et al., 2025) as the DTP paper ran it in a Mamba MLLM: keep the visual tokens least like the pivots.

At layer ``layer`` (K = 2; layer K is the first on the reduced sequence) the budget is
``round(keep_ratio * n_visual)`` visual tokens. Pivots: the ``pivots`` (8) visual tokens of largest L2 norm (they
are kept). Then, pivot by pivot, the remaining candidates least cosine-similar to the pivot are added, an equal
share per pivot (``ceil(rest / n_pivots)``), until the budget is met; a candidate is taken once. If the pool runs
empty the budget is simply not exceeded (never an error); a budget below the pivot count keeps the largest-norm
pivots only. Kept tokens stay in their original order; text tokens are never cut.

The stand-in for the attention keys: DART reads the keys of layer K; a Mamba layer has none, so the features
used here are the residual stream layer K reads (``hidden + residual`` after layer K - 1, before its RMSNorm).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import KeepVisualAtLayer, keep_visual, visual_keep_counts
from .registry import register


def dart_select(features: torch.Tensor, budget: int, num_pivots: int = 8) -> torch.Tensor:
    """Indices (ascending) of the ``budget`` rows of ``features`` (n, d) DART keeps (module docstring)."""
    n = features.shape[0]
    budget = max(0, min(int(budget), n))
    if budget == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    norms = features.float().norm(dim=-1)
    p = min(num_pivots, budget)
    pivots = torch.sort(norms, descending=True, stable=True).indices[:p]
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    taken[pivots] = True
    rest = budget - p
    x = F.normalize(features.float(), dim=-1)
    share = math.ceil(rest / p) if rest > 0 else 0
    for piv in pivots.tolist():
        if rest <= 0:
            break
        sim = (x @ x[piv]).masked_fill(taken, float("inf"))
        m = min(share, rest, int((~taken).sum()))
        if m == 0:
            break                                                            # pool empty: stop, no error
        pick = torch.sort(sim, stable=True).indices[:m]
        taken[pick] = True
        rest -= m
    return torch.nonzero(taken).flatten()


@register("dart")
class DART(KeepVisualAtLayer):
    def __init__(self, keep_ratio: float = 0.5, layer: int = 2, pivots: int = 8, seed: int = 0):
        super().__init__(keep_ratio, layer, seed)
        if isinstance(pivots, bool) or not isinstance(pivots, int) or pivots < 1:
            raise ValueError(f"pivots must be a positive integer, got {pivots!r}")
        self.pivots = pivots

    def params(self):
        return dict(keep_ratio=self.keep_ratio, layer=self.layer_spec, pivots=self.pivots)

    def act(self, seq, layer):
        counts = visual_keep_counts(seq, self.keep_ratio)
        stream = seq.stream()
        chosen = torch.zeros_like(seq.mask)
        for b in range(seq.batch_size):
            idx = torch.nonzero(seq.is_visual[b] & seq.mask[b]).flatten()
            chosen[b, idx[dart_select(stream[b, idx], int(counts[b]), self.pivots)]] = True
        return keep_visual(seq, chosen)
