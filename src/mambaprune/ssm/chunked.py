"""The fast CPU selective scan: time-chunked, cache-blocked, exact.

Why it is fast. The reference materialises ``exp(delta*A)`` and ``delta*B*u`` for the whole sequence
((batch, d_inner, L, d_state) floats, ~75 MB for d_inner 1536 and L 760) and walks over them with strided
slices, so it is bound by memory traffic and per-step overhead. Here the sequence is cut into chunks of
``T`` steps; for one chunk the discretised tensors are built in preallocated, contiguous
(T, batch, d_state, d_inner) buffers that stay in the CPU cache, the recurrence runs over them with one
fused ``addcmul`` per step (into a state buffer), and the chunk's outputs come from one batched matmul
with C. Nothing of size (..., L, d_state) is ever allocated.

Why it is safe. The recurrence is evaluated exactly as the reference does: the only exponent is
``exp(delta_t * A) <= 1`` for each step (delta >= 0, A <= 0); there is no cumulative sum of log-decays and no
exponent of a positive number, so large ``delta * |A|`` underflows to an exact 0 decay instead of
overflowing. Results agree with the reference to fp32 rounding.

Autograd. :class:`_ChunkedScan` has a hand-written backward, a reverse-time scan over the same chunks:
with ``a_t = exp(delta_t A)`` and ``g_t = dL/dy_t`` the adjoint state is
``lam_t = C_t g_t^T + a_{t+1} * lam_{t+1}``, and then ``dC_t = sum_d g_t h_t``, ``du_t, dB_t`` from
``lam_t * (delta_t B_t u_t)``, and ``d(delta_t), dA`` from ``lam_t * h_{t-1} * a_t``. The forward saves only
the state at the start of every chunk; the backward recomputes the chunk's states from it.
"""
from __future__ import annotations

import torch

#: Target number of elements of one (T, batch, d_state, d_inner) chunk buffer: about 1 MB in fp32, which
#: gives T = 10 at d_inner 1536, d_state 16 (the fastest of 2^17..2^21 measured on a 2-core AVX-512 CPU).
_CHUNK_ELEMENTS = 1 << 18
_LOG2E = 1.4426950408889634


def chunk_length(batch: int, d_inner: int, d_state: int) -> int:
    """Chunk length T such that one chunk buffer holds about ``_CHUNK_ELEMENTS`` values (4 <= T <= 64)."""
    return max(4, min(64, _CHUNK_ELEMENTS // max(1, batch * d_inner * d_state)))


def _time_major(u, delta, A, B, C):
    """Contiguous time-major tensors used by forward and backward, from (batch, L, channels) inputs.

    Returns delta_t (L, b, 1, d), du_t = delta*u (L, b, 1, d), B_t, C_t (L, b, n), A^T (n, d) and
    ``A^T * log2(e)``, so that ``exp(delta*A)`` is computed as ``exp2(delta * A log2 e)`` (the same value to
    fp32 rounding; exp2 is about 2.7x cheaper than exp on AVX-512 CPUs). For batch 1 the (b, L, .) and
    (L, b, .) layouts share memory, so nothing is copied.
    """
    delta_t = delta.transpose(0, 1).contiguous().unsqueeze(2)
    du_t = (delta * u).transpose(0, 1).contiguous().unsqueeze(2)
    B_t = B.transpose(0, 1).contiguous()
    C_t = C.transpose(0, 1).contiguous()
    A_t = A.t().contiguous()
    return delta_t, du_t, B_t, C_t, A_t, A_t * _LOG2E


def _discretise(delta_t, du_t, B_t, A2_t, s, e, dA, dBu):
    """Fill dA[:m] = exp(delta*A) and dBu[:m] = delta*u*B for time steps s..e-1 (layout (m, b, n, d)).

    ``A2_t`` is A^T log2(e) (n, d); the exponent is taken as exp2 of ``delta * A2_t``.
    """
    m = e - s
    torch.mul(delta_t[s:e], A2_t, out=dA[:m])
    torch.exp2(dA[:m], out=dA[:m])
    torch.mul(du_t[s:e], B_t[s:e].unsqueeze(-1), out=dBu[:m])


def _run_chunk(h, dA_steps, dBu_steps, hs_steps, m):
    """The recurrence over one chunk: hs[t] = dA[t] * h_{t-1} + dBu[t]. Returns the last state (a view)."""
    for t in range(m):
        torch.addcmul(dBu_steps[t], dA_steps[t], h, out=hs_steps[t])
        h = hs_steps[t]
    return h


def _buffers(T, b, n, d, like):
    bufs = [like.new_empty(T, b, n, d) for _ in range(3)]
    return bufs, [list(x.unbind(0)) for x in bufs]


def scan_forward(u, delta, A, B, C, save_chunk_states=False, initial_state=None):
    """y (b, L, d) and last state (b, d, n) of the recurrence, all fp32, from u, delta (b, L, d) and
    B, C (b, L, n); optionally also the chunk-start states. ``initial_state`` (b, d, n): h_0 (zeros if None)."""
    b, L, d = u.shape
    n = A.shape[1]
    T = chunk_length(b, d, n)
    delta_t, du_t, B_t, C_t, _, A2_t = _time_major(u, delta, A, B, C)
    (dA, dBu, hs), (dA_s, dBu_s, hs_s) = _buffers(T, b, n, d, u)
    y = u.new_empty(L, b, d)
    h = u.new_zeros(b, n, d) if initial_state is None else initial_state.float().transpose(1, 2).contiguous()
    starts = []
    for s in range(0, L, T):
        e = min(s + T, L)
        m = e - s
        if save_chunk_states:
            starts.append(h.clone())
        _discretise(delta_t, du_t, B_t, A2_t, s, e, dA, dBu)
        h = _run_chunk(h, dA_s, dBu_s, hs_s, m)
        # y[t, b, :] = C_t[b, :] @ h_t[b, :, :]
        torch.bmm(C_t[s:e].reshape(m * b, 1, n), hs[:m].view(m * b, n, d), out=y[s:e].view(m * b, 1, d))
        if e < L:  # the next chunk overwrites hs[0]; keep the carried state out of its way
            h = h.clone()
    last = h.transpose(1, 2).contiguous()
    return y.transpose(0, 1), last, starts


def scan_backward(grad_y, grad_last, u, delta, A, B, C, starts):
    """Gradients (u, delta, A, B, C) of the recurrence by a reverse-time chunked scan (see module docstring);
    same (b, L, .) layouts as :func:`scan_forward`."""
    b, L, d = u.shape
    n = A.shape[1]
    T = chunk_length(b, d, n)
    delta_t, du_t, B_t, C_t, A_t, A2_t = _time_major(u, delta, A, B, C)
    g_t = grad_y.float().transpose(0, 1).contiguous()                     # (L, b, d)
    (dA, dBu, hs), (dA_s, dBu_s, hs_s) = _buffers(T, b, n, d, u)
    lam_buf = u.new_empty(T, b, n, d)
    lam_s = list(lam_buf.unbind(0))
    g_du = u.new_empty(L, b, d)
    g_delta_a = u.new_empty(L, b, d)
    gB = u.new_empty(L, b, n)
    gC = u.new_empty(L, b, n)
    gA_t = u.new_zeros(n, d)
    lam = u.new_zeros(b, n, d) if grad_last is None else grad_last.float().transpose(1, 2).contiguous()
    a_next = None                                                          # a_{t+1} for the last step of a chunk
    chunk_starts = list(range(0, L, T))
    for k in reversed(range(len(chunk_starts))):
        s = chunk_starts[k]
        e = min(s + T, L)
        m = e - s
        _discretise(delta_t, du_t, B_t, A2_t, s, e, dA, dBu)
        _run_chunk(starts[k], dA_s, dBu_s, hs_s, m)
        # Cg[t] = C_t (x) g_t, written into lam_buf, then the adjoint recurrence runs in place backwards.
        torch.bmm(C_t[s:e].reshape(m * b, n, 1), g_t[s:e].reshape(m * b, 1, d), out=lam_buf[:m].view(m * b, n, d))
        for t in reversed(range(m)):
            if a_next is not None:
                lam_s[t].addcmul_(a_next, lam)
            elif t == m - 1 and grad_last is not None:
                lam_s[t].add_(lam)
            lam = lam_s[t]
            a_next = dA_s[t]
        lam_c = lam_buf[:m]
        h_c = hs[:m]
        # dC_t[b, n] = sum_d h_t[b, n, d] g_t[b, d]
        torch.bmm(h_c.view(m * b, n, d), g_t[s:e].reshape(m * b, d, 1), out=gC[s:e].view(m * b, n, 1))
        # through dBu = (delta*u) B:  g_du[t, b, d] = sum_n lam B ;  gB[t, b, n] = sum_d lam (delta*u)
        torch.bmm(B_t[s:e].reshape(m * b, 1, n), lam_c.view(m * b, n, d), out=g_du[s:e].view(m * b, 1, d))
        torch.bmm(lam_c.view(m * b, n, d), du_t[s:e].reshape(m * b, d, 1), out=gB[s:e].view(m * b, n, 1))
        # through dA = exp(delta A): P = lam_t * h_{t-1} * a_t, then d(delta) = sum_n P A and dA = sum_t P delta.
        h_prev = hs.new_empty(m, b, n, d)
        h_prev[0] = starts[k]
        if m > 1:
            h_prev[1:] = h_c[:m - 1]
        P = h_prev.mul_(lam_c).mul_(dA[:m])
        g_delta_a[s:e] = (P * A_t).sum(2)
        gA_t += (P * delta_t[s:e]).sum((0, 1))
        lam = lam.clone()
        a_next = a_next.clone()
    g_du = g_du.transpose(0, 1)
    grad_u = g_du * delta
    grad_delta = g_delta_a.transpose(0, 1) + g_du * u
    return grad_u, grad_delta, gA_t.t(), gB.transpose(0, 1), gC.transpose(0, 1)


class _ChunkedScan(torch.autograd.Function):
    """Autograd wrapper: forward keeps the chunk-start states, backward is :func:`scan_backward`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        needs_grad = any(ctx.needs_input_grad)
        y, last, starts = scan_forward(u, delta, A, B, C, save_chunk_states=needs_grad)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, *starts)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, *starts = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(u)
        return scan_backward(grad_y, grad_last, u, delta, A, B, C, starts)


def scan_chunked(u, delta, A, B, C, initial_state=None):
    """fp32 y (b, L, d) and last state (b, d, n) of ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``,
    ``y_t = <C_t, h_t>``; differentiable (when no ``initial_state`` is given). Inputs in (batch, L, channels)
    layout: u, delta (b, L, d), B, C (b, L, n); fp32, delta already post-softplus; ``initial_state``
    (b, d, n) is h_0."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (u, delta, A, B, C)):
        if initial_state is not None:
            raise ValueError("scan_chunked: gradients through a scan with an initial_state are not implemented")
        return _ChunkedScan.apply(u, delta, A, B, C)
    y, last, _ = scan_forward(u, delta, A, B, C, initial_state=initial_state)
    return y, last
