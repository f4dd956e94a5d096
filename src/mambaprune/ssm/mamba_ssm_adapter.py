"""Calls into the released kernels (mamba_ssm, causal-conv1d) when they are installed and work: a cross-check
and a fast path, never a dependency.

Whether a kernel can be used is decided by *calling* it once on tiny tensors of the device and comparing the
result with this package's own computation (a probe, cached per function and device): an import is not
enough, since mid-2026 mamba_ssm's default install imports ``selective_scan_fn`` but raises when it is called
without its compiled CUDA extension (``mamba_ssm/ops/selective_scan_interface.py``,
``_check_selective_scan_cuda``).

Each wrapper hands the upstream function its arguments in the layout, dtypes and contiguity it requires:

* ``selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)``
  (``csrc/selective_scan/selective_scan.cpp``, ``selective_scan_fwd``): u, delta, z (batch, dim, L) and B, C
  (batch, d_state, L) all of one input dtype (fp32, fp16 or bf16) with unit stride along L; A, D and
  delta_bias fp32. It takes no initial state.
* ``selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)``
  (``mamba_ssm/ops/triton/selective_state_update.py``): reads every tensor through its strides and stores the
  state in its own dtype; it reads the strides of ``D`` and ``dt_bias`` unconditionally, so both are passed
  (zeros when absent).
* ``causal_conv1d_fn(x, weight, bias, activation=...)`` (causal-conv1d ``csrc/causal_conv1d.cpp``,
  ``causal_conv1d_fwd``): x (batch, dim, L) with unit stride along L, or "channel last" (unit stride along
  dim, dim and the other strides multiples of 8); weight (dim, width) with 2 <= width <= 4; bias in
  weight's dtype. ``causal_conv1d_update(x, conv_state, weight, bias, activation)``: conv_state in x's dtype.
"""
from __future__ import annotations

import importlib
import warnings

import torch
import torch.nn.functional as F

from .reference import probe_inputs, selective_scan_reference

#: name -> (module, attribute) of the upstream functions this adapter calls.
UPSTREAM = {
    "selective_scan_fn": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "causal_conv1d_fn": ("causal_conv1d", "causal_conv1d_fn"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update"),
}
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PROBES: dict = {}


def _load(name: str):
    module, attr = UPSTREAM[name]
    return getattr(importlib.import_module(module), attr)


def device_key(device) -> torch.device:
    """``device`` with an explicit index for CUDA (the current one when none is given)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float().cpu(), b.float().cpu()
    return bool(torch.isfinite(a).all()) and bool(((a - b).abs() <= 1e-3 + 1e-3 * b.abs()).all())


def _probe_call(name: str, fn, device: torch.device) -> None:
    """Call ``fn`` on tiny tensors of ``device``; raise if it fails or disagrees with this package's result."""
    g = torch.Generator().manual_seed(0)
    batch, dim, length = 1, 8, 5
    x = probe_inputs(device, batch, dim, 4, length, g)
    u, delta, z, A, B, C, D, bias, h0 = (x[k] for k in ("u", "delta", "z", "A", "B", "C", "D", "delta_bias", "h0"))
    if name == "selective_scan_fn":
        got, _ = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, _fn=fn)
        want = selective_scan_reference(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    elif name == "selective_state_update":
        got = selective_state_update(h0.clone(), u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D=D,
                                     z=z[..., 0], delta_bias=bias, delta_softplus=True, _fn=fn)
        want = selective_scan_reference(u[..., :1], delta[..., :1], A, B[..., :1], C[..., :1], D=D,
                                        z=z[..., :1], delta_bias=bias, delta_softplus=True,
                                        initial_state=h0)[..., 0]
    else:
        x = torch.randn(batch, length, dim, generator=g).to(device)
        weight, cbias = torch.randn(dim, 4, generator=g).to(device), torch.randn(dim, generator=g).to(device)
        conv = F.conv1d(x.transpose(1, 2), weight[:, None], cbias, padding=3, groups=dim)[..., :length]
        if name == "causal_conv1d_fn":
            got = causal_conv1d(x, weight, cbias, activation="silu", _fn=fn)
            want = F.silu(conv).transpose(1, 2)
        else:
            state = torch.zeros(batch, dim, 4, device=device)
            state[:, :, 1:] = x[:, :3].transpose(1, 2)
            got = causal_conv1d_update(x[:, 3], state, weight, cbias, activation="silu", _fn=fn)
            want = F.silu(conv[..., 3])
    if not _close(got, want):
        raise RuntimeError(f"{name} returned values that differ from this package's computation")


def probe(name: str, device) -> tuple[bool, str]:
    """``(works, reason)`` for the upstream function ``name`` (a key of :data:`UPSTREAM`) on ``device``;
    the answer is cached per function object and device."""
    device = device_key(device)
    try:
        fn = _load(name)
    except Exception as exc:  # noqa: BLE001 - not installed, or an install whose import fails
        module = UPSTREAM[name][0].split(".")[0]
        return False, f"{module} is not usable here ({type(exc).__name__}: {exc})"
    key = (name, str(device), fn)
    if key not in _PROBES:
        try:
            _probe_call(name, fn, device)
            _PROBES[key] = (True, "")
        except Exception as exc:  # noqa: BLE001 - any failure of the call means "do not use it"
            reason = f"{UPSTREAM[name][0]}.{name} is installed but a probe call on {device} failed " \
                     f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
            _PROBES[key] = (False, reason)
    return _PROBES[key]


def available(name: str, device) -> bool:
    """Whether the upstream function ``name`` is installed and its probe call on ``device`` works."""
    return probe(name, device)[0]


def require(name: str, device):
    """The upstream function ``name``, or a ValueError saying why it cannot be used on ``device``."""
    works, reason = probe(name, device)
    if not works:
        raise ValueError(f"method 'mamba_ssm' cannot run: {reason}")
    return _load(name)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _input_dtype(*tensors) -> torch.dtype:
    """One dtype for u, delta, B, C, z (selective_scan_fn wants them equal): theirs if they agree, else the
    promoted one (so no value is rounded), fp32 for anything outside fp32/fp16/bf16."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype in _INPUT_DTYPES else torch.float32


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                   _fn=None):
    """mamba_ssm's ``selective_scan_fn`` on mamba_ssm's (batch, dim, L) layout (any strides, any float dtypes).

    Returns ``(y, last_state)``: y (batch, dim, L) in the common input dtype (see :func:`_input_dtype`),
    last_state (batch, dim, d_state) fp32. ``initial_state`` h_0, which selective_scan_fn cannot take, is
    added by linearity: the scan from h_0 is the scan from 0 plus ``C_t (prod_{s<=t} exp(Δ_s A)) h_0``, the
    product taken as a cumulative product of per-step decays <= 1 (no exponent of a cumulative sum); the kernel
    then runs in fp32 so that y is rounded once.
    """
    fn = _fn if _fn is not None else require("selective_scan_fn", u.device)
    dtype = torch.float32 if initial_state is not None else _input_dtype(u, delta, B, C, z)
    u_, delta_, B_, C_ = (_unit_last_stride(t.to(dtype)) for t in (u, delta, B, C))
    z_ = None if z is None else _unit_last_stride(z.to(dtype))
    A_ = A.float().contiguous()
    D_ = None if D is None else D.float().contiguous()
    bias_ = None if delta_bias is None else delta_bias.float().contiguous()
    y, last = fn(u_, delta_, A_, B_, C_, D_, z_, bias_, bool(delta_softplus), True)
    if initial_state is not None:
        dt = delta.float() if delta_bias is None else delta.float() + bias_[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        decay = torch.cumprod(torch.exp(dt[..., None] * A_[:, None, :]), dim=2)     # (b, d, L, n)
        h0 = initial_state.float()
        y0 = torch.einsum("bdln,bdn,bnl->bdl", decay, h0, C.float())
        if z is not None:
            y0 = y0 * F.silu(z.float())
        y = y + y0
        last = last.float() + decay[:, :, -1] * h0
    return y, last.float().contiguous()


def selective_state_update(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           _fn=None):
    """mamba_ssm's Triton ``selective_state_update``: ``state`` (batch, dim, d_state) updated in place in its
    own dtype; returns y (batch, dim) in x's dtype."""
    fn = _fn if _fn is not None else require("selective_state_update", state.device)
    dim = state.shape[1]
    D_ = torch.zeros(dim, device=state.device) if D is None else D
    bias_ = torch.zeros(dim, device=state.device) if delta_bias is None else delta_bias
    y = fn(state, x, delta, A.float().contiguous(), B, C, D_, z=z, dt_bias=bias_, dt_softplus=bool(delta_softplus))
    return y.to(x.dtype)


def conv_width_supported(width: int) -> bool:
    """causal-conv1d's kernels take 2 <= width <= 4."""
    return 2 <= width <= 4


def causal_conv1d(x, weight, bias=None, activation=None, _fn=None):
    """causal-conv1d's ``causal_conv1d_fn`` on the layers' (batch, L, channels) x; returns (batch, L, channels)
    in x's dtype. A contiguous (batch, L, channels) x is passed as it is, as a channel-last view, when the
    kernel takes it (channels and strides multiples of 8); otherwise as a (batch, channels, L) copy."""
    fn = _fn if _fn is not None else require("causal_conv1d_fn", x.device)
    xt = x.transpose(1, 2)                                                  # (batch, channels, L) view
    channel_last = (xt.stride(1) == 1 and xt.shape[1] % 8 == 0 and xt.stride(0) % 8 == 0
                    and xt.stride(2) % 8 == 0)
    if not channel_last and xt.stride(2) != 1:
        xt = xt.contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.to(weight.dtype).contiguous()
    out = fn(xt, weight, bias, activation=activation)
    return out.transpose(1, 2).contiguous()


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, _fn=None):
    """causal-conv1d's ``causal_conv1d_update``: ``conv_state`` (batch, channels, width) shifted in place and
    x (batch, channels) appended; returns the conv output (batch, channels) in x's dtype."""
    fn = _fn if _fn is not None else require("causal_conv1d_update", x.device)
    weight = weight.contiguous()
    bias = None if bias is None else bias.to(weight.dtype).contiguous()
    return fn(x.to(conv_state.dtype), conv_state, weight, bias, activation).to(x.dtype)
