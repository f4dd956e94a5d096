"""The scan paths (parallel, Triton, mamba_ssm adapter) and the decoding step against the sequential reference.

The Triton kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py
before anything imports triton); sizes are tiny because the interpreter is slow. That they also compile for a
GPU is checked in a subprocess without the interpreter.
The mamba_ssm / causal-conv1d adapter is run against stand-in modules put into ``sys.modules`` that compute
with the reference and assert the layouts, dtypes and contiguity the released kernels require.
"""
import importlib.util
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mambaprune.ssm.parallel as parallel
from mambaprune.ssm import METHODS, resolve_method, scan_layer, selective_scan, selective_state_update
from mambaprune.ssm import conv, mamba_ssm_adapter
from mambaprune.ssm.reference import selective_scan_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
LOW = (torch.bfloat16, torch.float16)


@pytest.fixture
def interpret():
    """Triton's interpreter, which conftest.py turns on before anything imports triton."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from mambaprune.ssm import triton_scan
    assert triton_scan.interpreting(), "triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)"


def make(b, d, n, L, seed=0, dtype=torch.float32, delta_scale=1.0, a_scale=4.0):
    """Scan inputs in mamba_ssm's layout: u, delta, z (b, d, L), B, C (b, n, L), A (d, n), D, bias (d,)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g) * delta_scale
    A = -(torch.rand(d, n, generator=g) * a_scale + 0.05)
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    D, z, bias = torch.randn(d, generator=g), torch.randn(b, d, L, generator=g), torch.randn(d, generator=g) * 0.5
    h0 = torch.randn(b, d, n, generator=g)
    ins = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)
    return {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in ins.items()}, h0


def close(actual, expected, rel=1e-5):
    """Equal within ``rel`` of the largest magnitude of the expected tensor."""
    scale = expected.float().abs().max().clamp_min(1e-12)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rel * scale, f"max error {err:.3e} > {rel:g} * {scale:.3e}"


def tol(dtype):
    # one rounding of the output to bf16 / fp16 (the interpreter truncates where a GPU rounds to nearest)
    return {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}.get(dtype, 1e-5)


def blc(ins):
    """The same inputs as contiguous (batch, L, channels) tensors, as the layers give them to scan_layer."""
    return {k: (v.transpose(1, 2).contiguous() if v.dim() == 3 else v) for k, v in ins.items()}


def reference(ins, h0=None, softplus=True):
    """fp32 y (b, d, L) and last state of the reference on the same (possibly low-precision) values."""
    return selective_scan_reference(**{k: v.float() for k, v in ins.items()}, delta_softplus=softplus,
                                    return_last_state=True, initial_state=h0, out_fp32=True)


SHAPES = [(1, 4, 4, 1), (2, 5, 3, 13), (3, 70, 4, 6)]   # L = 1; odd d, n, L; d over one block of 64 channels


def _check_both_layouts(method, b, d, n, L, dtype, seed=0):
    ins, h0 = make(b, d, n, L, seed=seed, dtype=dtype)
    y_ref, s_ref = reference(ins)
    y, s = selective_scan(**ins, delta_softplus=True, return_last_state=True, method=method)
    assert y.dtype == dtype and y.shape == (b, d, L) and s.dtype == torch.float32 and s.shape == (b, d, n)
    close(y, y_ref, tol(dtype))
    close(s, s_ref, 1e-5)
    # the layers' layout, with an initial state: fp32 y (b, L, d)
    y_ref, s_ref = reference(ins, h0)
    y, s = scan_layer(**blc(ins), delta_softplus=True, initial_state=h0, method=method)
    assert y.dtype == torch.float32 and y.shape == (b, L, d) and y.is_contiguous()
    close(y, y_ref.transpose(1, 2), 1e-5)
    close(s, s_ref, 1e-5)


@pytest.mark.parametrize("b,d,n,L", SHAPES + [(2, 16, 16, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parallel_equals_reference(b, d, n, L, dtype):
    _check_both_layouts("parallel", b, d, n, L, dtype)


def test_parallel_channel_blocks(monkeypatch):
    """Channels split into several blocks (one channel per block here) give the same result."""
    monkeypatch.setattr(parallel, "_BLOCK_ELEMENTS", 1)
    _check_both_layouts("parallel", 2, 3, 2, 9, torch.float32)


@pytest.mark.parametrize("b,d,n,L", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_equals_reference(b, d, n, L, dtype, interpret):
    _check_both_layouts("triton", b, d, n, L, dtype)


def test_triton_options_off_and_strided_views(interpret):
    """No D, z, bias or softplus; u and z are strided halves of one (b, L, 2d) tensor, as in_proj's output."""
    b, d, n, L = 2, 6, 5, 7
    ins, h0 = make(b, d, n, L, seed=3)
    delta = F.softplus(ins["delta"])
    xz = torch.randn(b, L, 2 * d)
    u, z = xz[..., :d], xz[..., d:]
    y_ref, s_ref = selective_scan_reference(u.transpose(1, 2), delta, ins["A"], ins["B"], ins["C"],
                                            return_last_state=True, initial_state=h0, out_fp32=True)
    y, s = scan_layer(u, delta.transpose(1, 2), ins["A"], ins["B"].transpose(1, 2), ins["C"].transpose(1, 2),
                      initial_state=h0, method="triton")
    close(y, y_ref.transpose(1, 2))
    close(s, s_ref)
    y_ref = selective_scan_reference(u.transpose(1, 2), delta, ins["A"], ins["B"], ins["C"], D=ins["D"],
                                     z=z.transpose(1, 2), out_fp32=True)
    y, _ = scan_layer(u, delta.transpose(1, 2), ins["A"], ins["B"].transpose(1, 2), ins["C"].transpose(1, 2),
                      D=ins["D"], z=z, method="triton")
    close(y, y_ref.transpose(1, 2))


@pytest.mark.parametrize("method", ["parallel", "triton"])
def test_large_delta_stays_finite_and_exact(method, request):
    """Δ up to 10 with A down to -16: every decay underflows to an exact 0, nothing overflows."""
    if method == "triton":
        request.getfixturevalue("interpret")
    b, d, n, L = 1, 4, 8, 40
    ins, h0 = make(b, d, n, L, seed=5)
    g = torch.Generator().manual_seed(6)
    ins["delta"] = torch.rand(b, d, L, generator=g) * 10.0
    ins["A"] = -(torch.rand(d, n, generator=g) * 15.0 + 1.0)
    ins["A"][0], ins["delta"][:, 0] = -16.0, 10.0
    y_ref, s_ref = reference(ins, softplus=False)
    y, s = selective_scan(**ins, return_last_state=True, method=method)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    close(y, y_ref)
    close(s, s_ref)


COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mambaprune.ssm import triton_scan

assert not triton_scan.interpreting()
ptr_types = {"u_ptr": "*bf16", "x_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": "*bf16", "out_ptr": "*bf16",
             "state_ptr": "*bf16"}
for body in (triton_scan._scan_fwd_body, triton_scan._state_update_body):
    fn = triton_scan._kernel(body)
    signature, constants = {}, {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            signature[name] = ptr_types.get(name, "*fp32")
        elif name.isupper():                                   # the constexpr flags and block sizes
            signature[name], constants[name] = "constexpr", {"BLOCK_D": 4, "BLOCK_N": 16}.get(name, True)
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 1})
    assert compiled.asm["cubin"]
print("compiled")
"""


def test_triton_kernels_compile_for_a_gpu(tmp_path):
    """The kernels also compile (not only interpret) down to an sm_90 cubin: Triton's compiler and ptxas run
    without a GPU and catch what the interpreter lets through (types of loop-carried values, masks). In a
    subprocess, since this process imported Triton for its interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


def _step_inputs(b, d, n, seed, state_dtype, x_dtype=torch.float32):
    ins, h0 = make(b, d, n, 1, seed=seed, dtype=x_dtype)
    step = {("x" if k == "u" else k): (v[..., 0] if v.dim() == 3 else v) for k, v in ins.items()}
    return step, h0.to(state_dtype)


@pytest.mark.parametrize("state_dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float16)])
def test_triton_state_update_equals_torch(state_dtype, x_dtype, interpret):
    step, h0 = _step_inputs(3, 5, 3, 8, state_dtype, x_dtype)
    s_torch, s_triton = h0.clone(), h0.clone()
    y_torch = selective_state_update(s_torch, **step, delta_softplus=True, method="chunked")
    y_triton = selective_state_update(s_triton, **step, delta_softplus=True, method="triton")
    assert s_triton.dtype == state_dtype and y_triton.dtype == x_dtype
    close(y_triton, y_torch, tol(x_dtype))
    # one rounding of the fp32 state into the state's dtype
    close(s_triton, s_torch, tol(state_dtype))
    # and the fp32 computation is the reference's single step from the same state
    seq = {("u" if k == "x" else k): (v[..., None] if v.dim() == 2 and k != "A" else v) for k, v in step.items()}
    y_ref, s_ref = reference(seq, h0.float())
    close(s_torch, s_ref, tol(state_dtype))
    close(y_torch, y_ref[..., 0], tol(x_dtype))


@pytest.mark.parametrize("method", ["chunked", "triton"])
def test_state_update_steps_equal_scan(method, request):
    if method == "triton":
        request.getfixturevalue("interpret")
    b, d, n, L = 2, 5, 3, 6
    ins, h0 = make(b, d, n, L, seed=9)
    y_ref, s_ref = reference(ins, h0)
    state = h0.clone()
    ys = [selective_state_update(state, *(ins[k][..., t] for k in ("u", "delta")), ins["A"], ins["B"][..., t],
                                 ins["C"][..., t], D=ins["D"], z=ins["z"][..., t], delta_bias=ins["delta_bias"],
                                 delta_softplus=True, method=method) for t in range(L)]
    close(torch.stack(ys, -1), y_ref)
    close(state, s_ref)


def test_resolve_method(monkeypatch):
    assert METHODS == ("auto", "reference", "chunked", "parallel", "triton", "mamba_ssm")
    assert resolve_method("auto", "cpu") == "chunked"
    for m in ("reference", "chunked", "parallel"):
        assert resolve_method(m, torch.device("cpu")) == m
    with pytest.raises(ValueError, match="choose one of"):
        resolve_method("cuda-kernel", "cpu")
    if HAS_TRITON:                                          # Triton imported without its interpreter
        from mambaprune.ssm import triton_scan
        monkeypatch.setattr(triton_scan, "interpreting", lambda: False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            resolve_method("triton", "cpu")
    else:
        with pytest.raises(ValueError, match="not installed"):
            resolve_method("triton", "cpu")
    ins, _ = make(1, 4, 2, 3)
    with pytest.raises(ValueError, match="choose one of"):
        selective_scan(**ins, method="cuda-kernel")
    with pytest.raises(ValueError, match="choose one of"):
        scan_layer(**blc(ins), method="cuda-kernel")


def test_triton_refuses_gradients(interpret):
    ins, _ = make(1, 4, 2, 3)
    ins["u"].requires_grad_()
    with pytest.raises(ValueError, match="inference-only"):
        selective_scan(**ins, method="triton")
    with torch.no_grad():
        selective_scan(**ins, method="triton")


def test_scan_layer_bad_shapes():
    ins, h0 = make(2, 4, 3, 5)
    with pytest.raises(ValueError, match="initial_state"):
        scan_layer(**blc(ins), initial_state=h0[:1])
    with pytest.raises(ValueError, match="B must have shape"):
        scan_layer(**{**blc(ins), "B": ins["B"]})


# ---------------------------------------------------------------------------------------------------------------
# mamba_ssm / causal-conv1d adapter, against stand-ins with the released signatures and input checks

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _unit_stride_last(t):
    return t.stride(-1) == 1 or t.size(-1) == 1


def standin_modules(fail=False):
    """Stand-ins for mamba_ssm's and causal-conv1d's functions; each asserts what the released code checks
    (``csrc/selective_scan/selective_scan.cpp``, ``mamba_ssm/ops/triton/selective_state_update.py``,
    causal-conv1d ``csrc/causal_conv1d.cpp``) and counts its calls."""
    calls = {"scan": 0, "update": 0, "conv": 0, "conv_update": 0, "conv_channel_last": 0}

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        if fail:
            raise RuntimeError("selective_scan_cuda is not installed")
        itype = u.dtype
        assert itype in INPUT_DTYPES
        assert delta.dtype == B.dtype == C.dtype == itype and (z is None or z.dtype == itype)
        assert A.dtype == torch.float32 and A.dim() == 2
        assert D is None or (D.dtype == torch.float32 and D.is_contiguous())
        assert delta_bias is None or (delta_bias.dtype == torch.float32 and delta_bias.is_contiguous())
        assert all(_unit_stride_last(t) for t in (u, delta, B, C) + ((z,) if z is not None else ()))
        b, d, L = u.shape
        assert delta.shape == u.shape and B.shape == C.shape == (b, A.shape[1], L)
        calls["scan"] += 1
        out, last = selective_scan_reference(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                             delta_softplus=delta_softplus, return_last_state=True)
        return (out, last) if return_last_state else out

    def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
        if fail:
            raise RuntimeError("no kernel image is available for execution on the device")
        # the released wrapper reads D's and dt_bias's strides unconditionally
        assert D is not None and dt_bias is not None
        b, d, n = state.shape
        assert x.shape == dt.shape == (b, d) and A.shape == (d, n) and B.shape == C.shape == (b, n)
        calls["update"] += 1
        y, last = selective_scan_reference(x[..., None], dt[..., None], A, B[..., None], C[..., None], D=D,
                                           z=None if z is None else z[..., None], delta_bias=dt_bias,
                                           delta_softplus=dt_softplus, return_last_state=True,
                                           initial_state=state, out_fp32=True)
        state.copy_(last)
        return y[..., 0].to(x.dtype)

    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        if fail:
            raise RuntimeError("causal_conv1d_cuda is not installed")
        b, c, L = x.shape
        channel_last = x.stride(1) == 1 and x.stride(2) > 1
        assert x.stride(2) == 1 or channel_last
        if channel_last:
            assert c % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0
            calls["conv_channel_last"] += 1
        width = weight.shape[1]
        assert weight.shape == (c, width) and 2 <= width <= 4
        assert bias is None or (bias.dtype == weight.dtype and bias.stride(-1) == 1)
        assert activation in (None, "silu", "swish")
        calls["conv"] += 1
        y = F.conv1d(x.float(), weight.float()[:, None], None if bias is None else bias.float(),
                     padding=width - 1, groups=c)[..., :L]
        out = torch.empty_like(x)                      # keeps x's layout, as the released kernel's output
        out.copy_(F.silu(y) if activation else y)
        return out

    def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                             conv_state_indices=None):
        if fail:
            raise RuntimeError("causal_conv1d_cuda is not installed")
        assert conv_state.dtype == x.dtype and x.dim() == 2
        width = weight.shape[1]
        assert 2 <= width <= 4 and conv_state.shape[-1] >= width - 1
        assert bias is None or bias.dtype == weight.dtype
        calls["conv_update"] += 1
        x_new = torch.cat([conv_state, x[..., None]], -1)
        conv_state.copy_(x_new[..., -conv_state.shape[-1]:])
        y = (x_new[..., -width:].float() * weight.float()).sum(-1) + (0 if bias is None else bias.float())
        return (F.silu(y) if activation else y).to(x.dtype)

    modules = {name: types.ModuleType(name) for name in (
        "mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface", "mamba_ssm.ops.triton",
        "mamba_ssm.ops.triton.selective_state_update", "causal_conv1d")}
    modules["mamba_ssm.ops.selective_scan_interface"].selective_scan_fn = selective_scan_fn
    modules["mamba_ssm.ops.triton.selective_state_update"].selective_state_update = selective_state_update
    modules["causal_conv1d"].causal_conv1d_fn = causal_conv1d_fn
    modules["causal_conv1d"].causal_conv1d_update = causal_conv1d_update
    return modules, calls


@pytest.fixture
def standin(monkeypatch):
    modules, calls = standin_modules()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_scan_both_layouts(standin, dtype):
    _check_both_layouts("mamba_ssm", 2, 5, 3, 7, dtype, seed=1)
    assert standin["scan"] >= 2


def test_mamba_ssm_mixed_dtypes_are_promoted(standin):
    """u in bf16 with fp32 delta, B, C (as the layers give them): one common dtype, no value rounded."""
    ins, _ = make(2, 4, 3, 5, seed=2)
    ins["u"] = ins["u"].bfloat16()
    y_ref, s_ref = reference(ins)
    y, s = scan_layer(**blc(ins), delta_softplus=True, method="mamba_ssm")
    close(y, y_ref.transpose(1, 2))
    close(s, s_ref)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_state_update(standin, state_dtype):
    step, h0 = _step_inputs(2, 5, 3, 4, state_dtype)
    step.pop("D"), step.pop("delta_bias")                    # absent: passed to the kernel as zeros
    s_torch, s_up = h0.clone(), h0.clone()
    y_torch = selective_state_update(s_torch, **step, method="chunked")
    y_up = selective_state_update(s_up, **step, method="mamba_ssm")
    assert standin["update"] >= 1
    close(y_up, y_torch)
    close(s_up, s_torch, tol(state_dtype))


@pytest.mark.parametrize("channels", [16, 6])            # channel-last view taken as is; a (b, c, L) copy
def test_mamba_ssm_conv(standin, channels):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, channels, generator=g)
    weight, bias = torch.randn(channels, 4, generator=g), torch.randn(channels, generator=g)
    mamba_ssm_adapter.require("causal_conv1d_fn", "cpu")                  # the probe, then count from 0
    standin.update(dict.fromkeys(standin, 0))
    want = conv.causal_conv1d(x, weight, bias, activation="silu", method="torch")
    got = conv.causal_conv1d(x, weight, bias, activation="silu", method="mamba_ssm")
    assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
    close(got, want)
    assert standin["conv"] == 1 and standin["conv_channel_last"] == (1 if channels % 8 == 0 else 0)
    # decoding: a bf16 state with fp32 x (x is rounded into the state's dtype, as the PyTorch step does)
    state_torch = torch.randn(2, channels, 4, generator=g).bfloat16()
    state_up = state_torch.clone()
    xt = torch.randn(2, channels, generator=g)
    want = conv.causal_conv1d_update(xt, state_torch, weight, bias, activation="silu", method="torch")
    got = conv.causal_conv1d_update(xt, state_up, weight, bias, activation="silu", method="mamba_ssm")
    assert got.dtype == xt.dtype and standin["conv_update"] >= 1
    close(got, want, tol(torch.bfloat16))    # causal-conv1d writes its output in the state's dtype
    assert torch.equal(state_up, state_torch)


def test_conv_methods(standin):
    x, weight = torch.randn(1, 5, 8), torch.randn(8, 5)
    with pytest.raises(ValueError, match="choose one of"):
        conv.causal_conv1d(x, weight[:, :4], method="cuda")
    with pytest.raises(ValueError, match="widths"):
        conv.causal_conv1d(x, weight, method="mamba_ssm")
    # "auto" on CPU is the PyTorch code; the stand-in is not called
    conv.causal_conv1d(x, weight[:, :4], method="auto")
    assert standin["conv"] == 0
    assert conv.resolve_conv_method("auto", "cpu", 4) == "torch"


def test_failing_or_missing_upstream(monkeypatch):
    """A stand-in whose call raises: the probe says no (with a warning) and an explicit method raises."""
    modules, calls = standin_modules(fail=True)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.warns(RuntimeWarning, match="probe call"):
        assert not mamba_ssm_adapter.available("selective_scan_fn", "cpu")
    ins, _ = make(1, 4, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for call in (lambda: selective_scan(**ins, method="mamba_ssm"),
                     lambda: selective_state_update(torch.zeros(1, 4, 2), ins["u"][..., 0], ins["delta"][..., 0],
                                                    ins["A"], ins["B"][..., 0], ins["C"][..., 0], method="mamba_ssm"),
                     lambda: conv.causal_conv1d(torch.randn(1, 3, 8), torch.randn(8, 4), method="mamba_ssm")):
            with pytest.raises(ValueError, match="probe call"):
                call()
    assert resolve_method("auto", "cpu") == "chunked"
    # not installed at all
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)
    with pytest.raises(ValueError, match="not usable"):
        resolve_method("mamba_ssm", "cpu")


def test_the_triton_probe_accepts_the_kernels_and_refuses_a_wrong_one(interpret, monkeypatch):
    """The probe "auto" runs once per GPU, here on CPU tensors through the interpreter: the kernels pass; a scan
    kernel that returns wrong values is refused."""
    from mambaprune.ssm import methods, triton_scan

    methods._probe_triton(triton_scan, torch.device("cpu"))
    right = triton_scan.scan_triton

    def off_by_one(*args, **kw):
        y, last = right(*args, **kw)
        return y + 1.0, last
    monkeypatch.setattr(triton_scan, "scan_triton", off_by_one)
    with pytest.raises(RuntimeError, match="disagree"):
        methods._probe_triton(triton_scan, torch.device("cpu"))
