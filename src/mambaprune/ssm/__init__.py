"""Selective scan of Mamba (v1): a sequential reference and the fast chunked default, side by side; the SSD scan of
Mamba-2 is in :mod:`mambaprune.ssm.ssd`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunked import scan_chunked
from .reference import selective_scan_reference
from .ssd import ssd_scan, ssd_scan_reference, ssd_state_update
from .step import selective_state_update

METHODS = ("chunked", "reference")

__all__ = ["selective_scan", "scan_layer", "selective_scan_reference", "selective_state_update", "METHODS",
           "ssd_scan", "ssd_scan_reference", "ssd_state_update"]


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"selective_scan: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got {x.dtype}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, d_inner, length = u.shape
    if length == 0 or batch == 0:
        raise ValueError(f"selective_scan: empty input, u has shape {tuple(u.shape)}")
    expected = {
        "delta": (delta, (batch, d_inner, length)),
        "A": (A, (d_inner, A.shape[-1] if A.dim() == 2 else -1)),
    }
    for name, (x, shape) in expected.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(x.shape)}")
    d_state = A.shape[1]
    for name, x in (("B", B), ("C", C)):
        if tuple(x.shape) != (batch, d_state, length):
            raise ValueError(f"selective_scan: {name} must have shape (batch, d_state, L) = "
                             f"{(batch, d_state, length)}, got {tuple(x.shape)}")
    if D is not None and tuple(D.shape) != (d_inner,):
        raise ValueError(f"selective_scan: D must have shape ({d_inner},), got {tuple(D.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (d_inner,):
        raise ValueError(f"selective_scan: delta_bias must have shape ({d_inner},), got {tuple(delta_bias.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        raise ValueError(f"selective_scan: z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, method="chunked"):
    """Selective scan with mamba_ssm's signature and shapes.

    Args:
        u: (batch, d_inner, L) input ``x`` of the SSM (after conv and SiLU).
        delta: (batch, d_inner, L) time step, before ``delta_bias`` and softplus if those are given.
        A: (d_inner, d_state), negative (``-exp(A_log)``).
        B, C: (batch, d_state, L) input-dependent SSM matrices.
        D: optional (d_inner,) skip; z: optional (batch, d_inner, L) gate, output is multiplied by silu(z).
        delta_bias: optional (d_inner,) added to delta before the softplus.
        delta_softplus: apply softplus to delta (+ bias), as the released Mamba does.
        return_last_state: also return the final state (batch, d_inner, d_state) in fp32.
        method: ``"chunked"`` (default, fast, differentiable) or ``"reference"`` (sequential loop).

    The scan accumulates in fp32 whatever the input dtype; the output has ``u``'s dtype.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if method == "reference":
        return selective_scan_reference(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                        delta_softplus=delta_softplus, return_last_state=return_last_state)
    if method != "chunked":
        raise ValueError(f"selective_scan: unknown method {method!r}; choose one of {METHODS}")
    dtype_in = u.dtype
    uf = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y, last = scan_chunked(uf.transpose(1, 2), delta.transpose(1, 2), A.float(), B.float().transpose(1, 2),
                           C.float().transpose(1, 2))
    y = y.transpose(1, 2).contiguous()                    # back to (batch, d_inner, L), one copy
    if D is not None:
        y = torch.addcmul(y, uf, D.float()[:, None])
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y


def scan_layer(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
               method="chunked"):
    """The scan as a Mamba layer calls it, in (batch, L, channels) layout, with the released fp32 arithmetic.

    ``u, delta, z``: (batch, L, d_inner) in any float dtype; ``B, C``: (batch, L, d_state); ``A``
    (d_inner, d_state); ``D``, ``delta_bias``: (d_inner,); ``initial_state``: (batch, d_inner, d_state) h_0.
    ``delta_bias`` is added to delta in fp32 and then the softplus is taken in fp32 (when
    ``delta_softplus``), D and the silu(z) gate are applied in fp32, as mamba_ssm's kernel does
    (``csrc/selective_scan/selective_scan_fwd_kernel.cuh``).

    Returns ``(y, last_state)``: y (batch, L, d_inner) **fp32**, ``(C_t h_t + D u_t) * silu(z_t)``;
    last_state (batch, d_inner, d_state) fp32. The caller casts y to the model's dtype (one rounding).
    """
    if method == "reference":
        y, last = selective_scan_reference(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                           C.transpose(1, 2), D=D, z=None if z is None else z.transpose(1, 2),
                                           delta_bias=delta_bias, delta_softplus=delta_softplus,
                                           return_last_state=True, initial_state=initial_state,
                                           out_fp32=True)
        return y.transpose(1, 2), last
    if method != "chunked":
        raise ValueError(f"scan_layer: unknown method {method!r}; choose one of {METHODS}")
    uf = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    y, last = scan_chunked(uf, delta, A.float(), B.float(), C.float(), initial_state=initial_state)
    if D is not None:
        y = y.addcmul(uf, D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y, last
