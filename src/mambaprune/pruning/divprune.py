"""DivPrune (Alvar et al., CVPR 2025) before the LLM: keep a maximally diverse subset of the visual tokens.

Greedy max-min diversity on the cosine distance ``1 - cos`` between the visual embeddings (the projector's
outputs, the sequence before layer 0): the first token is the one farthest from its nearest neighbour; each
next one is the candidate whose distance to the nearest already-chosen token is largest. Ties go to the
earlier token. The kept tokens go on in their original order; text tokens are never cut.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import KeepVisualAtLayer, keep_visual, visual_keep_counts
from .registry import register


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of ``k`` rows of ``features`` (n, d) chosen greedily for max-min cosine distance."""
    n = features.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    x = F.normalize(features.float(), dim=-1)
    dist = 1.0 - x @ x.T                                                     # (n, n) cosine distance
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    nearest = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=dist.device), float("inf")).min(1).values
    first = int(torch.argmax(nearest))
    chosen = [first]
    closest = dist[first].clone()                       # distance of every token to its nearest chosen one
    closest[first] = float("-inf")
    for _ in range(k - 1):
        nxt = int(torch.argmax(closest))
        chosen.append(nxt)
        closest = torch.minimum(closest, dist[nxt])
        closest[chosen] = float("-inf")
    return torch.sort(torch.tensor(chosen, device=features.device)).values


@register("divprune")
class DivPrune(KeepVisualAtLayer):
    def __init__(self, keep_ratio: float = 0.5, seed: int = 0):
        super().__init__(keep_ratio, 0, seed)

    def params(self):
        return dict(keep_ratio=self.keep_ratio)

    def act(self, seq, layer):
        counts = visual_keep_counts(seq, self.keep_ratio)
        chosen = torch.zeros_like(seq.mask)
        for b in range(seq.batch_size):
            idx = torch.nonzero(seq.is_visual[b] & seq.mask[b]).flatten()
            pick = max_min_diverse(seq.stream()[b, idx], int(counts[b]))
            chosen[b, idx[pick]] = True
        return keep_visual(seq, chosen)
