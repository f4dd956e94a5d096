"""The fast CPU selective scan: time-chunked, cache-blocked, exact.

Why it is fast. The reference materialises ``exp(delta*A)`` and ``delta*B*u`` for the whole sequence
((batch, d_inner, L, d_state) floats, ~75 MB for d_inner 1536 and L 760) and walks over them with strided
slices, so it is bound by memory traffic and per-step overhead. Here the sequence is cut into chunks of
``T`` steps; for one chunk the discretised tensors are built in preallocated, contiguous
(T, batch, d_state, d_inner) buffers (three multi-threaded calls for the whole chunk), the recurrence runs
over them in place with a single ``torch._foreach_addcmul_`` call (see :func:`_recurrence`), and the chunk's
outputs come from one batched matmul with C. The loop makes five PyTorch calls per chunk and nothing of size
(..., L, d_state) is ever allocated.

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

#: Target number of elements of one (T, batch, d_state, d_inner) chunk buffer (fp32: 2 MB), which gives
#: T = 21 at d_inner 1536, d_state 16. Measured in the 130M-sized prefill on a 2-core AVX-512 CPU: chunks of
#: 16 to 32 steps were within noise of each other, 8 steps about 5% slower (more calls per step).
_CHUNK_ELEMENTS = 1 << 19
_LOG2E = 1.4426950408889634


def chunk_length(batch: int, d_inner: int, d_state: int) -> int:
    """Chunk length T such that one chunk buffer holds about ``_CHUNK_ELEMENTS`` values (4 <= T <= 64)."""
    return max(4, min(64, _CHUNK_ELEMENTS // max(1, batch * d_inner * d_state)))


def _foreach_runs_in_order() -> bool:
    """Whether ``torch._foreach_addcmul_`` on CPU applies its list elements one after the other, so that an
    element may read the result of the previous one.

    That is how ATen's CPU path is written (``foreach_tensor_addcmul_scalar_slow_`` in
    ``aten/src/ATen/native/ForeachOpsKernels.cpp`` loops ``input[i].addcmul_(tensors1[i], tensors2[i])``).
    It is checked once, on a three-step recurrence; should a PyTorch version change it (or refuse lists
    that overlap), the scan falls back to one ``addcmul_`` call per step (the same values, slower).
    """
    h = torch.ones(3, 1)
    steps = list(h.unbind(0))
    two = torch.full((1,), 2.0)
    try:
        torch._foreach_addcmul_(steps[1:], [two, two], steps[:-1])
    except (RuntimeError, AttributeError):
        return False
    return h.flatten().tolist() == [1.0, 3.0, 7.0]


_FOREACH_IN_ORDER = _foreach_runs_in_order()


def _recurrence(states, decays, previous):
    """In place and in list order: ``states[i] += decays[i] * previous[i]``, where ``previous[i]`` is
    ``states[i - 1]`` (already updated) for ``i > 0``; one PyTorch call for the whole list."""
    if not states:
        return
    if _FOREACH_IN_ORDER:
        torch._foreach_addcmul_(states, decays, previous)
    else:
        for s, a, p in zip(states, decays, previous):
            s.addcmul_(a, p)


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


class _Chunks:
    """Per-chunk views of the time-major inputs (made once, so the loops index lists instead of slicing)
    and the chunk buffers: ``dA`` (one buffer) and ``hs`` (two, used alternately by consecutive chunks, so
    the last state of a chunk stays intact while the next chunk is computed in the other buffer)."""

    def __init__(self, tm, T, n_hs=2):
        delta_t, du_t, B_t, C_t = tm[:4]
        L, b, _, d = delta_t.shape
        n = B_t.shape[-1]
        self.T, self.L, self.b, self.n, self.d = T, L, b, n, d
        self.starts = list(range(0, L, T))
        self.delta = delta_t.split(T)
        self.du = du_t.split(T)
        self.B = B_t.unsqueeze(-1).split(T)                       # (m, b, n, 1)
        self.C_row = C_t.view(L * b, 1, n).split(T * b)           # (m b, 1, n)
        self.C_col = C_t.view(L * b, n, 1).split(T * b)           # (m b, n, 1)
        self.dA = delta_t.new_empty(T, b, n, d)
        self.dA_steps = list(self.dA.unbind(0))
        self.hs = [delta_t.new_empty(T, b, n, d) for _ in range(n_hs)]
        self.hs_steps = [list(x.unbind(0)) for x in self.hs]

    def discretise(self, k, A2_t, dA, hs):
        """Fill dA[:m] = exp(delta*A) and hs[:m] = delta*u*B for the m steps of chunk k (layout (m, b, n, d));
        ``A2_t`` is A^T log2(e) (n, d), the exponent is taken as exp2 of ``delta * A2_t``."""
        m = self.delta[k].shape[0]
        a = dA if m == self.T else dA[:m]
        torch.mul(self.delta[k], A2_t, out=a)
        torch.exp2(a, out=a)
        torch.mul(self.du[k], self.B[k], out=hs if m == self.T else hs[:m])
        return m

    def states(self, k, h, A2_t):
        """The states of chunk k, in its ``hs`` buffer, from the state ``h`` before it. Returns (m, hs, steps)."""
        hs, steps = self.hs[k % len(self.hs)], self.hs_steps[k % len(self.hs)]
        m = self.discretise(k, A2_t, self.dA, hs)
        _recurrence(steps[:m], self.dA_steps[:m], [h] + steps[:m - 1])
        return m, hs, steps


def scan_forward(u, delta, A, B, C, save_chunk_states=False, initial_state=None):
    """y (b, L, d) and last state (b, d, n) of the recurrence, all fp32, from u, delta (b, L, d) and
    B, C (b, L, n); optionally also the chunk-start states (a list of (b, n, d) tensors).
    ``initial_state`` (b, d, n): h_0 (zeros if None)."""
    b, L, d = u.shape
    n = A.shape[1]
    tm = _time_major(u, delta, A, B, C)
    A2_t = tm[5]
    ch = _Chunks(tm, min(L, chunk_length(b, d, n)))
    y = u.new_empty(L, b, d)
    y_chunks = y.view(L * b, 1, d).split(ch.T * b)
    h = u.new_zeros(b, n, d) if initial_state is None else initial_state.float().transpose(1, 2).contiguous()
    starts = []
    for k in range(len(ch.starts)):
        if save_chunk_states:
            starts.append(h.clone())
        m, hs, steps = ch.states(k, h, A2_t)
        h = steps[m - 1]
        # y[t, b, :] = C_t[b, :] @ h_t[b, :, :]
        torch.bmm(ch.C_row[k], hs[:m].view(m * b, n, d), out=y_chunks[k])
    last = h.transpose(1, 2).contiguous()
    return y.transpose(0, 1), last, starts


def scan_backward(grad_y, grad_last, u, delta, A, B, C, starts):
    """Gradients (u, delta, A, B, C) of the recurrence by a reverse-time chunked scan (see module docstring);
    same (b, L, .) layouts as :func:`scan_forward`."""
    b, L, d = u.shape
    n = A.shape[1]
    tm = _time_major(u, delta, A, B, C)
    delta_t, du_t, B_t, _, A_t, A2_t = tm
    ch = _Chunks(tm, min(L, chunk_length(b, d, n)), n_hs=1)
    T = ch.T
    g_t = grad_y.float().transpose(0, 1).contiguous()                     # (L, b, d)
    g_chunks = g_t.split(T)
    # the adjoint states and the decays of two consecutive chunks are kept: lam_{t+1} and a_{t+1} of the
    # first step of the chunk after this one are needed by its last step
    lam_pair = [u.new_empty(T, b, n, d) for _ in range(2)]
    lam_lists = [list(x.unbind(0)) for x in lam_pair]
    dA_pair = [ch.dA, u.new_empty(T, b, n, d)]
    dA_lists = [ch.dA_steps, list(dA_pair[1].unbind(0))]
    g_du = u.new_empty(L, b, d)
    g_delta_a = u.new_empty(L, b, d)
    gB = u.new_empty(L, b, n)
    gC = u.new_empty(L, b, n)
    gA_t = u.new_zeros(n, d)
    last = None if grad_last is None else grad_last.float().transpose(1, 2).contiguous()
    lam = a_next = None                                                    # lam_{t+1}, a_{t+1} after a chunk
    for k in reversed(range(len(ch.starts))):
        s = ch.starts[k]
        dA, dA_s = dA_pair[k % 2], dA_lists[k % 2]
        lam_buf, lam_s = lam_pair[k % 2], lam_lists[k % 2]
        hs, hs_s = ch.hs[0], ch.hs_steps[0]
        m = ch.discretise(k, A2_t, dA, hs)
        e = s + m
        _recurrence(hs_s[:m], dA_s[:m], [starts[k]] + hs_s[:m - 1])
        g = g_chunks[k]
        # Cg[t] = C_t (x) g_t, written into lam_buf, then the adjoint recurrence runs in place backwards:
        # lam_t += a_{t+1} lam_{t+1}.
        torch.bmm(ch.C_col[k], g.reshape(m * b, 1, d), out=lam_buf[:m].view(m * b, n, d))
        back = list(reversed(range(m)))
        if lam is None:                                                    # the last chunk in time
            if last is not None:
                lam_s[m - 1].add_(last)
            _recurrence([lam_s[t] for t in back[1:]], [dA_s[t + 1] for t in back[1:]],
                        [lam_s[t + 1] for t in back[1:]])
        else:
            _recurrence([lam_s[t] for t in back], [a_next] + [dA_s[t + 1] for t in back[1:]],
                        [lam] + [lam_s[t + 1] for t in back[1:]])
        lam, a_next = lam_s[0], dA_s[0]
        lam_c = lam_buf[:m]
        h_c = hs[:m]
        # dC_t[b, n] = sum_d h_t[b, n, d] g_t[b, d]
        torch.bmm(h_c.view(m * b, n, d), g.reshape(m * b, d, 1), out=gC[s:e].view(m * b, n, 1))
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
    g_du = g_du.transpose(0, 1)
    grad_u = g_du * delta
    grad_delta = g_delta_a.transpose(0, 1) + g_du * u
    return grad_u, grad_delta, gA_t.t(), gB.transpose(0, 1), gC.transpose(0, 1)


class _ChunkedScan(torch.autograd.Function):
    """Autograd wrapper: forward keeps the chunk-start states, backward is :func:`scan_backward`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        y, last, starts = scan_forward(u, delta, A, B, C, save_chunk_states=True)
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
