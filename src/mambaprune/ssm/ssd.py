"""The scan of Mamba-2: state space duality (SSD; Dao & Gu 2024, "Transformers are SSMs", Sec. 6, Listing 1).

A Mamba-2 head ``h`` has a scalar decay ``A_h < 0`` and a head dimension ``p``; groups of heads share the
input-dependent ``B_t, C_t`` (``ngroups`` groups of ``nheads / ngroups`` consecutive heads, as
``repeat_interleave``). Per head, with Δ_t the time step (after bias, softplus and the ``dt_limit`` clamp)::

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T        # state (headdim, d_state)
    y_t = h_t C_t + D x_t ;   out = y * silu(z)       # optional skip D and gate z

Three functions share mamba_ssm's shapes (``mamba_ssm/ops/triton/ssd_combined.py``,
``mamba_chunk_scan_combined``): x (batch, L, nheads, headdim), dt (batch, L, nheads), A (nheads,),
B, C (batch, L, ngroups, d_state), D (nheads,) or (nheads, headdim), z like x, states
(batch, nheads, headdim, d_state):

* :func:`ssd_scan`, the chunked algorithm (exact for any chunk size and any L);
* :func:`ssd_scan_reference`, the same recurrence as a plain loop over time (what ssd_scan is tested against);
* :func:`ssd_state_update`, one decoding step on a state held by the caller, updated in place.

All arithmetic is fp32 whatever the input dtype; outputs are fp32 (the caller rounds once to its dtype).

Why the chunked scan never overflows. Inside a chunk, the decay from step s to step t is
``exp(sum_{s<r<=t} Δ_r A)``. The segment sums are built as ``mamba_ssm/modules/ssd_minimal.py``'s ``segsum``
does: the log-decays are summed directly over each segment (a masked cumulative sum, not a difference of two
prefix sums), and the entries above the diagonal are set to -inf *before* the exponential. Every exponent
is therefore a sum of non-positive numbers (Δ >= 0, A <= 0): the largest factor is exp(0) = 1, a very
negative sum underflows to an exact 0, and there is no exponent of a positive number that could overflow to
inf (and then give inf * 0 = nan). The states at chunk boundaries are carried by a loop over the chunks, as
mamba_ssm's ``_state_passing_fwd`` does, so no sum spans more than one chunk.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ssd_scan", "ssd_scan_reference", "ssd_state_update", "time_step", "segsum", "prefill_chunk_size"]

NO_LIMIT = (0.0, float("inf"))

#: The SSD chunk a layer uses on a CPU: the intra-chunk (quadratic) work grows with the chunk. For a
#: mamba2-130m-size model prefilling 760 tokens on one core, 64 took 2.30 s against 3.36 s at the released 256
#: (32: 2.26 s, within noise, with twice the chunk loop's iterations); the logits differ by 1e-4, fp32 rounding
#: (``python benchmarks/ssd_chunk_size.py``). On CUDA the config's chunk is kept: fewer, larger chunks mean
#: fewer kernel launches there.
CPU_CHUNK_SIZE = 64


def prefill_chunk_size(chunk_size: int, device: torch.device) -> int:
    """The chunk a Mamba-2 layer's prefill runs ``ssd_scan`` with: the config's ``chunk_size`` (the released
    models' 256, a GPU tiling choice of mamba_ssm's kernels), capped at :data:`CPU_CHUNK_SIZE` on a CPU. The
    scan's result does not depend on it beyond fp32 rounding."""
    return min(chunk_size, CPU_CHUNK_SIZE) if device.type == "cpu" else chunk_size


def time_step(dt: torch.Tensor, dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
              dt_limit: tuple[float, float] = NO_LIMIT) -> torch.Tensor:
    """Δ in fp32: ``clamp(softplus(dt + dt_bias), *dt_limit)`` (each part only when asked for).

    As mamba_ssm's ``_chunk_cumsum_fwd_kernel`` (``ops/triton/ssd_chunk_state.py``, lines 73-80): bias added in
    fp32, softplus in fp32 (the identity above 20, as ``F.softplus``'s threshold), then the clamp to
    ``[dt_limit[0], dt_limit[1]]``, always applied (with the default (0, inf) it only sends a negative dt, given
    without softplus, to 0). ``dt_bias`` is (nheads,) and broadcasts over the last dimension of ``dt``.
    """
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    return dt.clamp(min=lo) if hi == math.inf else dt.clamp(min=lo, max=hi)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums of a (..., T): ``S[..., t, s] = sum_{s<r<=t} a[..., r]`` for s <= t, -inf above the diagonal.

    As ``segsum`` of ``mamba_ssm/modules/ssd_minimal.py``: each segment is summed directly (a cumulative sum of
    the strictly lower-triangular copies of ``a``), and the -inf mask comes before any exponential.
    """
    T = a.shape[-1]
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    x = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~below, 0.0)      # x[..., r, s] = a_r for r > s
    s = x.cumsum(-2)                                                         # sum over s < r <= t
    on_or_below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return s.masked_fill(~on_or_below, -math.inf)


def _check(name, x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_states):
    tensors = {"x": x, "dt": dt, "A": A, "B": B, "C": C}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name}: {key} must be a floating-point torch.Tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
    step = name == "ssd_state_update"
    lead = x.shape[:-2]                                       # (batch, L) or (batch,)
    if x.dim() != (3 if step else 4):
        raise ValueError(f"{name}: x must be {'(batch, nheads, headdim)' if step else '(batch, L, nheads, headdim)'}"
                         f", got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty input, x has shape {tuple(x.shape)}")
    nheads, headdim = x.shape[-2:]
    if B.dim() != x.dim() or tuple(B.shape[:-2]) != tuple(lead):
        raise ValueError(f"{name}: B must be {(*lead, 'ngroups', 'd_state')}, got shape {tuple(B.shape)}")
    ngroups = B.shape[-2]
    if ngroups < 1 or nheads % ngroups:
        raise ValueError(f"{name}: nheads {nheads} must be a multiple of ngroups {ngroups}")
    expected = {"dt": (dt, (*lead, nheads)), "A": (A, (nheads,)), "C": (C, tuple(B.shape)),
                "z": (z, tuple(x.shape)), "dt_bias": (dt_bias, (nheads,)),
                "initial_states": (initial_states, (x.shape[0], nheads, headdim, B.shape[-1]))}
    for key, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: {key} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"{name}: D must have shape ({nheads},) or ({nheads}, {headdim}), got {tuple(D.shape)}")
    if len(dt_limit) != 2 or not 0.0 <= float(dt_limit[0]) <= float(dt_limit[1]):
        raise ValueError(f"{name}: dt_limit must be (low, high) with 0 <= low <= high, got {dt_limit!r}")


def _skip_and_gate(y: torch.Tensor, xf: torch.Tensor, D, z) -> torch.Tensor:
    """``(y + D x) * silu(z)`` in fp32; D (nheads,) or (nheads, headdim), as the chunk-scan kernel applies them."""
    if D is not None:
        Df = D.float()
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    return y


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=NO_LIMIT,
             initial_states=None, return_final_states=False):
    """The SSD scan, chunked, with ``mamba_chunk_scan_combined``'s arguments (see the module docstring for shapes).

    Time is cut into chunks of ``chunk_size`` steps (the last one zero-padded: Δ = 0 there, so the padding
    neither decays nor feeds the state and the final state is exact; a chunk never exceeds L). Per chunk
    (Listing 1 of the paper; ``ssd_minimal_discrete``): the intra-chunk outputs from the masked decay matrix
    ``exp(segsum(Δ A))`` times ``C_t . B_s`` (the quadratic, attention-like form); each chunk's own final state;
    the states at chunk starts by a loop over chunks (``h_c = exp(sum of the chunk's Δ A) h_{c-1} + state_c``,
    from ``initial_states``); and their contribution ``exp(cumsum Δ A) C_t h_{c-1}`` to every output. Every
    exponent is of a non-positive sum (module docstring). The result does not depend on ``chunk_size`` beyond
    fp32 rounding.

    Returns y (batch, L, nheads, headdim) fp32 = ``(C_t h_t + D x_t) * silu(z_t)``, and with
    ``return_final_states`` also the state after the last step, (batch, nheads, headdim, d_state) fp32.
    """
    _check("ssd_scan", x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_states)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd_scan: chunk_size must be a positive integer, got {chunk_size!r}")
    b, L, h, p = x.shape
    g, n = B.shape[2:]
    k = h // g                                                               # heads per group
    Q = min(chunk_size, L)
    pad = (-L) % Q
    nc = (L + pad) // Q
    delta = time_step(dt, dt_bias, dt_softplus, dt_limit)                    # (b, L, h) fp32
    xf = x.float()
    xd = xf * delta[..., None]                                               # Δ_t x_t
    Bf, Cf = B.float(), C.float()
    if pad:
        delta, xd = F.pad(delta, (0, 0, 0, pad)), F.pad(xd, (0, 0, 0, 0, 0, pad))
        Bf, Cf = F.pad(Bf, (0, 0, 0, 0, 0, pad)), F.pad(Cf, (0, 0, 0, 0, 0, pad))
    xd = xd.view(b, nc, Q, g, k, p)
    Bc, Cc = Bf.view(b, nc, Q, g, n), Cf.view(b, nc, Q, g, n)
    a = (delta * A.float()).view(b, nc, Q, g, k).permute(0, 3, 4, 1, 2)    # (b, g, k, nc, Q) log-decays <= 0
    S = segsum(a)                                                            # (b, g, k, nc, Q, Q)
    a_cum = a.cumsum(-1)                                                     # decay from the chunk start

    # 1. outputs from inside the chunk: y_t += sum_{s<=t} exp(S[t, s]) (C_t . B_s) Δ_s x_s
    CB = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)                          # (b, g, nc, Q, Q)
    y = torch.einsum("bgkcls,bcsgkp->bclgkp", CB[:, :, None] * torch.exp(S), xd)
    # 2. each chunk's final state from its own inputs (decay from step s to the chunk's last step)
    to_end = torch.exp(S[..., -1, :])                                        # (b, g, k, nc, Q)
    chunk_states = torch.einsum("bcsgn,bgkcs,bcsgkp->bcgkpn", Bc, to_end, xd)
    # 3. states at chunk starts, carried over chunks
    chunk_decay = torch.exp(a_cum[..., -1])                                  # (b, g, k, nc)
    state = (xf.new_zeros(b, g, k, p, n) if initial_states is None
             else initial_states.float().reshape(b, g, k, p, n))
    starts = []
    for c in range(nc):
        starts.append(state)
        state = chunk_decay[..., c, None, None] * state + chunk_states[:, c]
    # 4. outputs from the state the chunk started with: y_t += exp(a_cum[t]) C_t h_{c-1}
    y = y + torch.einsum("bclgn,bcgkpn,bgkcl->bclgkp", Cc, torch.stack(starts, 1), torch.exp(a_cum))
    y = _skip_and_gate(y.reshape(b, nc * Q, h, p)[:, :L], xf, D, z)
    return (y, state.reshape(b, h, p, n)) if return_final_states else y


def ssd_scan_reference(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=False,
                       dt_limit=NO_LIMIT, initial_states=None, return_final_states=False):
    """The recurrence of the module docstring as a plain loop over time (``chunk_size`` is accepted and unused).

    Same arguments, shapes and fp32 outputs as :func:`ssd_scan`; slow, and obviously right.
    """
    _check("ssd_scan_reference", x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_states)
    b, L, h, p = x.shape
    k = h // B.shape[2]
    delta = time_step(dt, dt_bias, dt_softplus, dt_limit)
    xf, Af = x.float(), A.float()
    Bh = B.float().repeat_interleave(k, dim=2)                               # (b, L, h, n): head -> its group
    Ch = C.float().repeat_interleave(k, dim=2)
    state = (xf.new_zeros(b, h, p, B.shape[-1]) if initial_states is None else initial_states.float().clone())
    ys = []
    for t in range(L):
        decay = torch.exp(delta[:, t] * Af)[..., None, None]                  # (b, h, 1, 1)
        state = decay * state + (delta[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = _skip_and_gate(torch.stack(ys, 1), xf, D, z)
    return (y, state) if return_final_states else y


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=NO_LIMIT):
    """One step of the recurrence for decoding; ``state`` (batch, nheads, headdim, d_state) is updated in place.

    x, z (batch, nheads, headdim); dt (batch, nheads); B, C (batch, ngroups, d_state). The state may be fp32 or
    a lower dtype: it is read into fp32, advanced, the output is computed from the fp32 new state, and the new
    state is stored back in the state's dtype (as mamba_ssm's ``selective_state_update`` kernel,
    ``ops/triton/selective_state_update.py``). Δ is :func:`time_step`, the same as in :func:`ssd_scan` (mamba_ssm's
    step takes no ``dt_limit``; here it is applied so that decoding continues the prefill's recurrence exactly).
    Returns y (batch, nheads, headdim) fp32.
    """
    _check("ssd_state_update", x, dt, A, B, C, D, z, dt_bias, dt_limit, None)
    b, h, p = x.shape
    g, n = B.shape[1:]
    if tuple(state.shape) != (b, h, p, n):
        raise ValueError(f"ssd_state_update: state must have shape {(b, h, p, n)}, got {tuple(state.shape)}")
    delta = time_step(dt, dt_bias, dt_softplus, dt_limit)                    # (b, h)
    xf = x.float()
    Bh = B.float().repeat_interleave(h // g, dim=1)                          # (b, h, n)
    Ch = C.float().repeat_interleave(h // g, dim=1)
    new = (torch.exp(delta * A.float())[..., None, None] * state.float()
           + (delta[..., None] * xf)[..., None] * Bh[:, :, None, :])
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    return _skip_and_gate(y, xf, D, z)
