"""FLOPs accounting: the linear terms against torch.utils.flop_counter, pruned runs, matched-cost search."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mambaprune.flops import (expected_macs, flops_ratio, head_macs, layer_macs_breakdown, layer_macs_per_token,
                              lm_macs, match_flops, module_macs)
from mambaprune.pruning import build

from test_pruning import N_TEXT, N_VIS, vlm_like_inputs

LINEAR = ("in_proj", "x_proj", "dt_proj", "out_proj")


def test_linear_terms_match_flop_counter_and_the_rest_is_the_stated_scan_term(small_lm):
    cfg = small_lm.config
    inputs = vlm_like_inputs(small_lm)
    L = N_VIS + N_TEXT
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        small_lm(**inputs)
    per_module = counter.get_flop_counts()
    b = layer_macs_breakdown(cfg)
    for i in range(cfg.n_layer):
        for name in LINEAR:
            key = next(k for k in per_module if k.endswith(f"layers.{i}.mixer.{name}"))
            assert sum(per_module[key].values()) == 2 * b[name] * L, (i, name)
    head = next(k for k in per_module if k.endswith("lm_head"))
    assert sum(per_module[head].values()) == 2 * head_macs(cfg)
    linear = sum(b[n] for n in LINEAR)
    rest = layer_macs_per_token(cfg) - linear
    assert rest == cfg.d_conv * cfg.d_inner + 9 * cfg.d_inner * cfg.d_state + 2 * cfg.d_inner
    assert lm_macs(cfg, [L] * cfg.n_layer) == (linear + rest) * L * cfg.n_layer + head_macs(cfg)


@pytest.mark.parametrize("name,params", [("dtp", dict(keep_ratio=0.5, early_layer=1, late_layer=4)),
                                         ("fastv", dict(keep_ratio=0.3)), ("vtw", dict(layer=2)),
                                         ("mtr", dict(keep_ratio=0.6))])
def test_pruned_run_costs_the_sum_of_its_layers(small_lm, name, params):
    cfg = small_lm.config
    out = small_lm(**vlm_like_inputs(small_lm), hook=build(name, **params))
    per_layer = [t * layer_macs_per_token(cfg) for t in out.tokens_per_layer]
    assert lm_macs(cfg, out.tokens_per_layer) == sum(per_layer) + head_macs(cfg)
    assert expected_macs(build(name, **params), cfg, N_VIS, N_TEXT) == lm_macs(cfg, out.tokens_per_layer)
    full = [N_VIS + N_TEXT] * cfg.n_layer
    assert flops_ratio(cfg, out.tokens_per_layer, full) == lm_macs(cfg, out.tokens_per_layer) / lm_macs(cfg, full)


def test_match_flops_is_the_closest_admissible_value(small_lm):
    cfg = small_lm.config
    base = lm_macs(cfg, [N_VIS + N_TEXT] * cfg.n_layer)
    for method, target in [("fastv", 0.6), ("dtp", 0.5), ("vtw", 0.7)]:
        value, ratio = match_flops(method, target, cfg, N_VIS, N_TEXT)
        param = "layer" if method == "vtw" else "keep_ratio"
        grid = range(cfg.n_layer + 1) if method == "vtw" else [c / N_VIS for c in range(N_VIS + 1)]
        ratios = {}
        for v in grid:
            try:
                ratios[v] = expected_macs(build(method, **{param: v}), cfg, N_VIS, N_TEXT) / base
            except ValueError:
                pass
        best = min(abs(r - target) for r in ratios.values())
        assert abs(ratio - target) == pytest.approx(best) and ratios[value] == ratio
    with pytest.raises(ValueError):
        match_flops("fastv", 1.5, cfg, N_VIS, N_TEXT)


def test_match_flops_by_hand_with_its_tie_break():
    """A 4-layer model with no LM head (vocabulary 0), 4 visual + 4 text tokens: every layer costs the same per
    token, so a ratio is (tokens summed over the layers) / 32, and the answers follow by hand."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(n_layer=4, d_model=8, d_inner=16, d_state=4, dt_rank=2, d_conv=4, padded_vocab_size=0)
    # FastV at layer 2 keeping c of 4 visual tokens: layers 0-1 see 8 tokens, layers 2-3 see c + 4, so the
    # ratio is (24 + 2c) / 32 = 0.75, 0.8125, 0.875, 0.9375, 1 for c = 0..4
    assert match_flops("fastv", 0.9, cfg, 4, 4) == (0.5, 0.875)          # 0.875 is 0.025 away, 0.9375 0.0375
    assert match_flops("fastv", 0.7, cfg, 4, 4) == (0.0, 0.75)           # keeping none is admissible
    # 27/32 lies exactly halfway between c = 1 (0.8125) and c = 2 (0.875): the tie goes to the larger keep ratio
    assert match_flops("fastv", 27 / 32, cfg, 4, 4) == (0.5, 0.875)
    # VTW at layer k: k layers see 8 tokens, 4 - k see the 4 text tokens, ratio (16 + 4k) / 32 = 0.5 .. 1; 0.5625
    # is halfway between k = 0 (0.5) and k = 1 (0.625): the tie goes to the later layer
    assert match_flops("vtw", 0.5625, cfg, 4, 4) == (1, 0.625)
    assert match_flops("vtw", 0.95, cfg, 4, 4) == (4, 1.0)               # layer = n_layer: never withdrawn
    # FastV's layer at keep 0.5 (2 kept): (24 + 2k) / 32 for k = 1..3; layer 0 is not admitted (it reads the
    # signal of layer K - 1), so 0.75 is matched by layer 1 (0.8125), not by the inadmissible exact 0
    assert match_flops("fastv", 0.75, cfg, 4, 4, param="layer", keep_ratio=0.5) == (1, 0.8125)
    # the fixed parameters are held: DTP with early layer 0 and late layer 2 keeping c: layer 0 sees 8, layer 1
    # sees c + 4, layers 2-3 see 4: (20 + c) / 32; 0.71875 = 23/32 is c = 3 exactly
    assert match_flops("dtp", 23 / 32, cfg, 4, 4, early_layer=0, late_layer=2) == (0.75, 0.71875)


def test_module_macs_counts_a_projector():
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 4))
    assert module_macs(mlp, torch.zeros(3, 5, 6)) == 15 * (6 * 10 + 10 * 4)
