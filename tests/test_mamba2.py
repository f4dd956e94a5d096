"""Mamba-2: the SSD scan against its sequential reference, the layer and LM against transformers' Mamba2ForCausalLM
and a hand-written reference, decoding, pruning hooks, padding, signals and both checkpoint layouts."""
import math

import pytest
import torch

from mambaprune.ssm.ssd import segsum, ssd_scan, ssd_scan_reference, ssd_state_update, time_step

pytestmark = pytest.mark.usefixtures("one_thread")


def ssd_inputs(b=2, L=23, h=6, p=4, g=2, n=5, seed=0, dt_shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(x=r(b, L, h, p), dt=r(b, L, h) + dt_shift, A=-(torch.rand(h, generator=gen) * 4 + 0.5),
                B=r(b, L, g, n), C=r(b, L, g, n))


# ---------------------------------------------------------------------------------------------- the SSD scan
def test_segsum_by_hand():
    a = torch.tensor([-1.0, -2.0, -4.0])
    S = segsum(a)
    inf = -math.inf
    assert S.tolist() == [[0.0, inf, inf], [-2.0, 0.0, inf], [-6.0, -4.0, 0.0]]


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 64])
@pytest.mark.parametrize("groups, d_shape", [(1, "head"), (3, "head"), (2, "channel")])
def test_chunked_equals_sequential(chunk_size, groups, d_shape):
    """Any chunk size (L = 23 is no multiple of 4, 7 or 16; 64 > L), one or several groups, D per head or per
    channel, the gate, dt bias + softplus, an initial state and the final state."""
    t = ssd_inputs(g=groups)
    gen = torch.Generator().manual_seed(1)
    h, p, n = 6, 4, 5
    kw = dict(D=torch.randn(h, generator=gen) if d_shape == "head" else torch.randn(h, p, generator=gen),
              z=torch.randn(2, 23, h, p, generator=gen), dt_bias=torch.randn(h, generator=gen), dt_softplus=True,
              initial_states=torch.randn(2, h, p, n, generator=gen), return_final_states=True)
    y, last = ssd_scan(**t, chunk_size=chunk_size, **kw)
    y_ref, last_ref = ssd_scan_reference(**t, chunk_size=chunk_size, **kw)
    assert y.dtype == last.dtype == torch.float32 and y.shape == (2, 23, h, p) and last.shape == (2, h, p, n)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=2e-5)


def test_dt_limit_clamps_before_the_scan():
    """A dt_limit that binds: the scan equals the reference given the clamped Δ directly, and Δ is clamped."""
    t = ssd_inputs(dt_shift=1.0)
    bias = torch.linspace(-2, 2, 6)
    limit = (0.3, 1.1)
    delta = time_step(t["dt"], bias, True, limit)
    free = time_step(t["dt"], bias, True)
    assert bool((free < 0.3).any()) and bool((free > 1.1).any()), "the limit must bind on both sides"
    assert float(delta.min()) == pytest.approx(0.3) and float(delta.max()) == pytest.approx(1.1)
    y = ssd_scan(**t, chunk_size=8, dt_bias=bias, dt_softplus=True, dt_limit=limit)
    expected = ssd_scan_reference(**dict(t, dt=delta), chunk_size=8)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=2e-5)


def test_large_decays_stay_finite_and_exact():
    """Δ = 10 with A = -16 over 300 steps: the chunk's cumulative log-decay reaches -10240, whose naive
    difference-of-prefix-sums form would take exp(+10240) = inf; the masked segment sums give exact zeros."""
    t = ssd_inputs(b=1, L=300, h=2, p=3, g=1, n=4)
    t["dt"] = torch.full((1, 300, 2), 10.0)
    t["A"] = torch.full((2,), -16.0)
    y, last = ssd_scan(**t, chunk_size=64, return_final_states=True)
    y_ref, last_ref = ssd_scan_reference(**t, return_final_states=True)
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(last).all())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=1e-4)
    # each step forgets everything before it: y_t = C_t . (Δ_t x_t B_t) = 10 x_t (B_t . C_t)
    torch.testing.assert_close(y[0, 5, 1], 10 * t["x"][0, 5, 1] * (t["B"][0, 5, 0] @ t["C"][0, 5, 0]),
                               rtol=1e-5, atol=1e-4)


def test_state_update_steps_equal_the_scan():
    """Decoding step by step from an initial state gives the scan's outputs and final state, and a bf16 state
    is advanced in fp32 and stored back as bf16."""
    t = ssd_inputs(g=3)
    gen = torch.Generator().manual_seed(2)
    D, z, bias = torch.randn(6, 4, generator=gen), torch.randn(2, 23, 6, 4, generator=gen), torch.randn(6, generator=gen)
    h0 = torch.randn(2, 6, 4, 5, generator=gen)
    kw = dict(D=D, dt_bias=bias, dt_softplus=True, dt_limit=(0.05, 2.0))
    y_scan, last = ssd_scan(**t, chunk_size=5, z=z, initial_states=h0, return_final_states=True, **kw)
    state = h0.clone()
    ys = [ssd_state_update(state, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], z=z[:, i], **kw)
          for i in range(23)]
    torch.testing.assert_close(torch.stack(ys, 1), y_scan, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=2e-5)
    low = h0.bfloat16()
    y_low = ssd_state_update(low, t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], **kw)
    assert low.dtype == torch.bfloat16 and y_low.dtype == torch.float32
    ref_state = h0.bfloat16().float()
    y_ref = ssd_state_update(ref_state, t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], **kw)
    torch.testing.assert_close(y_low, y_ref, rtol=0, atol=0)     # computed from the fp32 new state
    assert torch.equal(low, ref_state.bfloat16())


def test_matches_transformers_torch_chunk_scan():
    """The transformers peer (``mamba2_chunk_scan``, its torch path) on the same inputs, D per head, a dt_limit."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    t = ssd_inputs(L=29, g=2)
    gen = torch.Generator().manual_seed(3)
    kw = dict(D=torch.randn(6, generator=gen), dt_bias=torch.randn(6, generator=gen), dt_softplus=True,
              dt_limit=(0.0, 1.5), initial_states=torch.randn(2, 6, 4, 5, generator=gen), return_final_states=True)
    ours, last = ssd_scan(**t, chunk_size=8, **kw)
    theirs, their_last = mamba2_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=8, **kw)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(last, their_last.float(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("bad", ["x_dims", "groups", "dt_shape", "A_shape", "D_shape", "chunk", "limit", "state"])
def test_bad_scan_inputs_raise_value_error(bad):
    t = ssd_inputs()
    kw = dict(chunk_size=4)
    if bad == "x_dims":
        t["x"] = t["x"][0]
    elif bad == "groups":
        t["B"] = t["C"] = torch.randn(2, 23, 4, 5)          # 6 heads in 4 groups
    elif bad == "dt_shape":
        t["dt"] = t["dt"][..., :3]
    elif bad == "A_shape":
        t["A"] = t["A"][:2]
    elif bad == "D_shape":
        kw["D"] = torch.ones(5)
    elif bad == "chunk":
        kw["chunk_size"] = 0
    elif bad == "limit":
        kw["dt_limit"] = (1.0, 0.5)
    elif bad == "state":
        kw["initial_states"] = torch.zeros(2, 6, 4, 4)
    with pytest.raises(ValueError):
        ssd_scan(**t, **kw)
