"""Mamba-2 models through the rest of the toolkit: the FLOPs account, every pruning method and DTP's calibration,
the implicit attention of SSD layers, and the planner."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import runner_fixture_model as fx
from mambaprune import MambaConfig, MambaLM
from mambaprune import planner as P
from mambaprune.analysis import implicit_attention_maps, layer_implicit_attention, ssd_implicit_attention
from mambaprune.flops import (LAYER_MACS, expected_macs, head_macs, layer_macs_breakdown, layer_macs_per_token,
                              lm_macs, match_flops)
from mambaprune.pruning import available_methods, build, method_params
from mambaprune.pruning.calibration import calibrate_dtp, importance_by_layer, search_vtw_layer
from mambaprune.pruning.dtp import layer_std
from mambaprune.ssm.ssd import ssd_scan, ssd_scan_reference

from conftest import mamba2_lm
from test_pruning import ALL_PARAMS, N_TEXT, N_VIS, Recorder, vlm_like_inputs
from test_vlm import make_image
from test_vlm_pruning import check_method_through_answer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm2():
    """A 6-layer Mamba-2 LM: 8 heads of 8 channels in 2 groups, chunks of 4 tokens (a prompt spans 8 chunks)."""
    return mamba2_lm(seed=11, n_layer=6)


@pytest.fixture(scope="module")
def vlm2():
    return fx.load_tiny_mamba2()


# ---------------------------------------------------------------------------------------------- FLOPs
def test_mamba2_layer_macs_by_hand():
    # d_model 8 -> d_inner 16; headdim 4; ngroups 2; d_state 3; d_conv 4
    cfg = MambaConfig(layer="Mamba2", d_model=8, n_layer=2, vocab_size=10, d_state=3, headdim=4, ngroups=2,
                      pad_vocab_size_multiple=1)
    # nheads 4: in_proj 8 * (32 + 12 + 4), conv 4 * (16 + 12), scan 3*16*3 + 16 + 4, D 16 + gates 16, out 16*8
    assert layer_macs_breakdown(cfg) == {"in_proj": 384, "conv": 112, "scan": 164, "skip_and_gate": 32,
                                         "out_proj": 128}
    assert layer_macs_per_token(cfg) == 820
    assert lm_macs(cfg, [5, 3]) == 820 * 8 + 8 * 10
    # half of d_inner through the SSM (2 heads), the other half a gated MLP: in_proj keeps 2 * d_inner
    half = MambaConfig(**{**cfg.to_dict(), "d_ssm": 8})
    assert layer_macs_breakdown(half) == {"in_proj": 8 * (32 + 12 + 2), "conv": 4 * (8 + 12),
                                          "scan": 3 * 8 * 3 + 8 + 2, "skip_and_gate": 8 + 16, "out_proj": 128}
    # the kind decides the terms; a kind without a counting function is refused
    assert "x_proj" in layer_macs_breakdown(MambaConfig(**{**cfg.to_dict(), "layer": "Mamba1"}))
    assert set(LAYER_MACS) == {"Mamba1", "Mamba2"}
    with pytest.raises(ValueError, match="Mamba3"):
        layer_macs_breakdown(SimpleNamespace(layer="Mamba3"))


@pytest.mark.parametrize("fields", [dict(), dict(d_ssm=32, ngroups=4, bias=True), dict(ngroups=1, d_state=16)])
def test_mamba2_linear_terms_match_flop_counter(fields):
    """in_proj / out_proj / LM head as torch.utils.flop_counter counts them in a real forward pass (2 FLOPs per
    multiply-add); the other terms are the stated ones (module docstring of mambaprune.flops)."""
    lm = mamba2_lm(seed=2, **fields)
    cfg, L = lm.config, 13
    ids = torch.randint(0, 64, (1, L), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        lm(ids)
    per_module = counter.get_flop_counts()
    b = layer_macs_breakdown(cfg)
    for i in range(cfg.n_layer):
        for name in ("in_proj", "out_proj"):
            key = next(k for k in per_module if k.endswith(f"layers.{i}.mixer.{name}"))
            assert sum(per_module[key].values()) == 2 * b[name] * L, (i, name)
    assert sum(per_module[next(k for k in per_module if k.endswith("lm_head"))].values()) == 2 * head_macs(cfg)
    mixer = lm.backbone.layers[0].mixer
    d_ssm, nh, n = mixer.d_ssm, mixer.nheads, cfg.d_state
    assert b["conv"] == mixer.conv1d.weight.numel()                       # one multiply-add per tap and channel
    assert b["scan"] == 3 * nh * cfg.headdim * n + d_ssm + nh
    assert b["skip_and_gate"] == d_ssm + cfg.d_inner


def test_mamba2_pruned_runs_cost_their_layers_and_match_flops(lm2):
    cfg = lm2.config
    inputs = vlm_like_inputs(lm2)
    for name, params in [("dtp", dict(keep_ratio=0.5, early_layer=1, late_layer=4)), ("fastv", dict(keep_ratio=0.3)),
                         ("vtw", dict(layer=2))]:
        out = lm2(**inputs, hook=build(name, **params))
        assert lm_macs(cfg, out.tokens_per_layer) == sum(out.tokens_per_layer) * layer_macs_per_token(cfg) \
            + head_macs(cfg)
        assert expected_macs(build(name, **params), cfg, N_VIS, N_TEXT) == lm_macs(cfg, out.tokens_per_layer)
    # match_flops over the Mamba-2 count: the closest admissible keep ratio
    base = lm_macs(cfg, [N_VIS + N_TEXT] * cfg.n_layer)
    value, ratio = match_flops("fastv", 0.6, cfg, N_VIS, N_TEXT)
    grid = {c / N_VIS: expected_macs(build("fastv", keep_ratio=c / N_VIS), cfg, N_VIS, N_TEXT) / base
            for c in range(N_VIS + 1)}
    assert ratio == grid[value] and abs(ratio - 0.6) == min(abs(r - 0.6) for r in grid.values())


# ---------------------------------------------------------------------------------------------- every method
def test_every_method_is_covered():
    assert set(available_methods()) == set(ALL_PARAMS)


def replay_hook(seen: dict, n_prompt: int):
    """A hook that cuts, before each layer, exactly the prompt tokens a recorded run cut there (kept positions
    ``seen[layer]``); tokens after the prompt (generated ones) always go on. No scoring, no merging."""
    def hook(seq):
        if seq.layer + 1 not in seen:
            return None
        pos, _, mask = seen[seq.layer + 1]
        kept = set(pos[0][mask[0]].tolist())
        keep = torch.tensor([[p in kept or p >= n_prompt for p in seq.positions[0].tolist()]])
        return seq.select(keep & seq.mask)
    return hook


#: the fp32 scan arithmetic of a chunked prefill and of one-step decoding differ in rounding (~1e-6); the random
#: models' gated norms amplify it up to a few 1e-4 in the logits (of size ~3) after several layers
DECODE_TOL = dict(rtol=1e-3, atol=1e-3)


def kept_prompt_positions(rec: Recorder, n_prompt: int) -> dict[int, list[int]]:
    """layer -> the prompt positions that layer received in a recorded run."""
    return {k: [p for p in pos[0][mask[0]].tolist() if p < n_prompt] for k, (pos, _, mask) in rec.seen.items()}


@pytest.mark.parametrize("name", sorted(ALL_PARAMS))
def test_every_method_on_a_mamba2_lm(lm2, name):
    """Per-layer counts as the method predicts, text never cut, order kept; generation runs and each decoded
    token's logits equal a from-scratch forward with the same method over the prompt and the tokens so far, which
    keeps exactly the same prompt tokens at every layer (the visual tokens come first and every decision reads
    only them)."""
    inputs = vlm_like_inputs(lm2, seed=2)
    n_prompt = N_VIS + N_TEXT
    pruner = build(name, **ALL_PARAMS[name])
    rec = Recorder(pruner)
    with torch.no_grad():
        out = lm2(**inputs, hook=rec, use_cache=True)
    assert out.tokens_per_layer == pruner.expected_tokens(lm2.config.n_layer, N_VIS, N_TEXT)
    for pos, vis, mask in rec.seen.values():
        p = pos[0][mask[0]]
        assert bool((p[1:] > p[:-1]).all()) and torch.equal(p[~vis[0][mask[0]]], torch.arange(N_VIS, n_prompt))
    kept = kept_prompt_positions(rec, n_prompt)
    gen = lm2.generate(**inputs, hook=pruner, max_new_tokens=5, eos_token_id=None)
    assert gen.shape == (1, 5)
    logits = out.logits
    with torch.no_grad():
        for i in range(gen.shape[1]):
            embeds = torch.cat([inputs["inputs_embeds"], lm2.backbone.embedding(gen[:, :i])], dim=1)
            again = Recorder(pruner)
            scratch = lm2(inputs_embeds=embeds, is_visual=F.pad(inputs["is_visual"], (0, i)), hook=again).logits
            assert kept_prompt_positions(again, n_prompt) == kept
            torch.testing.assert_close(logits, scratch, **DECODE_TOL)
            assert int(scratch.argmax(-1)) == int(gen[0, i])
            logits = lm2.step(gen[:, i], out.cache)


@pytest.mark.parametrize("name", ["dtp", "fastv"])
def test_pruned_prefill_and_decode_equal_a_run_over_the_kept_tokens(lm2, name):
    """The cache a DTP / FastV prefill leaves decodes exactly as a from-scratch run that cuts the same prompt
    tokens at the same layers (replayed, without the method) over the prompt and the tokens so far."""
    inputs = vlm_like_inputs(lm2, seed=5)
    rec = Recorder(build(name, **ALL_PARAMS[name]))
    gen = lm2.generate(**inputs, hook=rec, max_new_tokens=6, eos_token_id=None)
    seen = {k: v for k, v in rec.seen.items() if v[2].shape[1] < N_VIS + N_TEXT}
    assert seen, "the method cut nothing: the comparison would mean little"
    replay = replay_hook(seen, N_VIS + N_TEXT)
    with torch.no_grad():
        out = lm2(**inputs, hook=build(name, **ALL_PARAMS[name]), use_cache=True)
        logits = out.logits
        for i in range(gen.shape[1]):
            embeds = torch.cat([inputs["inputs_embeds"], lm2.backbone.embedding(gen[:, :i])], dim=1)
            scratch = lm2(inputs_embeds=embeds, hook=replay)
            torch.testing.assert_close(logits, scratch.logits, **DECODE_TOL)
            assert int(scratch.logits.argmax(-1)) == int(gen[0, i])
            logits = lm2.step(gen[:, i], out.cache)


KEEP_ALL = {name: {**ALL_PARAMS[name], "keep_ratio": 1.0} for name in ALL_PARAMS
            if "keep_ratio" in method_params(name)}
KEEP_ALL["dtp"]["late_pruning"] = False
KEEP_ALL["vtw"] = dict(layer=1.0)                                   # the whole depth: layer n_layer, never withdrawn


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keeping_everything_changes_nothing(lm2, name):
    inputs = vlm_like_inputs(lm2, seed=3)
    pruner = build(name, **KEEP_ALL[name])
    ref = lm2(**inputs)
    out = lm2(**inputs, hook=pruner)
    assert torch.equal(out.logits, ref.logits) and out.tokens_per_layer == ref.tokens_per_layer
    assert torch.equal(lm2.generate(**inputs, hook=pruner, max_new_tokens=4, eos_token_id=None),
                       lm2.generate(**inputs, max_new_tokens=4, eos_token_id=None))


VLM_PARAMS = {"dtp": dict(keep_ratio=0.5, early_layer=1, late_layer=6), "fastv": dict(layer=2),
              "vtw": dict(layer=5), "dart": dict(layer=2, pivots=2), "random_intra": dict(layer=2),
              "mtr": dict(layer=2)}


@pytest.mark.parametrize("name", sorted(ALL_PARAMS))
def test_every_method_through_the_mamba2_multimodal_model(vlm2, name):
    img, q = make_image(2), "how many shapes are there?"
    check_method_through_answer(vlm2, build(name, **VLM_PARAMS.get(name, {})), img, q)
    if name in KEEP_ALL:
        params = {**VLM_PARAMS.get(name, {}), **KEEP_ALL[name]}
        assert vlm2.answer(img, q, pruner=build(name, **params), max_new_tokens=6) == \
            vlm2.answer(img, q, max_new_tokens=6)


def _layer_inputs_by_hand(lm, embeds):
    """The normalised input of every layer of an unpruned run, layer by layer."""
    hidden, residual, inputs = embeds, None, []
    for block in lm.backbone.layers:
        stream = hidden if residual is None else residual + hidden
        inputs.append(block.norm(stream))
        hidden, residual, _ = block(hidden, residual)
    return inputs


def test_dtp_calibration_reads_delta_averaged_over_heads(vlm2, tmp_path):
    """Eq. 6 on a Mamba-2 layer: the mean of Δ over its heads (= over its d_ssm channels); Eq. 7's Std curve
    from it; Eq. 8-9 choose the layers; VTW's search runs on the same prepared inputs."""
    samples = [vlm2.prepare(make_image(s), "what colour is it?") for s in range(3)]
    by_layer = importance_by_layer(vlm2, samples[0])
    vis = samples[0].is_visual[0]
    with torch.no_grad():
        for layer, x in enumerate(_layer_inputs_by_hand(vlm2.lm, samples[0].inputs_embeds)):
            delta = vlm2.lm.backbone.layers[layer].mixer.ssd_inputs(x).delta[0]          # (L, nheads)
            want = delta.repeat_interleave(vlm2.lm.config.headdim, dim=-1).mean(-1)[vis]  # per channel, then mean
            torch.testing.assert_close(by_layer[layer][0], want, rtol=1e-5, atol=1e-6)
    cal = calibrate_dtp(vlm2, samples, cache_key="m2", cache_dir=tmp_path, progress=False)
    assert len(cal.std_curve) == 8 and cal.n_samples == 3 and 0 <= cal.early_layer <= 2 and cal.late_layer >= 6
    first = [float(layer_std(importance_by_layer(vlm2, s)[0][0])) for s in samples]
    assert cal.std_curve[0] == pytest.approx(sum(first) / 3, rel=1e-6)
    k, tried = search_vtw_layer(vlm2, samples, eta=float("inf"), start=2, progress=False)
    assert k == 2 and set(tried) == {2}


# ---------------------------------------------------------------------------------------------- implicit attention
def _ssd(L, h, g, n, seed, batch=None, p=3):
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    delta = F.softplus(torch.randn(*lead, L, h, generator=gen) - 0.5)
    A = -torch.exp(torch.randn(h, generator=gen) * 0.5)
    B = torch.randn(*lead, L, g, n, generator=gen)
    C = torch.randn(*lead, L, g, n, generator=gen)
    x = torch.randn(*lead, L, h, p, generator=gen)
    return delta, A, B, C, x


def _ssd_brute_force(delta, A, B, C):
    """(h, L, L) in float64: K_h[t, j] = C_t (prod_{k=j+1..t} exp(Δ_k A_h) I) Δ_j B_j, group of h."""
    L, h = delta.shape
    k = h // B.shape[1]
    K = torch.zeros(h, L, L, dtype=torch.float64)
    for head in range(h):
        g = head // k
        for t in range(L):
            for j in range(t + 1):
                decay = 1.0
                for s in range(j + 1, t + 1):
                    decay *= float(torch.exp(delta[s, head].double() * A[head].double()))
                K[head, t, j] = float(C[t, g].double() @ B[j, g].double()) * decay * float(delta[j, head])
    return K


def test_ssd_implicit_attention_matches_brute_force_and_reductions():
    delta, A, B, C, _ = _ssd(L=7, h=6, g=3, n=4, seed=0)
    ref = _ssd_brute_force(delta, A, B, C).float()
    torch.testing.assert_close(ssd_implicit_attention(delta, A, B, C, reduce="none"), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssd_implicit_attention(delta, A, B, C), ref.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssd_implicit_attention(delta, A, B, C, reduce="abs_mean"), ref.abs().mean(0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssd_implicit_attention(delta, A, B, C, heads=[5, 0], reduce="none"), ref[[5, 0]],
                               rtol=1e-5, atol=1e-6)
    for block_size in (1, 4, 64):
        torch.testing.assert_close(ssd_implicit_attention(delta, A, B, C, block_size=block_size), ref.mean(0),
                                   rtol=1e-5, atol=1e-6)
    assert bool((ref[:, torch.ones(7, 7, dtype=torch.bool).tril()] != 0).all())


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_ssd_implicit_attention_times_x_is_the_scan_output_per_head(groups):
    """sum_j K_h[t, j] x[j, h, :] = the SSD output of head h without D, from the sequential reference and from
    the chunked scan the model runs, for every head, channel and sample."""
    L, h, n = 37, 4, 5
    delta, A, B, C, x = _ssd(L, h, groups, n, seed=groups, batch=2)
    K = ssd_implicit_attention(delta, A, B, C, reduce="none")                      # (batch, h, L, L)
    y = torch.einsum("bhtj,bjhp->bthp", K, x)
    torch.testing.assert_close(y, ssd_scan_reference(x, delta, A, B, C), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, ssd_scan(x, delta, A, B, C, chunk_size=8), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ssd_implicit_attention(delta, A, B, C)[1],
                               ssd_implicit_attention(delta[1], A, B[1], C[1]))


def test_ssd_implicit_attention_is_safe_with_large_decays():
    L = 300
    delta = torch.full((L, 2), 10.0)
    A = torch.full((2,), -16.0)
    B = torch.ones(L, 1, 3)
    K = ssd_implicit_attention(delta, A, B, B.clone(), reduce="none")
    assert torch.isfinite(K).all() and bool((K.triu(1) == 0).all()) and bool((K.tril(-1) == 0).all())
    torch.testing.assert_close(torch.diagonal(K, dim1=1, dim2=2), torch.full((2, L), 30.0))   # C.B Δ = 3 * 10
    # small steps after a prefix summing to 1e4: the float64 differences keep exp(-1e-3 (t - j))
    delta = torch.cat([torch.full((200, 1), 50.0), torch.full((200, 1), 1e-3)])
    K = ssd_implicit_attention(delta, torch.tensor([-1.0]), torch.full((400, 1, 1), 2.0), torch.full((400, 1, 1), 1.5))
    t = torch.arange(200, dtype=torch.float64)
    expected = (3.0 * 1e-3 * torch.exp(-1e-3 * (t[:, None] - t[None, :]).clamp_min(0))).tril().float()
    torch.testing.assert_close(K[200:, 200:], expected, rtol=1e-5, atol=0)


def test_ssd_implicit_attention_rejects_bad_input():
    delta, A, B, C, _ = _ssd(L=5, h=4, g=2, n=3, seed=4)
    for args, needle in [((delta[0], A, B, C), "delta must be"), ((delta, A[:3], B, C), "A must be"),
                         ((delta, A, B[:4], C), "B and C must"), ((delta, A, B, C[..., :2]), "B and C must"),
                         ((delta, A, B[:, :1].expand(5, 3, 3), C[:, :1].expand(5, 3, 3)), "multiple of ngroups"),
                         ((delta, -A, B, C), "A must be <= 0"), ((-delta, A, B, C), "delta must be >= 0")]:
        with pytest.raises(ValueError, match=needle):
            ssd_implicit_attention(*args)
    with pytest.raises(ValueError, match=r"heads must lie in \[0, 4\)"):
        ssd_implicit_attention(delta, A, B, C, heads=[4])
    with pytest.raises(ValueError, match="reduce must be"):
        ssd_implicit_attention(delta, A, B, C, reduce="max")


def test_layer_implicit_attention_of_a_mamba2_layer(lm2):
    """The model-level map of layer 3 is the head-mean of K from the layer's own scan inputs; K applied to the
    layer's x plus the D skip is the SSD output whose mean is the "y" signal of the forward pass."""
    layer, L = 3, 15
    inputs = vlm_like_inputs(lm2, n_vis=9, n_text=6, seed=6)
    with torch.no_grad():
        res = layer_implicit_attention(lm2, **inputs, layer=layer)
        mixer = lm2.backbone.layers[layer].mixer
        inp = mixer.ssd_inputs(_layer_inputs_by_hand(lm2, inputs["inputs_embeds"])[layer])
        K = ssd_implicit_attention(inp.delta[0], inp.A, inp.B[0], inp.C[0], reduce="none")
        per_head = implicit_attention_maps(lm2, [layer], **inputs, reduce="none", channels=[1, 6])[layer].map
        seen = {}

        def keep(seq):
            if seq.layer == layer:
                seen.update(seq.signals)
        lm2(**inputs, hook=keep, signal_layers=[layer])
    torch.testing.assert_close(res.map, K.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_head, K[[1, 6]], rtol=1e-5, atol=1e-6)
    assert res.map.shape == (L, L) and res.visual_span == (0, 9)
    y = torch.einsum("htj,jhp->thp", K, inp.x[0]) + inp.x[0] * mixer.D[:, None]
    torch.testing.assert_close(y.mean((-2, -1)), seen["y"][0], rtol=1e-4, atol=1e-5)


def test_mamba2_maps_after_a_cut_and_with_padding(lm2):
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    keep = [0, 2, 3, 7, 8, 9]

    def cut_after_1(seq):
        if seq.layer == 1:
            return seq.select(torch.tensor([keep]))
    with torch.no_grad():
        maps = implicit_attention_maps(lm2, [4, 1], ids, attention_mask=mask, sample=1)
        alone = implicit_attention_maps(lm2, [1, 4], ids[1:, 4:])
        cut = layer_implicit_attention(lm2, ids[:1], layer=2, hook=cut_after_1)
        hidden, residual = lm2.backbone.embedding(ids[:1]), None
        for block in lm2.backbone.layers[:2]:
            hidden, residual, _ = block(hidden, residual)
        block = lm2.backbone.layers[2]
        inp = block.mixer.ssd_inputs(block.norm((residual + hidden)[:, keep]))
    for layer in (1, 4):
        torch.testing.assert_close(maps[layer].map, alone[layer].map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cut.map, ssd_implicit_attention(inp.delta[0], inp.A, inp.B[0], inp.C[0]),
                               rtol=1e-5, atol=1e-6)
    assert cut.positions.tolist() == keep


# ---------------------------------------------------------------------------------------------- planner
def test_planner_on_the_mamba2_model(vlm2, tmp_path):
    from mambaprune.data import SynthConfig, generate_synthvqa, load_dataset
    from mambaprune.planner.measure import _prepared

    generate_synthvqa(tmp_path, SynthConfig(seed=2, per_family=1, train_multiplier=1))
    prepared = _prepared(vlm2, load_dataset("synthvqa", tmp_path, "val")[:2])
    curves = P.measure_curves(vlm2, prepared, points=3, progress=False)
    assert curves.n_layer == 8 and curves.n_visual == fx.NUM_VISUAL and curves.runs > 0
    pol = P.plan(vlm2, prepared, 0.9, curves=curves)
    cfg, N, T = vlm2.lm.config, curves.n_visual, curves.n_text
    pruner = build(pol.method, **pol.params)
    # the planner's FLOPs are the Mamba-2 count of the method's own per-layer tokens
    assert pol.flops_ratio == pytest.approx(lm_macs(cfg, pruner.expected_tokens(8, N, T))
                                            / lm_macs(cfg, [N + T] * 8), rel=1e-12)
    assert pol.flops_ratio <= 0.9
    e, n, l = pol.policy["early_layer"], pol.policy["n_keep"], pol.policy["late_layer"]
    e = -1 if e is None else e
    assert float(P.flops_ratios(cfg, N, T, e, n, l)) == pytest.approx(pol.flops_ratio, rel=1e-9)
    for p in prepared:
        assert vlm2.prefill(p, pruner=pruner).tokens_per_layer == P.policy_tokens(8, N, len(p.text_ids[0]), e, n, l)
