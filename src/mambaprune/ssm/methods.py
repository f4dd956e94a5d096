"""Which implementation of the scan runs: the method names and their resolution for a device."""
from __future__ import annotations

import warnings

import torch

from . import mamba_ssm_adapter
from .reference import probe_inputs, selective_scan_reference

#: The scan methods ``selective_scan``, ``scan_layer`` and ``selective_state_update`` accept.
METHODS = ("auto", "reference", "chunked", "parallel", "triton", "mamba_ssm")
#: What a resolved method calls for each operation.
_UPSTREAM_OF = {"scan": "selective_scan_fn", "state_update": "selective_state_update"}
_TRITON_PROBES: dict = {}


def _triton_scan():
    """The Triton kernels' module, or None when Triton cannot be imported."""
    try:
        from . import triton_scan
    except Exception:  # noqa: BLE001 - not installed, or an install whose import fails
        return None
    return triton_scan


def _probe_triton(ts, device: torch.device) -> None:
    """Run both Triton kernels on tiny tensors of ``device`` (odd sizes, masking included) and compare them
    with the sequential reference; raise if either fails or disagrees."""
    x = probe_inputs(device, 2, 5, 3, 4, torch.Generator().manual_seed(0))         # odd sizes: masking included
    u, delta, z, A, B, C, h0 = (x[k] for k in ("u", "delta", "z", "A", "B", "C", "h0"))
    kw = dict(D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True)
    # the kernels take the layers' (batch, L, channels) layout through strides: transposed views, no copies
    y, last = ts.scan_triton(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                             z=z.transpose(1, 2), initial_state=h0, **kw)
    y_ref, last_ref = selective_scan_reference(u, delta, A, B, C, z=z, return_last_state=True, initial_state=h0,
                                               **kw)
    state = h0.clone()
    y1 = ts.state_update_triton(state, u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], z=z[..., 0], **kw)
    y1_ref, state_ref = selective_scan_reference(u[..., :1], delta[..., :1], A, B[..., :1], C[..., :1],
                                                 z=z[..., :1], return_last_state=True, initial_state=h0, **kw)
    for got, want in ((y.transpose(1, 2), y_ref), (last, last_ref), (y1, y1_ref[..., 0]), (state, state_ref)):
        if not torch.allclose(got.float().cpu(), want.float().cpu(), rtol=1e-3, atol=1e-4):
            raise RuntimeError("the Triton kernels disagree with the reference scan")


def triton_works(device) -> bool:
    """Whether the Triton kernels run correctly on ``device`` (a probe call, made once per device)."""
    device = mamba_ssm_adapter.device_key(device)
    if str(device) not in _TRITON_PROBES:
        ts = _triton_scan()
        # on a GPU only when compiled: the interpreter (TRITON_INTERPRET=1) would be far slower than "parallel"
        ok = ts is not None and device.type == "cuda" and not ts.interpreting()
        if ok:
            try:
                _probe_triton(ts, device)
            except Exception as exc:  # noqa: BLE001 - any failure means "do not use it"
                warnings.warn(f"the Triton scan kernels do not work on {device} ({type(exc).__name__}: {exc}); "
                              "falling back to the PyTorch scans", RuntimeWarning, stacklevel=2)
                ok = False
        _TRITON_PROBES[str(device)] = ok
    return _TRITON_PROBES[str(device)]


def resolve_method(method: str, device, op: str = "scan") -> str:
    """The method that runs for ``method`` on tensors of ``device``.

    ``"auto"``: on CUDA ``"triton"`` when a probe call of the compiled Triton kernels works (probed once per
    device), else ``"parallel"``; elsewhere ``"chunked"``. An explicit name is returned as it is once it is known to be
    able to run: ``"triton"`` needs Triton, and on CPU tensors Triton's interpreter (``TRITON_INTERPRET=1``);
    ``"mamba_ssm"`` needs mamba_ssm's function for ``op`` (``"scan"``: ``selective_scan_fn``,
    ``"state_update"``: ``selective_state_update``) installed and working (a probe call). A ValueError says why
    otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"unknown scan method {method!r}; choose one of {METHODS}")
    if op not in _UPSTREAM_OF:
        raise ValueError(f"unknown operation {op!r}; choose one of {tuple(_UPSTREAM_OF)}")
    device = torch.device(device)
    if method == "auto":
        if device.type == "cuda":
            return "triton" if triton_works(device) else "parallel"
        return "chunked"
    if method == "triton":
        ts = _triton_scan()
        if ts is None:
            raise ValueError("method 'triton' cannot run: Triton is not installed (pip install triton); "
                             "use 'auto', 'chunked' or 'parallel'")
        if device.type != "cuda" and not ts.interpreting():
            raise ValueError(f"method 'triton' cannot run on {device.type} tensors unless Triton's interpreter "
                             "is on (TRITON_INTERPRET=1, set before triton is first imported); use 'chunked' there")
    elif method == "mamba_ssm":
        mamba_ssm_adapter.require(_UPSTREAM_OF[op], device)
    return method


def needs_grad(*tensors) -> bool:
    """Whether autograd will record an op on any of ``tensors`` (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_for(method: str, device, grad: bool, caller: str, op: str = "scan") -> str:
    """:func:`resolve_method`, then: with gradients wanted, "auto" takes the differentiable "chunked" scan
    instead of the inference-only Triton kernels, and an explicit "triton" is refused."""
    resolved = resolve_method(method, device, op)
    if grad and resolved == "triton":
        if method == "auto":
            return "chunked"
        raise ValueError(f"{caller}: method 'triton' is inference-only (no backward); use 'chunked', "
                         "'parallel' or 'reference' to differentiate, or run under torch.no_grad()")
    return resolved
