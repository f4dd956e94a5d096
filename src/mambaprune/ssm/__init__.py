"""Selective scan of Mamba (v1): one signature, several implementations side by side.

``method``: ``"reference"`` (sequential loop), ``"chunked"`` (the fast CPU scan), ``"parallel"`` (O(log L)
launches, for GPUs without Triton), ``"triton"`` (a fused inference kernel), ``"mamba_ssm"`` (the released
CUDA kernel, when installed and working), or ``"auto"`` (see :func:`resolve_method`). The SSD scan of Mamba-2
is in :mod:`mambaprune.ssm.ssd`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import mamba_ssm_adapter
from .chunked import scan_chunked
from .methods import METHODS, needs_grad, resolve_for, resolve_method
from .parallel import scan_parallel
from .reference import selective_scan_reference
from .ssd import ssd_scan, ssd_scan_reference, ssd_state_update
from .step import selective_state_update

__all__ = ["selective_scan", "scan_layer", "selective_scan_reference", "selective_state_update", "METHODS",
           "resolve_method", "ssd_scan", "ssd_scan_reference", "ssd_state_update"]

#: The PyTorch scans with the contract of :func:`scan_chunked` ((batch, L, channels), fp32, delta final).
_TORCH_SCANS = {"chunked": scan_chunked, "parallel": scan_parallel}


def _triton_scan():
    from . import triton_scan
    return triton_scan


def _t(x):
    """The other layout's view: (batch, L, channels) <-> (batch, channels, L), no copy (None stays None)."""
    return None if x is None else x.transpose(1, 2)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, caller="selective_scan", channels_last=False,
                  initial_state=None):
    """Shapes and types of the scan's inputs; ``channels_last``: the (batch, L, channels) layout of scan_layer."""
    seq, chan, state = ("(batch, L, d_inner)", "(batch, L, d_state)", "(batch, d_inner, d_state)") if channels_last \
        else ("(batch, d_inner, L)", "(batch, d_state, L)", "(batch, d_inner, d_state)")
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{caller}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{caller}: {name} must be a floating-point tensor, got {x.dtype}")
    if u.dim() != 3:
        raise ValueError(f"{caller}: u must be {seq}, got shape {tuple(u.shape)}")
    if channels_last:
        batch, length, d_inner = u.shape
    else:
        batch, d_inner, length = u.shape
    if length == 0 or batch == 0:
        raise ValueError(f"{caller}: empty input, u has shape {tuple(u.shape)}")
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"{caller}: delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"{caller}: A must have shape (d_inner, d_state) = ({d_inner}, d_state), "
                         f"got {tuple(A.shape)}")
    d_state = A.shape[1]
    want = (batch, length, d_state) if channels_last else (batch, d_state, length)
    for name, x in (("B", B), ("C", C)):
        if tuple(x.shape) != want:
            raise ValueError(f"{caller}: {name} must have shape {chan} = {want}, got {tuple(x.shape)}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and tuple(x.shape) != (d_inner,):
            raise ValueError(f"{caller}: {name} must have shape ({d_inner},), got {tuple(x.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        raise ValueError(f"{caller}: z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, d_inner, d_state):
        raise ValueError(f"{caller}: initial_state must have shape {state} = {(batch, d_inner, d_state)}, "
                         f"got {tuple(initial_state.shape)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, method="auto"):
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
        method: one of :data:`METHODS`; ``"auto"`` (default) is ``"chunked"`` on CPU and the Triton kernel on
            CUDA (``"parallel"`` without Triton; ``"chunked"`` when gradients are needed), see
            :func:`resolve_method`.

    The scan accumulates in fp32 whatever the input dtype; the output has ``u``'s dtype.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    method = resolve_for(method, u.device, needs_grad(u, delta, A, B, C, D, z, delta_bias), "selective_scan")
    if method == "reference":
        return selective_scan_reference(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                        delta_softplus=delta_softplus, return_last_state=return_last_state)
    if method == "triton":
        y = torch.empty(u.shape, device=u.device, dtype=u.dtype)          # (batch, d_inner, L), contiguous
        _, last = _triton_scan().scan_triton(_t(u), _t(delta), A, _t(B), _t(C), D=D, z=_t(z), delta_bias=delta_bias,
                                             delta_softplus=delta_softplus, out=_t(y))
        return (y, last) if return_last_state else y
    if method == "mamba_ssm":
        y, last = mamba_ssm_adapter.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                                   delta_softplus=delta_softplus)
        y = y.to(u.dtype)
        return (y, last) if return_last_state else y
    y, last = _torch_scan(method, _t(u), _t(delta), A, _t(B), _t(C), D, _t(z), delta_bias, delta_softplus)
    y = _t(y).contiguous().to(u.dtype)                    # back to (batch, d_inner, L), one copy
    return (y, last) if return_last_state else y


def scan_layer(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
               method="auto"):
    """The scan as a Mamba layer calls it, in (batch, L, channels) layout, with the released fp32 arithmetic.

    ``u, delta, z``: (batch, L, d_inner) in any float dtype; ``B, C``: (batch, L, d_state); ``A``
    (d_inner, d_state); ``D``, ``delta_bias``: (d_inner,); ``initial_state``: (batch, d_inner, d_state) h_0.
    ``delta_bias`` is added to delta in fp32 and then the softplus is taken in fp32 (when
    ``delta_softplus``), D and the silu(z) gate are applied in fp32, as mamba_ssm's kernel does
    (``csrc/selective_scan/selective_scan_fwd_kernel.cuh``). ``method``: as :func:`selective_scan`.

    Returns ``(y, last_state)``: y (batch, L, d_inner) **fp32**, ``(C_t h_t + D u_t) * silu(z_t)``;
    last_state (batch, d_inner, d_state) fp32. The caller casts y to the model's dtype (one rounding).
    With ``"mamba_ssm"``, y comes from the kernel in the inputs' common dtype (exact fp32 when they are all
    fp32 or an ``initial_state`` is given).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, caller="scan_layer", channels_last=True,
                  initial_state=initial_state)
    grad = needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    method = resolve_for(method, u.device, grad, "scan_layer")
    if method == "reference":
        y, last = selective_scan_reference(_t(u), _t(delta), A, _t(B), _t(C), D=D, z=_t(z), delta_bias=delta_bias,
                                           delta_softplus=delta_softplus, return_last_state=True,
                                           initial_state=initial_state, out_fp32=True)
        return y.transpose(1, 2), last
    if method == "triton":
        return _triton_scan().scan_triton(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                          delta_softplus=delta_softplus, initial_state=initial_state)
    if method == "mamba_ssm":
        y, last = mamba_ssm_adapter.selective_scan(_t(u), _t(delta), A, _t(B), _t(C), D=D, z=_t(z),
                                                   delta_bias=delta_bias, delta_softplus=delta_softplus,
                                                   initial_state=initial_state)
        out = torch.empty(y.shape[0], y.shape[2], y.shape[1], device=y.device, dtype=torch.float32)
        return out.copy_(y.transpose(1, 2)), last
    return _torch_scan(method, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)


def _torch_scan(method, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state=None):
    """The PyTorch scans (``"chunked"``, ``"parallel"``) in (batch, L, channels) layout, with the released fp32
    arithmetic around them: Δ bias, then softplus, D and the silu(z) gate, all in fp32; fp32 y and last state."""
    uf = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    y, last = _TORCH_SCANS[method](uf, delta, A.float(), B.float(), C.float(), initial_state=initial_state)
    if D is not None:
        y = y.addcmul(uf, D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y, last
