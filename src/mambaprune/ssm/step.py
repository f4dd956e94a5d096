"""One decoding step of the selective SSM, updating a fixed-size state in place."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_state_update(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Advance ``state`` (batch, d_inner, d_state, fp32) by one token and return the output (batch, d_inner).

    ``x, delta, z`` are (batch, d_inner); ``B, C`` are (batch, d_state). Same recurrence as
    :func:`selective_scan_reference` for a single time step. The state is updated in place.
    """
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    xf = x.float()
    state.mul_(torch.exp(delta[..., None] * A.float()))
    state.add_((delta * xf)[..., None] * B.float()[:, None, :])
    y = torch.einsum("bdn,bn->bd", state, C.float())
    if D is not None:
        y = y + xf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
