"""Analyses: implicit attention (Eq. 3-5) against brute force and the scan, the model-level entry point, the
kept-token recorder, and the plots (each writes a PNG and returns what it drew)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mambaprune.analysis import (KeptTokenRecorder, LayerImplicitAttention, implicit_attention,
                                 implicit_attention_maps, importance_scatter, layer_implicit_attention,
                                 plot_implicit_attention, plot_kept_tokens, plot_std_curve)
from mambaprune.ssm.reference import selective_scan_reference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ssm(L, d, n, seed, batch=None):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    delta = F.softplus(torch.randn(*lead, L, d, generator=g) - 0.5)
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5)
    B = torch.randn(*lead, L, n, generator=g)
    C = torch.randn(*lead, L, n, generator=g)
    return delta, A, B, C


def _brute_force(delta, A, B, C):
    """(d, L, L): K_d[t, j] = C_t (Ā_t ... Ā_{j+1}) (Δ_j B_j) with explicit diagonal matrices, in float64."""
    delta, A, B, C = delta.double(), A.double(), B.double(), C.double()
    L, d = delta.shape
    n = A.shape[1]
    K = torch.zeros(d, L, L, dtype=torch.float64)
    for c in range(d):
        for t in range(L):
            for j in range(t + 1):
                P = torch.eye(n, dtype=torch.float64)
                for k in range(j + 1, t + 1):
                    P = torch.diag(torch.exp(delta[k, c] * A[c])) @ P
                K[c, t, j] = C[t] @ P @ (delta[j, c] * B[j])
    return K


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------ implicit attention
def test_matches_brute_force_per_channel_and_reduced():
    delta, A, B, C = _ssm(L=7, d=5, n=3, seed=0)
    ref = _brute_force(delta, A, B, C).float()
    torch.testing.assert_close(implicit_attention(delta, A, B, C, reduce="none"), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(implicit_attention(delta, A, B, C), ref.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(implicit_attention(delta, A, B, C, reduce="abs_mean"), ref.abs().mean(0),
                               rtol=1e-5, atol=1e-6)
    chosen = [4, 1, 2]
    torch.testing.assert_close(implicit_attention(delta, A, B, C, channels=chosen, reduce="none"), ref[chosen],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(implicit_attention(delta, A, B, C, channels=torch.tensor(chosen)),
                               ref[chosen].mean(0), rtol=1e-5, atol=1e-6)
    # the case is not trivial: every entry on and below the diagonal is non-zero
    assert bool((ref[:, torch.ones(7, 7, dtype=torch.bool).tril()] != 0).all())


def test_sum_identity_equals_reference_scan_per_channel():
    """sum_j K_d[t, j] u[j, d] = C_t h_t of the sequential scan (Eq. 3-4), for every channel and sample."""
    L, d, n = 40, 6, 4
    delta, A, B, C = _ssm(L, d, n, seed=1, batch=2)
    u = torch.randn(2, L, d, generator=torch.Generator().manual_seed(2))
    K = implicit_attention(delta, A, B, C, reduce="none")                  # (batch, d, L, L)
    assert K.shape == (2, d, L, L)
    y = torch.einsum("bdtj,bjd->bdt", K, u)
    ref = selective_scan_reference(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                   C.transpose(1, 2))                      # (batch, d, L), no D term
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    # batched input = each sample on its own
    torch.testing.assert_close(implicit_attention(delta, A, B, C)[1], implicit_attention(delta[1], A, B[1], C[1]))


@pytest.mark.parametrize("reduce", ["none", "mean", "abs_mean"])
def test_block_size_does_not_change_the_result(reduce):
    delta, A, B, C = _ssm(L=25, d=11, n=4, seed=3)
    ref = implicit_attention(delta, A, B, C, reduce=reduce, block_size=1)
    for block_size in (3, 11, 64):
        torch.testing.assert_close(implicit_attention(delta, A, B, C, reduce=reduce, block_size=block_size), ref,
                                   rtol=1e-6, atol=1e-7)


def test_large_delta_never_overflows_and_upper_triangle_is_exactly_zero():
    L = 300
    delta = torch.full((L, 2), 10.0)
    A = torch.full((2, 3), -16.0)
    B = torch.ones(L, 3)
    C = torch.ones(L, 3)
    K = implicit_attention(delta, A, B, C, reduce="none")
    assert torch.isfinite(K).all()
    assert bool((K.triu(1) == 0).all())
    # exp(-160) underflows to an exact 0 below the diagonal; the diagonal is C_t . (Δ_t B_t) = 3 * 10
    assert bool((K.tril(-1) == 0).all())
    torch.testing.assert_close(torch.diagonal(K, dim1=1, dim2=2), torch.full((2, L), 30.0))


def test_small_decays_after_a_long_large_prefix_stay_accurate():
    """The decay between j and t comes from a difference of cumulative sums; after a prefix that sums to ~1e4,
    fp32 sums would lose the 1e-3 steps. Closed form in the tail: K[t, j] = C.B Δ exp(A Δ (t - j))."""
    L, tail_start = 400, 200
    delta = torch.cat([torch.full((tail_start, 1), 50.0), torch.full((L - tail_start, 1), 1e-3)])
    A = torch.full((1, 1), -1.0)
    B = torch.full((L, 1), 2.0)
    C = torch.full((L, 1), 1.5)
    K = implicit_attention(delta, A, B, C)
    t = torch.arange(tail_start, L, dtype=torch.float64)
    gap = (t[:, None] - t[None, :]).clamp_min(0)
    expected = (3.0 * 1e-3 * torch.exp(-1e-3 * gap)).tril().float()
    torch.testing.assert_close(K[tail_start:, tail_start:], expected, rtol=1e-5, atol=0)


def test_implicit_attention_rejects_bad_input():
    delta, A, B, C = _ssm(L=5, d=4, n=3, seed=4)
    with pytest.raises(ValueError, match="delta must be"):
        implicit_attention(delta[0], A, B, C)
    with pytest.raises(ValueError, match="A must be"):
        implicit_attention(delta, A[:3], B, C)
    with pytest.raises(ValueError, match="B must have shape"):
        implicit_attention(delta, A, B[:4], C)
    with pytest.raises(ValueError, match="C must have shape"):
        implicit_attention(delta, A, B, C[:, :2])
    with pytest.raises(ValueError, match="A must be <= 0"):
        implicit_attention(delta, -A, B, C)
    with pytest.raises(ValueError, match="delta must be >= 0"):
        implicit_attention(-delta, A, B, C)
    with pytest.raises(ValueError, match="reduce must be"):
        implicit_attention(delta, A, B, C, reduce="max")
    with pytest.raises(ValueError, match="block_size"):
        implicit_attention(delta, A, B, C, block_size=0)
    with pytest.raises(ValueError, match=r"channels must lie in \[0, 4\)"):
        implicit_attention(delta, A, B, C, channels=[0, 4])
    with pytest.raises(ValueError, match="channels must be a non-empty"):
        implicit_attention(delta, A, B, C, channels=[])


# ------------------------------------------------------------------------------------ model level
def _layer_scan_inputs_by_hand(lm, ids, layer):
    """Run layers 0..layer-1 by hand and return the scan inputs of ``layer`` for its normalised input."""
    hidden, residual = lm.backbone.embedding(ids), None
    for block in lm.backbone.layers[:layer]:
        hidden, residual, _ = block(hidden, residual)
    stream = hidden if residual is None else residual + hidden
    block = lm.backbone.layers[layer]
    return block.mixer.ssm_inputs(block.norm(stream))


@pytest.mark.parametrize("layer", [0, 3])
def test_layer_implicit_attention_matches_hand_computed_inputs(small_lm, layer):
    L = 14
    ids = torch.randint(0, 64, (1, L), generator=torch.Generator().manual_seed(5))
    is_visual = torch.zeros(1, L, dtype=torch.bool)
    is_visual[0, 2:9] = True
    with torch.no_grad():
        res = layer_implicit_attention(small_lm, ids, is_visual=is_visual, layer=layer)
        _, _, u, delta, A, B, C = _layer_scan_inputs_by_hand(small_lm, ids, layer)
        per_channel = implicit_attention(delta[0], A, B[0], C[0], reduce="none")
    assert isinstance(res, LayerImplicitAttention) and res.layer == layer
    torch.testing.assert_close(res.map, per_channel.mean(0), rtol=1e-5, atol=1e-6)
    assert res.positions.tolist() == list(range(L))
    assert torch.equal(res.is_visual, is_visual[0])
    assert res.visual_span == (2, 9)
    # K applied to the layer's own scan input, plus the D skip, is the model's SSM output y (its channel mean
    # is the "y" signal, computed by the fast chunked scan inside the forward pass)
    out = {}

    def keep_signals(seq):
        if seq.layer == layer:
            out.update(seq.signals)
    with torch.no_grad():
        small_lm(ids, hook=keep_signals, signal_layers=[layer])
        y = torch.einsum("dtj,jd->td", per_channel, u[0]) + u[0] * small_lm.backbone.layers[layer].mixer.D
    torch.testing.assert_close(y.mean(-1), out["y"][0], rtol=1e-4, atol=1e-5)


def test_layer_implicit_attention_padding_sample_and_several_layers(small_lm):
    """A left-padded sample gives the map of the same tokens run alone; several layers come from one pass."""
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 64, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        maps = implicit_attention_maps(small_lm, [4, 1], ids, attention_mask=mask, sample=1)
        alone = implicit_attention_maps(small_lm, [1, 4], ids[1:, 4:])
    assert sorted(maps) == [1, 4]
    for layer in (1, 4):
        assert maps[layer].map.shape == (8, 8)
        torch.testing.assert_close(maps[layer].map, alone[layer].map, rtol=1e-4, atol=1e-5)
        assert maps[layer].positions.tolist() == list(range(8))
        assert maps[layer].visual_span is None


def test_layer_implicit_attention_after_a_cutting_hook(small_lm):
    """With a hook that cuts tokens, the map covers the tokens the layer actually processed."""
    L = 12
    ids = torch.randint(0, 64, (1, L), generator=torch.Generator().manual_seed(7))
    is_visual = torch.zeros(1, L, dtype=torch.bool)
    is_visual[0, :8] = True
    keep = [0, 2, 3, 7, 8, 9, 10, 11]

    def cut_after_1(seq):
        if seq.layer == 1:
            return seq.select(torch.tensor([keep]))
    with torch.no_grad():
        res = layer_implicit_attention(small_lm, ids, is_visual=is_visual, layer=2, hook=cut_after_1)
        hidden, residual = small_lm.backbone.embedding(ids), None
        for block in small_lm.backbone.layers[:2]:
            hidden, residual, _ = block(hidden, residual)
        block = small_lm.backbone.layers[2]
        _, _, _, delta, A, B, C = block.mixer.ssm_inputs(block.norm((residual + hidden)[:, keep]))
    torch.testing.assert_close(res.map, implicit_attention(delta[0], A, B[0], C[0]), rtol=1e-5, atol=1e-6)
    assert res.positions.tolist() == keep
    assert res.visual_span == (0, 4)


def test_layer_implicit_attention_rejects_bad_layer_and_sample(small_lm):
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match=r"outside \[0, 5\]"):
        layer_implicit_attention(small_lm, ids, layer=6)
    with pytest.raises(ValueError, match=r"outside \[0, 5\]"):
        layer_implicit_attention(small_lm, ids, layer=-1)
    with pytest.raises(ValueError, match="sample must be"):
        layer_implicit_attention(small_lm, ids, layer=0, sample=1)
    with pytest.raises(ValueError, match="sequence of layer indices"):
        implicit_attention_maps(small_lm, 2, ids)


# ------------------------------------------------------------------------------------ recorder
class _CuttingPruner:
    """A hand-built pruner-like hook: after layer 1 keep the even visual positions, after layer 3 none."""

    def __init__(self):
        self.started_with = None

    def start(self, config):
        self.started_with = config.n_layer

    signal_layers = {2}

    def __call__(self, seq):
        if seq.layer == 2:
            assert "delta" in seq.signals  # signal_layers was passed through the recorder
        if seq.layer == 1:
            return seq.select(seq.mask & (~seq.is_visual | (seq.positions % 2 == 0)))
        if seq.layer == 3:
            return seq.select(seq.mask & ~seq.is_visual)
        return None


def test_recorder_positions_equal_what_the_cutting_hook_leaves(small_lm):
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 64, (2, 14), generator=g)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0
    is_visual = torch.zeros(2, 14, dtype=torch.bool)
    is_visual[0, 1:11] = True
    is_visual[1, 3:10] = True                                  # positions 0..6 after the padding
    pruner = _CuttingPruner()
    recorder = KeptTokenRecorder(pruner)
    with torch.no_grad():
        direct = small_lm(ids, attention_mask=mask, is_visual=is_visual, hook=_CuttingPruner())
        recorded = small_lm(ids, attention_mask=mask, is_visual=is_visual, hook=recorder)
    assert pruner.started_with == small_lm.config.n_layer
    assert torch.equal(recorded.logits, direct.logits)
    assert recorded.tokens_per_layer == direct.tokens_per_layer
    all_visual = [list(range(1, 11)), list(range(0, 7))]
    even = [[p for p in s if p % 2 == 0] for s in all_visual]
    expected = {-1: all_visual, 0: all_visual, 1: even, 2: even, 3: [[], []], 4: [[], []], 5: [[], []]}
    assert recorder.positions_by_layer == expected
    assert recorder.visual_positions_at(2) == even           # layer 2 is the first on the reduced sequence
    assert recorder.visual_positions_at(0) == all_visual

    plain = KeptTokenRecorder()                               # no inner hook: every visual token everywhere
    with torch.no_grad():
        small_lm(ids, attention_mask=mask, is_visual=is_visual, hook=plain)
    assert all(v == all_visual for v in plain.positions_by_layer.values())
    assert sorted(plain.positions_by_layer) == list(range(-1, 6))
    with pytest.raises(ValueError, match="no record for layer 9"):
        plain.visual_positions_at(9)
    with pytest.raises(ValueError, match="inner_hook must be callable"):
        KeptTokenRecorder(inner_hook=3)


# ------------------------------------------------------------------------------------ plots
def test_plot_std_curve(tmp_path):
    std = np.abs(np.sin(np.arange(64) / 5.0)) + 0.1
    res = plot_std_curve(torch.tensor(std), 15, 45, tmp_path / "std.png")
    _assert_png(tmp_path / "std.png")
    assert res.early_range == (0, 16) and res.late_range == (44, 63)
    assert (res.early_layer, res.late_layer) == (15, 45)
    np.testing.assert_allclose(res.std, std)
    assert plot_std_curve([1.0, 2.0, 3.0, 4.0], 0, 3, tmp_path / "s4.png").late_range == (2, 3)
    with pytest.raises(ValueError, match="late_layer = 64"):
        plot_std_curve(std, 15, 64, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="non-finite"):
        plot_std_curve([1.0, float("nan")], 0, 1, tmp_path / "bad.png")


def test_importance_scatter_top_half_equals_hand_computation(tmp_path):
    g = torch.Generator().manual_seed(10)
    by_layer = {5: torch.rand(11, generator=g), 15: torch.rand(30, generator=g),
                44: torch.tensor([0.3, 0.9, 0.3, 0.1, 0.3, 0.2])}
    res = importance_scatter(by_layer, tmp_path / "sub" / "scatter.png")
    _assert_png(tmp_path / "sub" / "scatter.png")
    assert sorted(res) == [5, 15, 44]
    for layer, scores in by_layer.items():
        k = int(len(scores) * 0.5 + 0.5)                      # 11 -> 6 (half rounds up), 30 -> 15, 6 -> 3
        order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
        assert res[layer].top_indices.tolist() == sorted(order[:k])
        assert res[layer].threshold == pytest.approx(float(scores[order[k - 1]]))
    # ties: of the three 0.3 scores only the two earliest join 0.9
    assert res[44].top_indices.tolist() == [0, 1, 2]
    none = importance_scatter({0: [1.0, 2.0]}, tmp_path / "zero.png", top_fraction=0.0)
    assert none[0].top_indices.size == 0 and none[0].threshold is None
    with pytest.raises(ValueError, match="top_fraction"):
        importance_scatter(by_layer, tmp_path / "bad.png", top_fraction=1.5)
    with pytest.raises(ValueError, match="1-D"):
        importance_scatter({0: torch.rand(2, 3)}, tmp_path / "bad.png")


def test_plot_implicit_attention(tmp_path, small_lm):
    delta, A, B, C = _ssm(L=20, d=4, n=3, seed=11)
    K = implicit_attention(delta, A, B, C)
    res = plot_implicit_attention({5: K, 15: 2 * K}, tmp_path / "ia.png", visual_span=(2, 12))
    _assert_png(tmp_path / "ia.png")
    upper = np.triu(np.ones((20, 20), dtype=bool), 1)
    for layer, factor in ((5, 1), (15, 2)):
        drawn = res.drawn[layer]
        assert np.isnan(drawn[upper]).all()
        np.testing.assert_allclose(drawn[~upper], np.abs(factor * K.double().numpy())[~upper], rtol=1e-6)
        vmin, vmax = res.color_range[layer]
        assert vmax == pytest.approx(np.abs(factor * K.numpy()).max()) and vmin == pytest.approx(vmax * 1e-6)
    lin = plot_implicit_attention({3: K}, tmp_path / "lin.png", scale="linear")
    np.testing.assert_allclose(lin.drawn[3][~upper], K.double().numpy()[~upper], rtol=1e-6)
    assert lin.color_range[3][0] == pytest.approx(-lin.color_range[3][1])
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(12))
    is_visual = torch.zeros(1, 10, dtype=torch.bool)
    is_visual[0, 1:6] = True
    with torch.no_grad():
        maps = implicit_attention_maps(small_lm, [0, 5], ids, is_visual=is_visual)
    power = plot_implicit_attention(maps, tmp_path / "model.png", scale="power")
    _assert_png(tmp_path / "model.png")
    assert sorted(power.drawn) == [0, 5] and power.color_range[0][0] == 0.0
    with pytest.raises(ValueError, match="square"):
        plot_implicit_attention({0: torch.zeros(3, 4)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="scale must be"):
        plot_implicit_attention({0: K}, tmp_path / "bad.png", scale="sqrt")
    with pytest.raises(ValueError, match="visual span"):
        plot_implicit_attention({0: K}, tmp_path / "bad.png", visual_span=(5, 21))


def test_plot_kept_tokens_keep_map(tmp_path):
    rows, cols, offset = 4, 6, 3
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 62, 3), dtype=np.uint8)
    kept = [offset + 0, offset + 7, offset + 8, offset + 23]
    keep = plot_kept_tokens(image, (rows, cols), kept, tmp_path / "kept.png", visual_offset=offset)
    _assert_png(tmp_path / "kept.png")
    expected = np.zeros((rows, cols), dtype=bool)
    expected[0, 0] = expected[1, 1] = expected[1, 2] = expected[3, 5] = True
    assert keep.dtype == bool and np.array_equal(keep, expected)
    # a PIL image and a tensor of positions, e.g. straight from KeptTokenRecorder
    keep_pil = plot_kept_tokens(Image.fromarray(image), (rows, cols), torch.tensor(kept), tmp_path / "pil.png",
                                visual_offset=offset, title="layer 15")
    assert np.array_equal(keep_pil, expected)
    assert not plot_kept_tokens(image, (rows, cols), [], tmp_path / "none.png").any()
    with pytest.raises(ValueError, match="visual range"):
        plot_kept_tokens(image, (rows, cols), [2], tmp_path / "bad.png", visual_offset=offset)
    with pytest.raises(ValueError, match="visual range"):
        plot_kept_tokens(image, (rows, cols), [offset + 24], tmp_path / "bad.png", visual_offset=offset)
    with pytest.raises(ValueError, match="grid must be"):
        plot_kept_tokens(image, (4,), kept, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="image must be"):
        plot_kept_tokens(image[..., 0], (rows, cols), kept, tmp_path / "bad.png")
