"""One decoding step of the selective SSM, updating a fixed-size state in place."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_state_update(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Advance ``state`` (batch, d_inner, d_state) by one token and return the output (batch, d_inner).

    ``x, delta, z`` are (batch, d_inner); ``B, C`` are (batch, d_state). Same recurrence as
    :func:`selective_scan_reference` for a single time step. The state is updated in place.

    The arithmetic is that of mamba_ssm's decoding kernel (``ops/triton/selective_state_update.py`` l.95-132):
    everything in fp32 (``delta_bias`` added to delta before the softplus, D and the silu(z) gate included),
    the state read in its own dtype, the new state written back once (one rounding when the state is kept in
    bf16/fp16, as the released decoding caches keep it) and the output taken from the fp32 new state, before
    that rounding; the output is rounded once to ``x``'s dtype.
    """
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
