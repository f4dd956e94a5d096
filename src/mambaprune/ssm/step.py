"""One decoding step of the selective SSM, updating a fixed-size state in place."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import mamba_ssm_adapter
from .methods import needs_grad, resolve_for


def _check_step_inputs(state, x, delta, A, B, C, D, z, delta_bias):
    if not isinstance(state, torch.Tensor) or state.dim() != 3 or not state.is_floating_point():
        raise ValueError("selective_state_update: state must be a float tensor (batch, d_inner, d_state), got "
                         f"{tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__}")
    batch, d_inner, d_state = state.shape
    for name, t, shape in (("x", x, (batch, d_inner)), ("delta", delta, (batch, d_inner)), ("A", A, (d_inner, d_state)),
                           ("B", B, (batch, d_state)), ("C", C, (batch, d_state)), ("D", D, (d_inner,)),
                           ("z", z, (batch, d_inner)), ("delta_bias", delta_bias, (d_inner,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_state_update: {name} must have shape {shape}, got {tuple(t.shape)}")


def selective_state_update(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           method="auto"):
    """Advance ``state`` (batch, d_inner, d_state) by one token in place and return the output (batch, d_inner).

    ``x, delta, z`` are (batch, d_inner); ``B, C`` are (batch, d_state). Same recurrence as
    :func:`selective_scan_reference` for a single time step, computed in fp32. The state may be fp32 or the
    model's dtype (bf16/fp16, as mamba_ssm's inference cache keeps it): it is read into fp32, advanced, and
    stored back in its own dtype; the output is taken from the fp32 state before that rounding (as
    ``mamba_ssm/ops/triton/selective_state_update.py`` l.95-132 does: delta_bias added before the softplus, D
    and the silu(z) gate in fp32) and rounded once to x's dtype.

    ``method``: ``"triton"`` (one fused kernel), ``"mamba_ssm"`` (mamba_ssm's Triton kernel), ``"auto"``
    (the Triton kernel on CUDA when it works) or any other scan method name, which all take the PyTorch path.
    """
    _check_step_inputs(state, x, delta, A, B, C, D, z, delta_bias)
    grad = needs_grad(state, x, delta, A, B, C, D, z, delta_bias)
    method = resolve_for(method, state.device, grad, "selective_state_update", op="state_update")
    if method == "triton":
        from . import triton_scan
        return triton_scan.state_update_triton(state, x, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                               delta_softplus=delta_softplus)
    if method == "mamba_ssm":
        return mamba_ssm_adapter.selective_state_update(state, x, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                                        delta_softplus=delta_softplus)
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    xf = x.float()
    decay = torch.exp(delta[..., None] * A.float())
    h = state if state.dtype == torch.float32 else state.float()     # fp32 state: updated where it lies
    h.mul_(decay).add_((delta * xf)[..., None] * B.float()[:, None, :])
    if h is not state:
        state.copy_(h)
    y = torch.einsum("bdn,bn->bd", h, C.float())
    if D is not None:
        y = y + xf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
