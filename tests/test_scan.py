"""The fast chunked scan against the sequential reference (forward, last state, gradients, edge cases)."""
import pytest
import torch
import torch.nn.functional as F

import mambaprune.ssm.chunked as chunked
from mambaprune.ssm import selective_scan, selective_scan_reference, selective_state_update


def make_inputs(b, d, n, L, seed=0, dtype=torch.float32, delta_scale=1.0, a_scale=4.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g) * delta_scale
    A = -(torch.rand(d, n, generator=g) * a_scale + 0.05)
    B = torch.randn(b, n, L, generator=g)
    C = torch.randn(b, n, L, generator=g)
    D = torch.randn(d, generator=g)
    z = torch.randn(b, d, L, generator=g)
    bias = torch.randn(d, generator=g) * 0.5
    return [x.to(dtype) for x in (u, delta, A, B, C, D, z, bias)]


def assert_rel_close(actual, expected, rel=1e-5):
    """Equal within ``rel`` of the largest magnitude of the expected tensor (fp32 rounding scale)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rel * scale, f"max error {err:.3e} > {rel:g} * {scale:.3e}"


@pytest.fixture
def small_chunks(monkeypatch):
    """Force chunks of 4 steps so short sequences cross many chunk boundaries."""
    monkeypatch.setattr(chunked, "_CHUNK_ELEMENTS", 1)
    assert chunked.chunk_length(1, 8, 4) == 4


@pytest.mark.parametrize("b,d,n,L", [(1, 8, 4, 1), (2, 6, 3, 5), (1, 16, 16, 37), (3, 8, 4, 130), (2, 32, 16, 257)])
@pytest.mark.parametrize("options", ["plain", "full"])
def test_chunked_equals_reference(b, d, n, L, options):
    u, delta, A, B, C, D, z, bias = make_inputs(b, d, n, L)
    kw = {} if options == "plain" else dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    if options == "plain":
        delta = F.softplus(delta)
    y_ref, s_ref = selective_scan(u, delta, A, B, C, return_last_state=True, method="reference", **kw)
    y, s = selective_scan(u, delta, A, B, C, return_last_state=True, **kw)
    assert y.shape == (b, d, L) and s.shape == (b, d, n) and y.is_contiguous()
    assert_rel_close(y, y_ref)
    assert_rel_close(s, s_ref)


def test_many_chunk_boundaries(small_chunks):
    for L in (1, 3, 4, 5, 8, 13):
        u, delta, A, B, C, D, z, bias = make_inputs(2, 8, 4, L, seed=L)
        y_ref, s_ref = selective_scan(u, delta, A, B, C, D=D, delta_softplus=True, return_last_state=True,
                                      method="reference")
        y, s = selective_scan(u, delta, A, B, C, D=D, delta_softplus=True, return_last_state=True)
        assert_rel_close(y, y_ref)
        assert_rel_close(s, s_ref)


def test_initial_state_across_chunks(small_chunks):
    """h_0 given: the chunked scan carries it through many chunk boundaries as the reference loop does."""
    b, d, n, L = 2, 8, 4, 11
    u, delta, A, B, C, _, _, _ = make_inputs(b, d, n, L, seed=12)
    delta = F.softplus(delta)
    h0 = torch.randn(b, d, n, generator=torch.Generator().manual_seed(13))
    y_ref, s_ref = selective_scan_reference(u, delta, A, B, C, return_last_state=True, initial_state=h0)
    y, s = chunked.scan_chunked(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                                initial_state=h0)
    assert_rel_close(y.transpose(1, 2), y_ref)
    assert_rel_close(s, s_ref)


def test_per_step_fallback_gives_the_same_values(monkeypatch, small_chunks):
    """If torch._foreach_addcmul_ ever stopped running its list in order, the scan uses one addcmul_ per step:
    forward and gradients must be bit-identical to the single-call path."""
    ins = [x.clone() for x in make_inputs(2, 8, 4, 13, seed=14)[:5]]
    results = []
    for in_order in (True, False):
        monkeypatch.setattr(chunked, "_FOREACH_IN_ORDER", in_order)
        leaves = [x.clone().requires_grad_() for x in ins]
        u, delta, A, B, C = leaves
        y, last = selective_scan(u, delta, A, B, C, delta_softplus=True, return_last_state=True)
        (y.square().sum() + last.sum()).backward()
        results.append([y.detach(), last.detach()] + [x.grad for x in leaves])
    for fast, fallback in zip(*results):
        assert torch.equal(fast, fallback)


def test_large_delta_is_finite_and_exact():
    """Δ up to 10 and A down to -16 over 2048 steps: decays underflow to 0, nothing overflows."""
    b, d, n, L = 1, 8, 16, 2048
    u, _, _, B, C, D, _, _ = make_inputs(b, d, n, L, seed=3)
    g = torch.Generator().manual_seed(4)
    delta = torch.rand(b, d, L, generator=g) * 10.0
    A = -(torch.rand(d, n, generator=g) * 15.0 + 1.0)
    A[0] = -16.0
    delta[:, 0] = 10.0
    y_ref = selective_scan(u, delta, A, B, C, D=D, method="reference")
    y = selective_scan(u, delta, A, B, C, D=D)
    assert torch.isfinite(y).all()
    assert_rel_close(y, y_ref)


@pytest.mark.parametrize("b,d,n,L", [(1, 6, 4, 1), (1, 6, 4, 9), (2, 8, 4, 23), (2, 12, 8, 70)])
def test_gradients_match_reference(b, d, n, L, small_chunks):
    ins = make_inputs(b, d, n, L, seed=7)
    grads = []
    for method in ("reference", "chunked"):
        leaves = [x.clone().requires_grad_() for x in ins]
        u, delta, A, B, C, D, z, bias = leaves
        y, last = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                 return_last_state=True, method=method)
        g = torch.Generator().manual_seed(11)
        w_y = torch.randn(y.shape, generator=g)
        w_s = torch.randn(last.shape, generator=g)
        ((y * w_y).sum() + (last * w_s).sum()).backward()
        grads.append([x.grad for x in leaves])
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for name, g_ref, g_fast in zip(names, *grads):
        assert g_fast is not None, name
        assert_rel_close(g_fast, g_ref, rel=1e-4)


def test_gradient_of_output_only():
    """Backward when only y is used (the last state gets no gradient)."""
    ins = make_inputs(1, 8, 4, 40, seed=5)
    grads = []
    for method in ("reference", "chunked"):
        u, delta, A, B, C = [x.clone().requires_grad_() for x in ins[:5]]
        selective_scan(u, delta, A, B, C, delta_softplus=True, method=method).square().sum().backward()
        grads.append([u.grad, delta.grad, A.grad, B.grad, C.grad])
    for g_ref, g_fast in zip(*grads):
        assert_rel_close(g_fast, g_ref, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_fp32(dtype):
    u, delta, A, B, C, D, z, bias = make_inputs(2, 16, 8, 50, seed=2, dtype=dtype)
    y = selective_scan(u, delta, A, B, C, D=D, z=z, delta_softplus=True)
    assert y.dtype == dtype
    # the same low-precision inputs, scanned by the fp32 reference
    y_ref = selective_scan(*(x.float() for x in (u, delta, A, B, C)), D=D.float(), z=z.float(),
                           delta_softplus=True, method="reference")
    assert_rel_close(y.float(), y_ref, rel=1e-2)


def test_state_update_steps_equal_scan():
    b, d, n, L = 2, 8, 4, 9
    u, delta, A, B, C, D, z, bias = make_inputs(b, d, n, L, seed=9)
    y_ref, s_ref = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                  return_last_state=True, method="reference")
    state = torch.zeros(b, d, n)
    ys = [selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D=D, z=z[..., t],
                                 delta_bias=bias, delta_softplus=True) for t in range(L)]
    assert_rel_close(torch.stack(ys, -1), y_ref)
    assert_rel_close(state, s_ref)


def test_hand_computed_two_steps():
    """d = n = 1: h1 = Δ1 B1 u1, h2 = exp(Δ2 A) h1 + Δ2 B2 u2, y = C h + D u."""
    u = torch.tensor([[[2.0, -1.0]]])
    delta = torch.tensor([[[0.5, 1.0]]])
    A = torch.tensor([[-2.0]])
    B = torch.tensor([[[3.0, 1.0]]])
    C = torch.tensor([[[1.0, 2.0]]])
    D = torch.tensor([0.5])
    h1 = 0.5 * 3.0 * 2.0
    h2 = torch.exp(torch.tensor(-2.0)).item() * h1 + 1.0 * 1.0 * -1.0
    expected = torch.tensor([[[1.0 * h1 + 0.5 * 2.0, 2.0 * h2 + 0.5 * -1.0]]])
    for method in ("reference", "chunked"):
        y = selective_scan(u, delta, A, B, C, D=D, method=method)
        torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("bad", ["u_2d", "delta_shape", "A_shape", "B_shape", "C_len", "empty", "int", "D", "method"])
def test_bad_input_raises(bad):
    u, delta, A, B, C, D, z, bias = make_inputs(1, 4, 2, 5)
    kw = {}
    if bad == "u_2d":
        u = u[0]
    elif bad == "delta_shape":
        delta = delta[..., :3]
    elif bad == "A_shape":
        A = A[:2]
    elif bad == "B_shape":
        B = B.transpose(1, 2)
    elif bad == "C_len":
        C = C[..., :4]
    elif bad == "empty":
        u, delta, B, C = u[..., :0], delta[..., :0], B[..., :0], C[..., :0]
    elif bad == "int":
        u = u.long()
    elif bad == "D":
        kw["D"] = D[:3]
    elif bad == "method":
        kw["method"] = "cuda-kernel"
    with pytest.raises(ValueError):
        selective_scan(u, delta, A, B, C, **kw)
