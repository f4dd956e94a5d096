"""Mamba-2: the SSD scan against its sequential reference, the layer and LM against transformers' Mamba2ForCausalLM
and a hand-written reference, decoding, pruning hooks, padding, signals and both checkpoint layouts."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import mamba2_lm, randomize_
from mambaprune import MambaConfig, MambaLM
from mambaprune.models.checkpoints import CheckpointError, from_transformers_model, load_mamba_lm, save_mamba_lm
from mambaprune.pruning import build
from mambaprune.ssm.ssd import (CPU_CHUNK_SIZE, prefill_chunk_size, segsum, ssd_scan, ssd_scan_reference,
                                ssd_state_update, time_step)

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
    D, z = torch.randn(6, 4, generator=gen), torch.randn(2, 23, 6, 4, generator=gen)
    bias = torch.randn(6, generator=gen)
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


# ---------------------------------------------------------------------------------------------- models
HF_BASE = dict(hidden_size=32, num_heads=8, head_dim=8, n_groups=2, state_size=8, num_hidden_layers=3,
               vocab_size=64, chunk_size=8, conv_kernel=4, expand=2, tie_word_embeddings=False)


def hf_mamba2_pair(seed=0, **hf_kwargs):
    """(transformers Mamba2ForCausalLM, our MambaLM) holding the same random weights, both in eval mode."""
    from transformers import Mamba2Config, Mamba2ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    hf = Mamba2ForCausalLM(Mamba2Config(**dict(HF_BASE, **hf_kwargs))).eval()
    randomize_(hf, seed)
    return hf, from_transformers_model(hf)


@pytest.fixture(scope="module")
def lm2():
    """A 6-layer Mamba-2 LM with several groups and chunks of 4 tokens."""
    return mamba2_lm(seed=1, n_layer=6)


def greedy_by_full_forwards(forward_logits, ids, n):
    """n greedy tokens, each from a full forward over the prompt and the tokens so far (no cache)."""
    seq = ids
    for _ in range(n):
        seq = torch.cat([seq, forward_logits(seq).argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:]


HF_CONFIGS = [
    dict(n_groups=1, chunk_size=8),
    dict(n_groups=2, chunk_size=5),
    dict(n_groups=4, chunk_size=16, conv_kernel=3, use_bias=True),
    dict(n_groups=2, chunk_size=4, time_step_limit=(0.3, 0.9), tie_word_embeddings=True),
]


@pytest.mark.parametrize("cfg", HF_CONFIGS)
def test_matches_transformers_mamba2(cfg):
    """Logits of every position within 1e-4 (L = 21 is no multiple of any chunk size), identical greedy
    generations. transformers' own cached decoding skips time_step_limit (as mamba_ssm's step does), so the
    generations are compared with transformers' greedy run over full forwards, and with its cached generate
    when no limit binds."""
    hf, ours = hf_mamba2_pair(seed=3, **cfg)
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
        out_all = ours(ids, return_all_logits=True)
        first = ours.backbone.layers[0]
        delta = first.mixer.ssd_inputs(first.norm(ours.backbone.embedding(ids))).delta
    if "time_step_limit" in cfg:
        lo, hi = cfg["time_step_limit"]
        assert bool((delta == lo).any()) and bool((delta == hi).any()), "the limit must clamp on both sides"
    torch.testing.assert_close(out.logits, ref[:, -1], rtol=0, atol=1e-4)
    torch.testing.assert_close(out_all.logits, ref, rtol=0, atol=1e-4)
    gen = ours.generate(ids, max_new_tokens=10, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(gen, greedy_by_full_forwards(lambda s: hf(s).logits[:, -1], ids, 10))
        if "time_step_limit" not in cfg:
            hf.generation_config.eos_token_id = None
            cached = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
            assert torch.equal(gen, cached[:, ids.shape[1]:])
    assert len(set(gen[0].tolist())) > 2, "degenerate random model: the comparison would mean little"


# ------------------------------------------------------------------- options transformers lacks: a hand reference
def reference_mixer(m, x, cfg):
    """One Mamba-2 mixer written out from mamba_ssm's Mamba2.forward (``modules/mamba2.py`` l.210-272: in_proj
    split, conv over xBC, the scan, the gated MLP part) with F.conv1d, the sequential ssd_scan_reference and the
    gated RMSNorm of ``ops/triton/layernorm_gated.py``'s rms_norm_ref."""
    d_ssm = cfg.d_ssm or cfg.d_inner
    d_mlp, h, g, n, P = cfg.d_inner - d_ssm, d_ssm // cfg.headdim, cfg.ngroups, cfg.d_state, cfg.headdim
    z0, x0, z, xBC, dt = F.linear(x, m.in_proj.weight, m.in_proj.bias).split(
        [d_mlp, d_mlp, d_ssm, d_ssm + 2 * g * n, h], dim=-1)
    L = x.shape[1]
    xBC = F.silu(F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=cfg.d_conv - 1,
                          groups=xBC.shape[-1])[..., :L]).transpose(1, 2)
    xs, B, C = xBC.split([d_ssm, g * n, g * n], dim=-1)
    y = ssd_scan_reference(xs.unflatten(-1, (h, P)), dt, -torch.exp(m.A_log), B.unflatten(-1, (g, n)),
                           C.unflatten(-1, (g, n)), D=m.D.view(h, P) if cfg.D_has_hdim else m.D,
                           dt_bias=m.dt_bias, dt_softplus=True, dt_limit=cfg.dt_limit).flatten(-2)
    gate = F.silu(z)
    if cfg.rmsnorm:
        v = (y if cfg.norm_before_gate else y * gate).unflatten(-1, (g, d_ssm // g))
        v = (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).flatten(-2) * m.norm.weight
        y = v * gate if cfg.norm_before_gate else v
    else:
        y = y * gate
    if d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


def reference_logits(lm, ids):
    """All-position logits of the pre-norm residual stack with :func:`reference_mixer` in every layer."""
    hidden, residual = lm.backbone.embedding(ids), None
    for block in lm.backbone.layers:
        residual = hidden if residual is None else residual + hidden
        hidden = reference_mixer(block.mixer, block.norm(residual), lm.config)
    return lm.lm_head(lm.backbone.norm_f(residual + hidden))


OWN_OPTIONS = [
    dict(norm_before_gate=True),
    dict(D_has_hdim=True, ngroups=1),
    dict(d_ssm=32, expand=2, ngroups=4),                 # half of d_inner = 64 goes through the gated MLP
    dict(rmsnorm=False, dt_limit=(0.2, 0.8), bias=True, conv_bias=False),
]


@pytest.mark.parametrize("fields", OWN_OPTIONS)
def test_options_transformers_lacks_match_a_hand_reference(fields):
    lm = mamba2_lm(seed=4, **fields)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, return_all_logits=True).logits, reference_logits(lm, ids),
                                   rtol=0, atol=1e-4)
        gen = lm.generate(ids, max_new_tokens=6, eos_token_id=None)
        assert torch.equal(gen, greedy_by_full_forwards(lambda s: reference_logits(lm, s)[:, -1], ids, 6))


# ------------------------------------------------------------------- decoding, hooks, batches, signals
@pytest.mark.parametrize("fields", [dict(), dict(dt_limit=(0.25, 0.7), D_has_hdim=True, d_conv=2),
                                    dict(d_ssm=32, norm_before_gate=True, chunk_size=3)])
def test_prefill_then_decoding_equals_full_forward(fields):
    lm = mamba2_lm(seed=5, **fields)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = lm(ids, use_cache=True)
        state = out.cache.layers[0]
        mixer = lm.backbone.layers[0].mixer
        assert state.conv_state.shape == (2, mixer.conv_dim, lm.config.d_conv)
        assert state.ssm_state.shape == (2, mixer.nheads, lm.config.headdim, lm.config.d_state)
        assert state.ssm_state.dtype == torch.float32
        seq, logits = ids, out.logits
        for i in range(6):
            torch.testing.assert_close(logits, lm(seq).logits, rtol=0, atol=1e-4)
            token = logits.argmax(-1)
            seq = torch.cat([seq, token[:, None]], 1)
            logits = lm.step(token, out.cache)


def test_dtp_keep_all_without_late_pruning_changes_nothing(lm2):
    g = torch.Generator().manual_seed(6)
    embeds = torch.randn(2, 14, 32, generator=g)
    is_visual = torch.zeros(2, 14, dtype=torch.bool)
    is_visual[:, :10] = True
    ref = lm2(inputs_embeds=embeds, is_visual=is_visual)
    pr = build("dtp", keep_ratio=1.0, early_layer=1, late_pruning=False)
    out = lm2(inputs_embeds=embeds, is_visual=is_visual, hook=pr)
    assert torch.equal(out.logits, ref.logits) and out.tokens_per_layer == ref.tokens_per_layer
    assert torch.equal(lm2.generate(inputs_embeds=embeds, is_visual=is_visual, hook=pr, max_new_tokens=5,
                                    eos_token_id=None),
                       lm2.generate(inputs_embeds=embeds, is_visual=is_visual, max_new_tokens=5, eos_token_id=None))
    cut = lm2(inputs_embeds=embeds, is_visual=is_visual, hook=build("dtp", keep_ratio=0.5, early_layer=1,
                                                                      late_pruning=False))
    assert cut.tokens_per_layer == [28, 28] + [18] * 4          # the signals drive a real cut after layer 1


def test_signals_by_hand_from_in_proj():
    """Δ = clamp(softplus(dt + dt_bias)) from in_proj's last nheads outputs, averaged over heads; B and C from
    F.conv1d, averaged over groups and d_state; y has one value per token."""
    lm = mamba2_lm(seed=7, dt_limit=(0.2, 0.9))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    seen = {}

    def hook(seq):
        seen[seq.layer] = dict(seq.signals)
    hook.signal_layers = {0, 2}
    with torch.no_grad():
        lm(ids, hook=hook)
        block = lm.backbone.layers[0]
        m, cfg = block.mixer, lm.config
        zxbcdt = block.mixer.in_proj(block.norm(lm.backbone.embedding(ids)))
        delta = torch.clamp(F.softplus(zxbcdt[..., -m.nheads:] + m.dt_bias), 0.2, 0.9)
        xBC = zxbcdt[..., cfg.d_inner:cfg.d_inner + m.conv_dim]
        conv = F.silu(F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=cfg.d_conv - 1,
                               groups=m.conv_dim)[..., :9]).transpose(1, 2)
        gn = cfg.ngroups * cfg.d_state
        B, C = conv[..., cfg.d_inner:cfg.d_inner + gn], conv[..., cfg.d_inner + gn:]
    assert set(seen[0]) == set(seen[2]) == {"delta", "B", "C", "y"} and seen[1] == {}
    torch.testing.assert_close(seen[0]["delta"], delta.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen[0]["B"], B.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen[0]["C"], C.mean(-1), rtol=1e-5, atol=1e-6)
    assert seen[0]["y"].shape == (2, 9)


def test_released_chunk_is_capped_on_a_cpu_without_changing_the_result(monkeypatch):
    """A layer's prefill on a CPU runs the SSD scan with chunks of at most CPU_CHUNK_SIZE (the config's 256 is a
    GPU tiling choice), and the scan at 64 equals the scan at 256 to fp32 rounding on L = 150."""
    import mambaprune.models.mamba2 as mamba2_module

    assert CPU_CHUNK_SIZE == 64
    assert prefill_chunk_size(256, torch.device("cpu")) == 64 and prefill_chunk_size(32, torch.device("cpu")) == 32
    assert prefill_chunk_size(256, torch.device("cuda")) == 256
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(layer="Mamba2", d_model=32, n_layer=2, vocab_size=64, d_state=8, headdim=8,
                             chunk_size=256))
    seen = []

    def spy(*args, **kw):
        seen.append(args[5])
        return ssd_scan(*args, **kw)
    monkeypatch.setattr(mamba2_module, "ssd_scan", spy)
    with torch.no_grad():
        lm(torch.randint(0, 64, (1, 150)))
    assert seen == [64, 64]
    x = torch.randn(1, 150, 4, 8)
    dt, A = torch.rand(1, 150, 4), -torch.rand(4) * 3
    B, C = torch.randn(1, 150, 1, 8), torch.randn(1, 150, 1, 8)
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, 64), ssd_scan(x, dt, A, B, C, 256), rtol=1e-4, atol=1e-5)


def test_config_validation():
    assert MambaConfig(layer="Mamba2", d_model=32, headdim=8, ngroups=4).d_inner == 64
    for bad in (dict(layer="Mamba3"), dict(layer="Mamba2", d_model=32, headdim=48),
                dict(layer="Mamba2", d_model=32, headdim=8, ngroups=3), dict(layer="Mamba2", d_model=32, d_ssm=96),
                dict(layer="Mamba2", chunk_size=0), dict(dt_limit=(0.5, 0.1)), dict(dt_limit=(0.1,))):
        with pytest.raises(ValueError):
            MambaConfig(**bad)
    cfg = MambaConfig(layer="Mamba2", d_model=32, headdim=8, dt_limit=[0.1, float("inf")])
    assert MambaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---------------------------------------------------------------------------------------------- checkpoints
def test_transformers_mamba2_folder_loads_and_round_trips(tmp_path):
    """transformers' own save_pretrained folder (safetensors) loads; save_mamba_lm writes it back in
    transformers' layout, which both loaders read to the same logits."""
    hf, _ = hf_mamba2_pair(seed=8, time_step_limit=(0.0, 0.8))
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert raw["model_type"] == "mamba2"
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    lm = load_mamba_lm(tmp_path / "hf")
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(lm(ids, return_all_logits=True).logits, ref, rtol=0, atol=1e-4)
    save_mamba_lm(lm, tmp_path / "ours")
    again = load_mamba_lm(tmp_path / "ours")
    assert again.config == lm.config
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values()))
    from transformers import Mamba2ForCausalLM
    theirs = Mamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ref, rtol=0, atol=1e-4)


RELEASED_MAMBA2_CONFIG = {"d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 50,
                          "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
                          "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
                          "tie_embeddings": True}


def write_mamba2_ssm_folder(folder, config, seed=0):
    """A state-spaces/mamba2-* style folder: config.json + pytorch_model.bin, mamba_ssm's key names and shapes
    (written out here from Mamba2.__init__), the vocabulary padded to 16, lm_head.weight sharing the embedding."""
    ssm = config["ssm_cfg"]
    d, n_layer, g_ = config["d_model"], config["n_layer"], torch.Generator().manual_seed(seed)
    d_inner = ssm.get("expand", 2) * d
    n, P, G, k = ssm.get("d_state", 128), ssm.get("headdim", 64), ssm.get("ngroups", 1), ssm.get("d_conv", 4)
    h, conv_dim = d_inner // P, d_inner + 2 * G * n
    rows = -(-config["vocab_size"] // 16) * 16
    r = lambda *s: torch.randn(*s, generator=g_) / math.sqrt(s[-1])  # noqa: E731
    tensors = {"backbone.embedding.weight": torch.randn(rows, d, generator=g_), "backbone.norm_f.weight": 1 + r(d) / 10}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        tensors.update({p + "norm.weight": 1 + r(d) / 10, p + "mixer.in_proj.weight": r(2 * d_inner + 2 * G * n + h, d),
                        p + "mixer.conv1d.weight": r(conv_dim, 1, k), p + "mixer.conv1d.bias": r(conv_dim),
                        p + "mixer.dt_bias": r(h), p + "mixer.A_log": torch.rand(h, generator=g_),
                        p + "mixer.D": torch.randn(h, generator=g_), p + "mixer.norm.weight": 1 + r(d_inner) / 10,
                        p + "mixer.out_proj.weight": 3 * r(d, d_inner)})
    tensors["lm_head.weight"] = tensors["backbone.embedding.weight"]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(tensors, folder / "pytorch_model.bin")
    return tensors


def test_mamba_ssm_mamba2_folder_in_the_released_layout(tmp_path):
    """The released config form ({"layer": "Mamba2"} only: d_state 128, headdim 64, ngroups 1 by default);
    every tensor lands in its parameter, and the logits equal transformers' Mamba2 on the same weights."""
    tensors = write_mamba2_ssm_folder(tmp_path / "ssm", RELEASED_MAMBA2_CONFIG)
    lm = load_mamba_lm(tmp_path / "ssm")
    c = lm.config
    assert (c.layer, c.d_state, c.headdim, c.ngroups, c.padded_vocab_size, c.tie_embeddings) == \
        ("Mamba2", 128, 64, 1, 64, True)
    state = lm.state_dict()
    assert set(state) == set(tensors) and all(torch.equal(state[k], v) for k, v in tensors.items())
    from transformers import Mamba2Config, Mamba2ForCausalLM
    hf = Mamba2ForCausalLM(Mamba2Config(hidden_size=64, num_heads=2, head_dim=64, n_groups=1, state_size=128,
                                        num_hidden_layers=2, vocab_size=64, tie_word_embeddings=True)).eval()
    hf.load_state_dict({k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in tensors.items()})
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, return_all_logits=True).logits, hf(ids).logits, rtol=0, atol=1e-4)


def test_mamba_ssm_mamba2_folder_with_ssm_cfg_and_round_trip(tmp_path):
    """ngroups, d_state, headdim, chunk_size, dt_limit from ssm_cfg; save_mamba_lm(layout="mamba_ssm") writes the
    same layout back and it reloads to the same model."""
    ssm = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 4, "dt_limit": [0.0, 0.5]}
    write_mamba2_ssm_folder(tmp_path / "ssm", dict(RELEASED_MAMBA2_CONFIG, ssm_cfg=ssm))
    lm = load_mamba_lm(tmp_path / "ssm")
    assert (lm.config.d_state, lm.config.headdim, lm.config.ngroups, lm.config.chunk_size, lm.config.dt_limit) == \
        (8, 16, 2, 4, (0.0, 0.5))
    save_mamba_lm(lm, tmp_path / "back", layout="mamba_ssm")
    raw = json.loads((tmp_path / "back" / "config.json").read_text())
    assert raw["ssm_cfg"]["layer"] == "Mamba2" and raw["pad_vocab_size_multiple"] == 16
    assert (tmp_path / "back" / "pytorch_model.bin").is_file()
    again = load_mamba_lm(tmp_path / "back")
    assert again.config == lm.config
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values()))


def test_options_transformers_lacks_are_saved_in_mamba_ssm_layout(tmp_path):
    lm = mamba2_lm(seed=9, norm_before_gate=True, D_has_hdim=True, d_ssm=32)
    with pytest.raises(ValueError, match="norm_before_gate"):
        save_mamba_lm(lm, tmp_path / "t", layout="transformers")
    save_mamba_lm(lm, tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()
    again = load_mamba_lm(tmp_path / "m")
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    assert again.config.norm_before_gate and again.config.D_has_hdim and again.config.d_ssm == 32
    with torch.no_grad():
        assert torch.equal(again(ids).logits, lm(ids).logits)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(model_type="falcon_mamba"), "falcon_mamba"),
    (lambda c: c.update(num_heads=3), "num_heads"),
])
def test_bad_transformers_mamba2_configs_are_refused(tmp_path, edit, needle):
    hf, _ = hf_mamba2_pair(seed=10)
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=needle):
        load_mamba_lm(tmp_path)
