"""The sequential selective scan, written to mirror the released math line by line.

This is the "obviously right" version that the fast scan is tested against (as mamba_ssm keeps
``selective_scan_ref`` beside its CUDA kernel). It materialises the discretised tensors for the whole
sequence and loops over time in Python, so it is slow; it supports autograd through ordinary ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, initial_state=None, out_fp32=False):
    """Selective scan (Mamba v1, Gu & Dao 2023, Alg. 2) as a plain loop over time.

    Shapes as mamba_ssm: ``u, delta`` (batch, d_inner, L); ``A`` (d_inner, d_state);
    ``B, C`` (batch, d_state, L); ``D`` (d_inner,); ``z`` (batch, d_inner, L); ``delta_bias`` (d_inner,).

    Recurrence, with the zero-order-hold ``A`` and the simplified ``B_bar = delta * B`` of the released code::

        h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
        y_t = <C_t, h_t> + D * u_t ;   out = y * silu(z)

    Computation is in fp32; the output has the dtype of ``u`` (fp32 if ``out_fp32``). ``initial_state``
    (batch, d_inner, d_state) is h_0 (zeros if None).
    """
    dtype_in = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, length = u.shape
    delta_A = torch.exp(delta[..., None] * A[None, :, None, :])            # (b, d, L, n)
    delta_B_u = (delta * u)[..., None] * B.transpose(1, 2)[:, None]         # (b, d, L, n)
    h = u.new_zeros(batch, d_inner, A.shape[1]) if initial_state is None else initial_state.float().clone()
    ys = []
    for t in range(length):
        h = delta_A[:, :, t] * h + delta_B_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out if out_fp32 else out.to(dtype_in)
    return (out, h) if return_last_state else out


def probe_inputs(device, batch: int, dim: int, dstate: int, length: int, generator: torch.Generator) -> dict:
    """Tiny random inputs in mamba_ssm's layout for a probe call that checks a fast scan against this one:
    ``u, delta, z`` (batch, dim, L), ``A`` (dim, dstate) in [-1.5, -0.5), ``B, C`` (batch, dstate, L), ``D``,
    ``delta_bias`` (dim,), ``h0`` (batch, dim, dstate); drawn on the CPU from ``generator``, then moved."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    return dict(u=rand(batch, dim, length), delta=rand(batch, dim, length), z=rand(batch, dim, length),
                A=-torch.rand(dim, dstate, generator=generator).to(device) - 0.5,
                B=rand(batch, dstate, length), C=rand(batch, dstate, length), D=rand(dim), delta_bias=rand(dim),
                h0=rand(batch, dim, dstate))
