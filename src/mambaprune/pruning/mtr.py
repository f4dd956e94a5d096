"""MTR (seed 003, Algorithm 1) inside the LLM: merge the least important visual tokens instead of dropping them.

At layer ``layer`` (K; the merged sequence is what layer K reads, Algorithm 1's ``x^l`` from ``y^{l-1}`` and
``s^{l-1}``) the visual tokens are sorted by the Δ-importance of layer K - 1 (Eq. 8 of MTR = Eq. 6 of DTP; a
causal LLM has one scan direction) and split into three groups, from most to least important:

* ``keep``: as many tokens as the source group (Algorithm 1 gives both k%), capped at half of the survivors so
  that the target group is never empty, unchanged;
* ``target``: the rest of the survivors;
* ``source``: the ``n_visual - round(keep_ratio * n_visual)`` least important, each merged into its most
  cosine-similar target token (bipartite matching, similarity on the residual stream ``hidden + residual``);
  a target and all the sources matched to it become their plain mean (Algorithm 1, line 8).

The merge is applied to the hidden state and to the residual alike; survivors go on in their original order
(a merged token takes its target's position). Text tokens are untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import KeepVisualAtLayer, num_to_keep
from .registry import register


def mtr_groups(scores: torch.Tensor, n_keep_total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, target, source) index tensors for ``n`` tokens with importances ``scores`` (n,)."""
    n = scores.shape[0]
    n_source = n - max(0, min(int(n_keep_total), n))
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    survivors = n - n_source
    n_keep = min(n_source, survivors // 2) if n_source > 0 else survivors
    return order[:n_keep], order[n_keep:survivors], order[survivors:]


def bipartite_mean_merge(features: torch.Tensor, values: list[torch.Tensor], target: torch.Tensor,
                         source: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Merge every ``source`` row into its most cosine-similar ``target`` row (similarity on ``features``).

    Returns, for each tensor in ``values`` ((n, d) each), the merged target rows (len(target), d) (each the
    mean of the target and its matched sources), and the match (len(source),) as indices into ``target``.
    """
    if source.numel() == 0:
        return [v[target] for v in values], torch.zeros(0, dtype=torch.long, device=features.device)
    if target.numel() == 0:
        raise ValueError("bipartite_mean_merge: no target token to merge into")
    f = F.normalize(features.float(), dim=-1)
    match = (f[source] @ f[target].T).argmax(dim=1)                          # (n_source,)
    count = torch.ones(target.numel(), device=features.device).index_add_(
        0, match, torch.ones(source.numel(), device=features.device))
    merged = []
    for v in values:
        total = v[target].float().index_add(0, match, v[source].float())
        merged.append((total / count[:, None]).to(v.dtype))
    return merged, match


@register("mtr")
class MTR(KeepVisualAtLayer):
    signal = "delta"

    def __init__(self, keep_ratio: float = 0.5, layer: int = 2, seed: int = 0):
        super().__init__(keep_ratio, layer, seed)

    def act(self, seq, layer):
        scores = self.importance(seq)
        stream = seq.stream()
        hidden, residual = seq.hidden.clone(), seq.residual.clone()
        keep_mask = seq.mask & ~seq.is_visual
        for b in range(seq.batch_size):
            idx = torch.nonzero(seq.is_visual[b] & seq.mask[b]).flatten()
            keep, target, source = mtr_groups(scores[b, idx], num_to_keep(idx.numel(), self.keep_ratio))
            if target.numel():                         # keep_ratio 0 leaves no target: the sources just go
                (h, r), _ = bipartite_mean_merge(stream[b, idx], [hidden[b, idx], residual[b, idx]], target,
                                                 source)
                hidden[b, idx[target]], residual[b, idx[target]] = h, r
            keep_mask[b, idx[keep]] = True
            keep_mask[b, idx[target]] = True
        return seq.replace(hidden=hidden, residual=residual).select(keep_mask)
