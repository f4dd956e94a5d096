"""A parallel-in-time selective scan in plain PyTorch: O(log L) kernel launches, for GPUs without Triton.

The recurrence ``h_t = a_t h_{t-1} + b_t`` with ``a_t = exp(Δ_t A)`` and ``b_t = Δ_t B_t u_t`` is a prefix
"sum" of the pairs ``(a_t, b_t)`` under the associative combine of two consecutive steps

    (a_1, b_1) then (a_2, b_2)  =  (a_2 a_1,  a_2 b_1 + b_2)

(Blelloch 1990, "Prefix sums and their applications", on first-order linear recurrences; the same binary
operator as the parallel scan of S5, Smith et al. 2023). It is evaluated by Hillis & Steele's inclusive scan: at level k
(offset 2^k) every position t >= 2^k combines its pair with that of t - 2^k, so after ceil(log2 L) levels
position t holds h_t (with h_0 folded into b_1 as ``b_1 + a_1 h_0``). Each level is a handful of whole-tensor
ops, so the number of launches grows with log L, not L.

Numerics: the only exponent is ``exp(Δ_t A) <= 1`` of one step; the combined decays are products of such
factors (never the exponent of a cumulative sum of log-decays), so a large Δ|A| underflows to 0, never
overflows. The sums are associated differently from the sequential loop, so results agree with it to fp32
rounding, not bit for bit.

Memory: it materialises (batch, L, channels, d_state) tensors, which is fine on a GPU; channels are taken in
blocks so that one block's tensors hold at most ``_BLOCK_ELEMENTS`` values. It is differentiable by autograd.
"""
from __future__ import annotations

import torch

#: At most this many values in one (batch, L, channel block, d_state) tensor (256 MB in fp32).
_BLOCK_ELEMENTS = 1 << 26


def _scan_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive scan over dim 1 of the pairs (a, b) under (a2 a1, a2 b1 + b2); returns the b part (= h)."""
    length = a.shape[1]
    k = 1
    while k < length:
        b_new = b.clone()
        b_new[:, k:].addcmul_(a[:, k:], b[:, :-k])           # b_t <- a_t b_{t-k} + b_t
        if 2 * k < length:                                    # the decays are not needed after the last level
            a_new = a.clone()
            a_new[:, k:].mul_(a[:, :-k])                      # a_t <- a_t a_{t-k}
            a = a_new
        b = b_new
        k *= 2
    return b


def scan_parallel(u, delta, A, B, C, initial_state=None):
    """fp32 y (b, L, d) and last state (b, d, n) of ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t``, ``y_t = <C_t, h_t>``.

    Same contract as :func:`mambaprune.ssm.chunked.scan_chunked`: inputs in (batch, L, channels) layout, fp32,
    ``delta`` already after bias and softplus; u, delta (b, L, d); B, C (b, L, n); A (d, n); ``initial_state``
    (b, d, n) is h_0 (zeros if None).
    """
    batch, length, dim = u.shape
    dstate = A.shape[1]
    block = max(1, _BLOCK_ELEMENTS // max(1, batch * length * dstate))
    du = delta * u
    ys, lasts = [], []
    for s in range(0, dim, block):
        e = min(s + block, dim)
        a = torch.exp(delta[:, :, s:e, None] * A[s:e])                       # (b, L, blk, n)
        b = du[:, :, s:e, None] * B[:, :, None, :]                            # (b, L, blk, n)
        if initial_state is not None:
            b[:, 0] += a[:, 0] * initial_state[:, s:e].float()
        h = _scan_pairs(a, b)
        # y[b, t, d] = sum_n h[b, t, d, n] C[b, t, n]
        ys.append(torch.matmul(h, C[:, :, :, None]).squeeze(-1))
        lasts.append(h[:, -1])
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)
    last = lasts[0] if len(lasts) == 1 else torch.cat(lasts, dim=1)
    return y, last.contiguous()
