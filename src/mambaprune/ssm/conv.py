"""The depthwise causal convolution of a Mamba layer, as causal-conv1d computes it, for prefill and decoding.

Both functions accumulate in fp32 and return the input's dtype, as causal-conv1d's kernels do
(``csrc/causal_conv1d_fwd.cu``: the weights and inputs are read into float registers, the bias is added and
the SiLU taken in fp32, and the result is written once in the input type).

``method``: ``"torch"`` (the code here), ``"mamba_ssm"`` (causal-conv1d's kernels, when installed and a probe
call works; see :mod:`mambaprune.ssm.mamba_ssm_adapter`), or ``"auto"``: causal-conv1d on CUDA tensors when it
works and takes the kernel width (2..4), else ``"torch"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import mamba_ssm_adapter

ACTIVATIONS = (None, "silu", "swish")
CONV_METHODS = ("auto", "torch", "mamba_ssm")


def resolve_conv_method(method: str, device, width: int, update: bool = False) -> str:
    """``"torch"`` or ``"mamba_ssm"`` for ``method`` on tensors of ``device`` with a kernel of ``width``
    (``update``: the decoding step ``causal_conv1d_update`` rather than ``causal_conv1d_fn``). An explicit
    ``"mamba_ssm"`` that cannot run raises a ValueError that says why."""
    if method not in CONV_METHODS:
        raise ValueError(f"causal_conv1d: unknown method {method!r}; choose one of {CONV_METHODS}")
    if method == "torch":
        return "torch"
    name = "causal_conv1d_update" if update else "causal_conv1d_fn"
    device = torch.device(device)
    supported = mamba_ssm_adapter.conv_width_supported(width)
    if method == "auto":
        usable = device.type == "cuda" and supported and mamba_ssm_adapter.available(name, device)
        return "mamba_ssm" if usable else "torch"
    if not supported:
        raise ValueError(f"causal_conv1d: method 'mamba_ssm' cannot run: causal-conv1d takes kernel widths "
                         f"2..4, got {width}")
    mamba_ssm_adapter.require(name, device)
    return "mamba_ssm"


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _activate(y: torch.Tensor, activation) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, method: str = "auto") -> torch.Tensor:
    """Depthwise causal conv over time with zero left padding, in (batch, L, channels) layout.

    ``y[:, t, c] = bias[c] + sum_j weight[c, j] * x[:, t - (width - 1) + j, c]`` (x = 0 before the start),
    i.e. ``conv1d(groups=channels, padding=width-1)[..., :L]``, evaluated as ``width`` shifted multiply-adds
    on fp32 copies (no transposes). ``weight`` (channels, width), ``bias`` (channels,).
    """
    _check_activation(activation)
    if resolve_conv_method(method, x.device, weight.shape[-1]) == "mamba_ssm":
        return mamba_ssm_adapter.causal_conv1d(x, weight, bias, activation)
    width, L = weight.shape[-1], x.shape[1]
    xf, w = x.float(), weight.float()
    y = xf * w[:, width - 1]
    if bias is not None:
        y += bias.float()
    for j in range(1, min(width, L)):
        y[:, j:].addcmul_(xf[:, :L - j], w[:, width - 1 - j])
    return _activate(y, activation).to(x.dtype)


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None,
                         method: str = "auto") -> torch.Tensor:
    """One decoding step: shift ``conv_state`` (batch, channels, width) left by one in place, append ``x``
    (batch, channels), and return the conv output at this step (batch, channels) in x's dtype."""
    _check_activation(activation)
    if resolve_conv_method(method, x.device, weight.shape[-1], update=True) == "mamba_ssm":
        return mamba_ssm_adapter.causal_conv1d_update(x, conv_state, weight, bias, activation)
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    y = (conv_state.float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return _activate(y, activation).to(x.dtype)


def causal_conv1d_final_state(x: torch.Tensor, width: int) -> torch.Tensor:
    """The decoding conv state after a prefill of x (batch, L, channels): the last ``width`` inputs as
    (batch, channels, width), zero-filled at the front when L < width (mamba_ssm's
    ``F.pad(x, (width - L, 0))`` in ``modules/mamba2.py``, line 221, which also truncates when L > width)."""
    L = x.shape[1]
    tail = x[:, L - width:] if L >= width else F.pad(x, (0, 0, width - L, 0))
    return tail.transpose(1, 2).contiguous()
