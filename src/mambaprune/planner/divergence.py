"""The planner's divergence: DOP's first-token divergence (Eq. 9-10) and Spearman's rank correlation
(Appendix E.1), with its average-rank helper.

**The divergence** (Eq. 9-10, :func:`first_token_divergence`): the first generated token's distribution (the
prefill's last-position logits, cut to the real vocabulary), restricted to the top ``k = 10`` tokens of the
unpruned distribution, each side ``+ eps`` (``1e-8``) and renormalised, then ``KL(unpruned || pruned)``; averaged
over the calibration samples.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["DEFAULT_EPS", "DEFAULT_K", "first_token_divergence", "spearman"]


#: DOP's top-k and epsilon (Appendix C.2)
DEFAULT_K = 10
DEFAULT_EPS = 1e-8


def first_token_divergence(logits_ref, logits_pruned, k: int = DEFAULT_K, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """DOP's output divergence (Appendix C.2, Eq. 9-10) between two next-token logit tensors.

    ``Pr = softmax(logits)`` on each side; ``X_top`` = the ``k`` most probable tokens of the unpruned (reference)
    distribution (Eq. 9; ties: the lower token id; ``k`` is capped at the vocabulary size); ``p = Pr[X_top]`` on each
    side, then ``p~ = (p + eps) / ||p + eps||_1``; the divergence is ``KL(p~_ref || p~_pruned)`` (Eq. 10).

    ``logits_*``: (vocab,) or (batch, vocab). Returns a 0-d tensor or one value per row (float64). With
    ``eps = 0`` a top-k token the pruned model gives probability 0 makes the divergence infinite; the epsilon
    keeps it finite.
    """
    ref = torch.as_tensor(logits_ref).detach().double()
    pru = torch.as_tensor(logits_pruned).detach().double()
    if ref.shape != pru.shape:
        raise ValueError(f"the logits differ in shape: {tuple(ref.shape)} and {tuple(pru.shape)}")
    if ref.dim() not in (1, 2) or ref.shape[-1] < 1:
        raise ValueError(f"expected (vocab,) or (batch, vocab) logits, got shape {tuple(ref.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    single = ref.dim() == 1
    if single:
        ref, pru = ref[None], pru[None]
    k = min(k, ref.shape[-1])
    pr_ref, pr_pru = torch.softmax(ref, -1), torch.softmax(pru, -1)
    top = torch.sort(pr_ref, dim=-1, descending=True, stable=True).indices[:, :k]          # Eq. 9
    p = pr_ref.gather(-1, top) + eps
    q = pr_pru.gather(-1, top) + eps
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    kl = (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)                                   # Eq. 10
    return kl[0] if single else kl


def _average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n; tied values share the mean of the ranks they span."""
    n = len(values)
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Appendix E.1): Pearson's correlation of the average ranks (ties share the mean
    rank, as scipy's ``spearmanr`` does); without ties it equals ``1 - 6 sum d^2 / (n (n^2 - 1))``. NaN when one
    side is constant (the correlation is undefined)."""
    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of one length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise ValueError("spearman needs at least two pairs")
    if any(math.isnan(v) for v in x + y):
        raise ValueError("spearman got NaN values")
    rx, ry = _average_ranks(x), _average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)
