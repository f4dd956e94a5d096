"""Triton kernels for Mamba (v1) inference: the selective scan over a sequence and the one-token state update.

Both kernels follow the arithmetic of mamba_ssm's CUDA scan (``csrc/selective_scan/selective_scan_fwd_kernel.cuh``)
and of its Triton decoding kernel (``mamba_ssm/ops/triton/selective_state_update.py``):

* every value is loaded in its own dtype and converted to fp32 in registers; the state lives in fp32;
* ``delta_bias`` is added to Δ in fp32 and the softplus is taken after it, as ``Δ <= 20 ? log(1 + exp(Δ)) : Δ``
  (the kernel's threshold, also ``torch.nn.functional.softplus``'s);
* ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t`` with ``exp(Δ A)`` taken as ``exp2(Δ · A log2(e))`` (the CUDA
  kernel's trick); Δ >= 0 and A <= 0, so every factor is <= 1 and a large Δ|A| underflows to an exact 0;
  there is no exponent of a cumulative sum;
* ``y_t = (<C_t, h_t> + D u_t) · silu(z_t)`` in fp32, rounded once into the output's dtype.

The scan kernel is sequential in time and parallel over (channel block, batch) programs; each program keeps
its (BLOCK_D, d_state) slice of the state in registers. Every tensor is read through its strides, so the
(batch, channels, L) layout of mamba_ssm and the (batch, L, channels) layout of the layers both work without
a copy. Non-power-of-two channel counts and state sizes are masked.

The kernels are made when first used, in the mode Triton was imported in: with ``TRITON_INTERPRET=1`` set
before the first ``import triton`` they run on CPU tensors through Triton's interpreter (how the tests run
them; the interpreter truncates when it rounds fp32 to bf16, where a GPU rounds to nearest).
"""
import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


def _scan_fwd_body(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, y_ptr, last_ptr,
    dim, dstate, seqlen,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_A_d, s_A_n,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_D, s_bias,
    s_z_b, s_z_d, s_z_l,
    s_h0_b, s_h0_d, s_h0_n,
    s_y_b, s_y_d, s_y_l,
    s_last_b, s_last_d, s_last_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]

    # A log2(e): exp(Δ A) = exp2(Δ A log2 e). Masked entries are 0, so their decay is 1 on a zero state.
    A2 = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0)
    A2 = A2.to(tl.float32) * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d * s_D, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_h0_b + offs_d[:, None] * s_h0_d + offs_n[None, :] * s_h0_n,
                    mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    u_ptrs = u_ptr + pid_b * s_u_b + offs_d * s_u_d
    dt_ptrs = dt_ptr + pid_b * s_dt_b + offs_d * s_dt_d
    B_ptrs = B_ptr + pid_b * s_B_b + offs_n * s_B_n
    C_ptrs = C_ptr + pid_b * s_C_b + offs_n * s_C_n
    z_ptrs = z_ptr + pid_b * s_z_b + offs_d * s_z_d
    y_ptrs = y_ptr + pid_b * s_y_b + offs_d * s_y_d

    # Step t's inputs are loaded during step t-1 (they do not depend on the state), hiding load latency.
    u = tl.load(u_ptrs, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptrs, mask=mask_d, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptrs, mask=mask_d, other=0.0).to(tl.float32)
    for t in range(seqlen):
        # (as tensors: a scalar mask is refused by the interpreter)
        mask_d_next = mask_d & (offs_d * 0 + t + 1 < seqlen)
        mask_n_next = mask_n & (offs_n * 0 + t + 1 < seqlen)
        u_ptrs += s_u_l
        dt_ptrs += s_dt_l
        B_ptrs += s_B_l
        C_ptrs += s_C_l
        u_next = tl.load(u_ptrs, mask=mask_d_next, other=0.0).to(tl.float32)
        dt_next = tl.load(dt_ptrs, mask=mask_d_next, other=0.0).to(tl.float32)
        B_next = tl.load(B_ptrs, mask=mask_n_next, other=0.0).to(tl.float32)
        C_next = tl.load(C_ptrs, mask=mask_n_next, other=0.0).to(tl.float32)
        if HAS_Z:
            z_ptrs += s_z_l
            z_next = tl.load(z_ptrs, mask=mask_d_next, other=0.0).to(tl.float32)

        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            y *= z * tl.sigmoid(z)
            z = z_next
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_d)
        y_ptrs += s_y_l
        u, dt, Bt, Ct = u_next, dt_next, B_next, C_next

    tl.store(last_ptr + pid_b * s_last_b + offs_d[:, None] * s_last_d + offs_n[None, :] * s_last_n, h,
             mask=mask_dn)


def _state_update_body(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dim, dstate,
    s_h_b, s_h_d, s_h_n,
    s_x_b, s_x_d,
    s_dt_b, s_dt_d,
    s_A_d, s_A_n,
    s_B_b, s_B_n,
    s_C_b, s_C_n,
    s_D, s_bias,
    s_z_b, s_z_d,
    s_o_b, s_o_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]

    state_ptrs = state_ptr + pid_b * s_h_b + offs_d[:, None] * s_h_d + offs_n[None, :] * s_h_n
    h = tl.load(state_ptrs, mask=mask_dn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * s_dt_b + offs_d * s_dt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    A2 = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0)
    A2 = A2.to(tl.float32) * 1.4426950408889634
    Bt = tl.load(B_ptr + pid_b * s_B_b + offs_n * s_B_n, mask=mask_n, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + pid_b * s_C_b + offs_n * s_C_n, mask=mask_n, other=0.0).to(tl.float32)

    h = tl.exp2(dt[:, None] * A2) * h + (dt * x)[:, None] * Bt[None, :]
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask_dn)
    # The output reads the fp32 state before it is rounded into the state's dtype (as mamba_ssm's kernel).
    y = tl.sum(h * Ct[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d * s_D, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_z_b + offs_d * s_z_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + pid_b * s_o_b + offs_d * s_o_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


_KERNELS: dict = {}


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (on CPU tensors too).

    Triton fixes this when it is first imported: its own library functions (``tl.zeros``, ``tl.sum``, ...) are
    built for the interpreter only if ``TRITON_INTERPRET=1`` was set then, so the variable must be set before
    the first ``import triton`` (also an indirect one, e.g. through transformers); setting it later has no
    effect. This reads the mode triton.language was built in."""
    zeros = getattr(tl, "zeros", None)
    if isinstance(zeros, InterpretedFunction):
        return True
    if isinstance(zeros, JITFunction):
        return False
    knobs = getattr(triton, "knobs", None)                    # a Triton whose tl.zeros is no jit function
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel(body):
    """``body`` as a Triton kernel, made once, in the mode triton.language was built in (see
    :func:`interpreting`): a kernel of the other mode could not call triton.language's functions."""
    mode = interpreting()
    key = (body.__name__, mode)
    if key not in _KERNELS:
        _KERNELS[key] = InterpretedFunction(body) if mode else JITFunction(body)
    return _KERNELS[key]


def _device_guard(t: torch.Tensor):
    """Launch on the tensors' GPU (Triton launches on the current device), as mamba_ssm does."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _blocks(batch: int, dim: int, dstate: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps). BLOCK_N covers d_state; BLOCK_D is the largest of 64..4 channels that
    still gives about two programs per GPU multiprocessor (the scan is sequential in time, so parallelism
    comes only from (batch, channel blocks)), with at most 4096 state values per program."""
    block_n = triton.next_power_of_2(dstate)
    target = 2 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1)
    block_d = 64
    while block_d > 4 and (block_d * block_n > 4096 or batch * triton.cdiv(dim, block_d) < target):
        block_d //= 2
    num_warps = max(1, min(4, block_d * block_n // 256))
    return block_d, block_n, num_warps


def _strides(t, n):
    return tuple(t.stride()) if t is not None else (0,) * n


def scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                out=None):
    """The selective scan by the Triton kernel, in the layers' (batch, L, channels) layout, inference only.

    ``u, delta, z``: (batch, L, d_inner); ``B, C``: (batch, L, d_state); ``A``: (d_inner, d_state);
    ``D, delta_bias``: (d_inner,); ``initial_state``: (batch, d_inner, d_state) h_0; any float dtypes, any
    strides (a transposed view of mamba_ssm's (batch, d_inner, L) tensors is read as it is).
    ``out``: optional (batch, L, d_inner) tensor (any dtype and strides) that receives y; by default a new
    contiguous fp32 one. Returns ``(y, last_state)``, last_state (batch, d_inner, d_state) fp32, and y
    ``(<C_t, h_t> + D u_t) * silu(z_t)`` computed in fp32 and rounded once into ``out``'s dtype.
    """
    batch, length, dim = u.shape
    dstate = A.shape[1]
    if out is None:
        out = torch.empty(batch, length, dim, device=u.device, dtype=torch.float32)
    last = torch.empty(batch, dim, dstate, device=u.device, dtype=torch.float32)
    block_d, block_n, num_warps = _blocks(batch, dim, dstate, u.device)
    grid = (triton.cdiv(dim, block_d), batch)
    # absent optional tensors: any valid pointer (never read, their flags are off)
    with _device_guard(u):
        _kernel(_scan_fwd_body)[grid](
            u, delta, A, B, C,
            u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            u if initial_state is None else initial_state, out, last,
            dim, dstate, length,
            u.stride(0), u.stride(2), u.stride(1),
            delta.stride(0), delta.stride(2), delta.stride(1),
            A.stride(0), A.stride(1),
            B.stride(0), B.stride(2), B.stride(1),
            C.stride(0), C.stride(2), C.stride(1),
            _strides(D, 1)[0], _strides(delta_bias, 1)[0],
            *((z.stride(0), z.stride(2), z.stride(1)) if z is not None else (0, 0, 0)),
            *_strides(initial_state, 3),
            out.stride(0), out.stride(2), out.stride(1),
            last.stride(0), last.stride(1), last.stride(2),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_H0=initial_state is not None, SOFTPLUS=bool(delta_softplus),
            BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
        )
    return out, last


def state_update_triton(state, x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One decoding step by the Triton kernel: ``state`` (batch, d_inner, d_state), fp32 or the model's dtype,
    is advanced in place (computed in fp32, stored back in its own dtype); ``x, delta, z`` (batch, d_inner),
    ``B, C`` (batch, d_state). Returns y (batch, d_inner) in x's dtype, from the fp32 state before rounding."""
    batch, dim, dstate = state.shape
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    block_d, block_n, num_warps = _blocks(batch, dim, dstate, x.device)
    grid = (triton.cdiv(dim, block_d), batch)
    with _device_guard(x):
        _kernel(_state_update_body)[grid](
            state, x, delta, A, B, C,
            x if D is None else D, x if z is None else z, x if delta_bias is None else delta_bias, y,
            dim, dstate,
            *state.stride(), *x.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
            _strides(D, 1)[0], _strides(delta_bias, 1)[0], *_strides(z, 2), *y.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y
