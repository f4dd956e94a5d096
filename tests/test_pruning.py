"""Pruning methods: DTP against a hand-cut run, the baselines' invariants, layer selection, calibration."""
import math
import time

import pytest
import torch

from mambaprune.pruning import available_methods, build, method_params
from mambaprune.pruning.base import topk_in_order
from mambaprune.pruning.calibration import (calibrate_dtp, first_token_kl, importance_by_layer, search_vtw_layer,
                                            std_curve)
from mambaprune.pruning.dart import dart_select
from mambaprune.pruning.divprune import max_min_diverse
from mambaprune.pruning.dtp import layer_std, select_layers
from mambaprune.pruning.mtr import bipartite_mean_merge, mtr_groups

N_VIS, N_TEXT = 24, 7


def vlm_like_inputs(lm, batch=1, n_vis=N_VIS, n_text=N_TEXT, seed=0):
    """[visual][text] inputs_embeds with is_visual, like a multimodal model builds them."""
    g = torch.Generator().manual_seed(seed)
    vis = torch.randn(batch, n_vis, lm.config.d_model, generator=g)
    ids = torch.randint(0, lm.config.vocab_size, (batch, n_text), generator=g)
    embeds = torch.cat([vis, lm.backbone.embedding(ids).detach()], dim=1)
    is_visual = torch.zeros(batch, n_vis + n_text, dtype=torch.bool)
    is_visual[:, :n_vis] = True
    return dict(inputs_embeds=embeds, is_visual=is_visual)


class Recorder:
    """Wraps a pruner and keeps the sequence each layer received (positions and kinds)."""

    def __init__(self, inner):
        self.inner = inner
        self.seen = {}

    @property
    def signal_layers(self):
        return self.inner.signal_layers

    def start(self, config):
        self.inner.start(config)

    def __call__(self, seq):
        out = self.inner(seq)
        out = seq if out is None else out
        self.seen[seq.layer + 1] = (out.positions.clone(), out.is_visual.clone(), out.mask.clone())
        return out


ALL_PARAMS = {
    "none": {},
    "dtp": dict(keep_ratio=0.5, early_layer=1, late_layer=4),
    "fastv": dict(keep_ratio=0.4, layer=2),
    "vtw": dict(layer=3),
    "dart": dict(keep_ratio=0.5, layer=2, pivots=3),
    "random_pre": dict(keep_ratio=0.3, seed=3),
    "random_intra": dict(keep_ratio=0.6, layer=2, seed=3),
    "divprune": dict(keep_ratio=0.5),
    "mtr": dict(keep_ratio=0.5, layer=2),
}


def test_every_registered_method_is_covered():
    assert set(available_methods()) == set(ALL_PARAMS)


# ---------------------------------------------------------------------------------------------- DTP
def test_dtp_keep_all_without_late_pruning_is_exactly_unpruned(small_lm):
    inputs = vlm_like_inputs(small_lm, batch=2)
    ref = small_lm(**inputs)
    pr = build("dtp", keep_ratio=1.0, early_layer=1, late_pruning=False)
    out = small_lm(**inputs, hook=pr)
    assert torch.equal(out.logits, ref.logits)
    assert out.tokens_per_layer == ref.tokens_per_layer
    assert torch.equal(small_lm.generate(**inputs, hook=pr, max_new_tokens=6, eos_token_id=None),
                       small_lm.generate(**inputs, max_new_tokens=6, eos_token_id=None))


def _hand_run(lm, embeds, is_visual, early, late, keep_ratio, signal="delta"):
    """DTP by hand: run the blocks one by one, take Δ of layer ``early``, cut, and drop all visual at ``late``."""
    hidden, residual = embeds, None
    vis = is_visual[0].clone()
    counts = []
    for l, block in enumerate(lm.backbone.layers):
        if l == late:                                            # complete pruning: layer `late` sees no visual
            keep = torch.nonzero(~vis).flatten()
            hidden, residual, vis = hidden[:, keep], residual[:, keep], vis[keep]
        counts.append(hidden.shape[1])
        hidden, residual, signals = block(hidden, residual, want_signals=(l == early))
        if l == early:
            s = signals[signal][0]
            vis_idx = torch.nonzero(vis).flatten()
            k = math.floor(vis_idx.numel() * keep_ratio + 0.5)
            top = vis_idx[torch.topk(s[vis_idx], k).indices]
            keep = torch.sort(torch.cat([top, torch.nonzero(~vis).flatten()])).values
            hidden, residual, vis = hidden[:, keep], residual[:, keep], vis[keep]
    last = (hidden + residual)[:, -1]
    return lm.lm_head(lm.backbone.norm_f(last)), counts


@pytest.mark.parametrize("signal", ["delta", "B", "y"])
def test_dtp_equals_a_hand_cut_run(small_lm, signal):
    inputs = vlm_like_inputs(small_lm, seed=4)
    with torch.no_grad():
        want, counts = _hand_run(small_lm, inputs["inputs_embeds"], inputs["is_visual"], 1, 4, 0.5, signal)
        out = small_lm(**inputs, hook=build("dtp", keep_ratio=0.5, early_layer=1, late_layer=4, signal=signal))
    torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-5)
    assert out.tokens_per_layer == counts == [31, 31, 19, 19, 7, 7]


def test_dtp_fractional_layers_and_validation(small_lm):
    pr = build("dtp", early_layer=0.25, late_layer=0.7)
    pr.start(small_lm.config)
    assert (pr.early_layer, pr.late_layer) == (1, 4)          # int(0.25*6)=1, int(0.7*6)=4
    assert pr.signal_layers == {1}
    for bad in [dict(keep_ratio=1.5), dict(signal="x"), dict(selection="best")]:
        with pytest.raises(ValueError):
            build("dtp", **bad)
    with pytest.raises(ValueError, match="late_layer"):
        build("dtp", early_layer=3, late_layer=3).start(small_lm.config)
    with pytest.raises(ValueError, match="outside"):
        build("dtp", early_layer=9).start(small_lm.config)


def test_dtp_topk_all_can_cut_text_and_keeps_the_same_count(small_lm):
    inputs = vlm_like_inputs(small_lm, seed=2)
    rec_v = Recorder(build("dtp", keep_ratio=0.5, early_layer=1, late_pruning=False))
    rec_a = Recorder(build("dtp", keep_ratio=0.5, early_layer=1, late_pruning=False, selection="topk_all"))
    out_v, out_a = small_lm(**inputs, hook=rec_v), small_lm(**inputs, hook=rec_a)
    assert out_v.tokens_per_layer == out_a.tokens_per_layer
    # topk_all ranks every token by Δ of layer 1: its kept set is the top 12 + 7 of all tokens
    rec = {}

    def grab(seq):
        if seq.layer == 1:
            rec["delta"] = seq.signals["delta"][0].clone()
    small_lm(**inputs, hook=grab, signal_layers={1})
    by_hand = torch.sort(torch.topk(rec["delta"], 12 + N_TEXT).indices).values
    assert torch.equal(rec_a.seen[2][0][0], by_hand)


def test_dtp_random_selection_needs_no_signal_and_is_seeded(small_lm):
    inputs = vlm_like_inputs(small_lm)
    a = Recorder(build("dtp", selection="random", early_layer=1, late_layer=4, seed=5))
    b = Recorder(build("dtp", selection="random", early_layer=1, late_layer=4, seed=5))
    c = Recorder(build("dtp", selection="random", early_layer=1, late_layer=4, seed=6))
    assert a.signal_layers == set()
    for r in (a, b, c):
        small_lm(**inputs, hook=r)
    assert torch.equal(a.seen[2][0], b.seen[2][0]) and not torch.equal(a.seen[2][0], c.seen[2][0])


# ------------------------------------------------------------------------------------ layer selection
def test_select_layers_paper_shape_64_layers():
    std = torch.linspace(1.0, 2.0, 64)
    std[15] = 0.1                                  # local minimum inside the early range
    std[45:] += 5.0                                # the cliff between l = 44 and l = 45
    assert select_layers(std, 64) == (15, 45)


def test_select_layers_range_edges():
    L = 64                                          # early candidates 0..16, late l = 44..62
    std = torch.ones(L)
    std[16] = 0.0
    std[17] = -1.0                                  # outside the early range
    assert select_layers(std, L)[0] == 16
    std = torch.ones(L)
    std[0] = 0.5
    assert select_layers(std, L)[0] == 0
    std = torch.ones(L)
    std[63] = 9.0                                   # jump between l = 62 and 63: the last candidate
    assert select_layers(std, L)[1] == 63
    std = torch.ones(L)
    std[44] = 9.0                                   # jump 43->44 is outside (l starts at 44); 44->45 counts
    assert select_layers(std, L)[1] == 45
    std = torch.ones(L)
    std[40:] = 3.0                                  # a jump before the range only: flat inside -> first l
    assert select_layers(std, L) == (0, 45)
    assert select_layers([3.0, 1.0, 2.0, 2.5, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0], 10) == (1, 9)


def test_select_layers_validation():
    with pytest.raises(ValueError, match="one per layer"):
        select_layers([1.0, 2.0], 3)
    with pytest.raises(ValueError, match=">= 3"):
        select_layers([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="NaN"):
        select_layers([1.0, float("nan"), 2.0], 3)


def test_layer_std_is_eq7_population_std():
    s = torch.tensor([1.0, 2.0, 4.0, 5.0])
    assert float(layer_std(s)) == pytest.approx(math.sqrt(((1 - 3) ** 2 + 1 + 1 + 4) / 4))


# ---------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("name", sorted(ALL_PARAMS))
def test_each_method_keeps_its_count_never_cuts_text_keeps_order(small_lm, name):
    inputs = vlm_like_inputs(small_lm, seed=1)
    pruner = build(name, **ALL_PARAMS[name])
    rec = Recorder(pruner)
    t0 = time.perf_counter()
    out = small_lm(**inputs, hook=rec)
    total = time.perf_counter() - t0
    assert out.tokens_per_layer == pruner.expected_tokens(small_lm.config.n_layer, N_VIS, N_TEXT)
    for layer, (pos, vis, mask) in rec.seen.items():
        p = pos[0][mask[0]]
        assert bool((p[1:] > p[:-1]).all()), f"{name}: order broken before layer {layer}"
        text = p[~vis[0][mask[0]]]
        assert torch.equal(text, torch.arange(N_VIS, N_VIS + N_TEXT)), f"{name} cut a text token"
    # the time spent deciding: none when nothing is decided, else some, and part of the forward pass only
    if name == "none":
        assert pruner.act_layers == set() and pruner.method_seconds == 0.0
    else:
        assert pruner.act_layers and 0.0 < pruner.method_seconds < total, (pruner.method_seconds, total)


@pytest.mark.parametrize("name", sorted(ALL_PARAMS))
def test_each_method_is_deterministic_and_batch_invariant(small_lm, name):
    a, b = vlm_like_inputs(small_lm, seed=7), vlm_like_inputs(small_lm, seed=8, n_text=4)
    pr = build(name, **ALL_PARAMS[name])
    single = [small_lm(**x, hook=pr).logits for x in (a, b)]
    again = small_lm(**a, hook=build(name, **ALL_PARAMS[name])).logits
    assert torch.equal(single[0], again)
    # left-padded batch of the two
    La, Lb = a["inputs_embeds"].shape[1], b["inputs_embeds"].shape[1]
    pad = La - Lb
    embeds = torch.cat([a["inputs_embeds"], torch.cat([torch.zeros(1, pad, small_lm.config.d_model),
                                                       b["inputs_embeds"]], 1)])
    is_vis = torch.cat([a["is_visual"], torch.cat([torch.zeros(1, pad, dtype=torch.bool), b["is_visual"]], 1)])
    mask = torch.ones(2, La, dtype=torch.long)
    mask[1, :pad] = 0
    if name.startswith("random"):
        return                                       # one generator draws for the whole batch: rows differ
    batched = small_lm(inputs_embeds=embeds, is_visual=is_vis, attention_mask=mask, hook=pr).logits
    torch.testing.assert_close(batched, torch.cat(single), rtol=1e-4, atol=1e-4)


def test_random_methods_seeded(small_lm):
    inputs = vlm_like_inputs(small_lm)
    for name in ("random_pre", "random_intra"):
        runs = {}
        for seed in (1, 1, 2):
            rec = Recorder(build(name, keep_ratio=0.5, seed=seed))
            small_lm(**inputs, hook=rec)
            runs.setdefault(seed, []).append(rec.seen[max(rec.seen)][0])
        assert torch.equal(runs[1][0], runs[1][1]) and not torch.equal(runs[1][0], runs[2][0])


def test_fastv_keeps_the_top_delta_of_the_previous_layer(small_lm):
    inputs = vlm_like_inputs(small_lm, seed=3)
    got = {}

    def grab(seq):
        if seq.layer == 1:
            got["d"] = seq.signals["delta"][0, :N_VIS].clone()
    small_lm(**inputs, hook=grab, signal_layers={1})
    rec = Recorder(build("fastv", keep_ratio=0.25, layer=2))
    small_lm(**inputs, hook=rec)
    kept = rec.seen[2][0][0][rec.seen[2][1][0]]
    assert torch.equal(kept, torch.sort(torch.topk(got["d"], 6).indices).values)


def test_vtw_layer_zero_and_never(small_lm):
    inputs = vlm_like_inputs(small_lm)
    assert small_lm(**inputs, hook=build("vtw", layer=0)).tokens_per_layer == [N_TEXT] * 6
    assert small_lm(**inputs, hook=build("vtw", layer=6)).tokens_per_layer == [N_VIS + N_TEXT] * 6


def test_topk_in_order_ties_and_counts():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 5.0]])
    cand = torch.tensor([[True, True, True, True, False]])
    assert topk_in_order(scores, cand, 2).tolist() == [[False, True, True, False, False]]
    assert topk_in_order(scores, cand, 10).tolist() == [[True, True, True, True, False]]
    assert topk_in_order(scores, cand, 0).sum() == 0


def test_dart_by_hand_and_empty_pool():
    f = torch.tensor([[3.0, 0.0], [0.0, 2.0], [2.9, 0.1], [0.1, 1.0], [1.0, 1.0]])
    # pivots: largest norms = rows 0 (3.0) and 2 (~2.9); budget 4 -> two more, one per pivot:
    # pivot 0 is least similar to row 1 ([0,2]); pivot 2 then to row 3 ([0.1,1])
    assert dart_select(f, 4, num_pivots=2).tolist() == [0, 1, 2, 3]
    assert dart_select(f, 1, num_pivots=8).tolist() == [0]
    assert dart_select(f, 99, num_pivots=2).tolist() == [0, 1, 2, 3, 4]    # pool runs out: no error
    assert dart_select(f, 0).numel() == 0


def test_divprune_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.05], [0.7, 0.7]])
    # row 3 is farthest from its nearest neighbour; then the row farthest from {3}: row 0 or 1 -> 0 (~2.0),
    # then the farthest from {0, 3}: row 2 (distance 1 to both)
    assert max_min_diverse(f, 3).tolist() == [0, 2, 3]
    assert max_min_diverse(f, 0).numel() == 0 and max_min_diverse(f, 9).numel() == 5


def test_mtr_groups_and_mean_conservation():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.2, 0.3, 0.8, 0.4])
    keep, target, source = mtr_groups(scores, 5)           # 3 sources, keep group = min(3, 5 // 2) = 2
    assert keep.tolist() == [0, 6] and target.tolist() == [3, 2, 7] and source.tolist() == [5, 4, 1]
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 4, generator=g)
    vals = [torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)]
    merged, match = bipartite_mean_merge(feats, vals, target, source)
    for v, m in zip(vals, merged):
        for i, t in enumerate(target.tolist()):
            group = [t] + source[match == i].tolist()
            torch.testing.assert_close(m[i], v[group].mean(0))
        # the merge conserves the sum (hence the mean) of what it merges
        counts = 1 + torch.bincount(match, minlength=target.numel())
        torch.testing.assert_close((m * counts[:, None]).sum(0), v[torch.cat([target, source])].sum(0))


def test_mtr_merges_hidden_and_residual_alike(small_lm):
    inputs = vlm_like_inputs(small_lm, seed=5)
    seen = {}

    def grab(seq):
        if seq.layer == 1:
            seen["in"] = seq
    small_lm(**inputs, hook=grab, signal_layers={1})
    pr = build("mtr", keep_ratio=0.5, layer=2)
    pr.start(small_lm.config)
    out = pr(seen["in"])
    s = seen["in"]
    vis = torch.nonzero(s.is_visual[0]).flatten()
    keep, target, source = mtr_groups(s.signals["delta"][0, vis], 12)
    (h, r), _ = bipartite_mean_merge(s.stream()[0, vis], [s.hidden[0, vis], s.residual[0, vis]], target, source)
    pos = out.positions[0].tolist()
    for i, t in enumerate(target.tolist()):
        j = pos.index(int(vis[t]))
        torch.testing.assert_close(out.hidden[0, j], h[i])
        torch.testing.assert_close(out.residual[0, j], r[i])
    assert out.num_visual().item() == 12


# ---------------------------------------------------------------------------------------- registry
def test_build_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown pruning method 'fast'"):
        build("fast")
    with pytest.raises(ValueError, match="no parameter"):
        build("fastv", ratio=0.5)
    assert "keep_ratio" in method_params("fastv")


def test_signal_missing_is_a_clear_error(small_lm):
    inputs = vlm_like_inputs(small_lm)
    pr = build("fastv")
    with pytest.raises(RuntimeError, match="not computed"):
        small_lm(**inputs, hook=pr, signal_layers=())


# ---------------------------------------------------------------------------------------- calibration
def test_std_curve_and_calibration_cache(small_lm, tmp_path):
    samples = [vlm_like_inputs(small_lm, seed=s) for s in range(3)]
    curve, per_sample = std_curve(small_lm, samples, progress=False)
    assert per_sample.shape == (3, 6)
    grabbed = {}

    def grab(seq):
        if seq.layer >= 0:
            grabbed[seq.layer] = seq.signals["delta"][0, :N_VIS].detach().clone()
    small_lm(**samples[2], hook=grab, signal_layers=True)
    for l in range(6):
        assert float(per_sample[2, l]) == pytest.approx(float(grabbed[l].std(unbiased=False)), rel=1e-5)
    cal = calibrate_dtp(small_lm, samples, cache_key="small/test", cache_dir=tmp_path, progress=False)
    assert (cal.early_layer, cal.late_layer) == select_layers(curve, 6)
    files = list(tmp_path.glob("dtp-*.json"))
    assert len(files) == 1
    text = files[0].read_text().replace(f'"early_layer": {cal.early_layer}', '"early_layer": 0')
    files[0].write_text(text)                                   # the cached file is what is read back
    assert calibrate_dtp(small_lm, samples, cache_key="small/test", cache_dir=tmp_path).early_layer == 0


def test_first_token_kl_by_hand():
    p = torch.tensor([[0.0, math.log(3.0)]])                     # P = (1/4, 3/4)
    q = torch.tensor([[0.0, 0.0]])                               # Q = (1/2, 1/2)
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert float(first_token_kl(p, q)) == pytest.approx(want)
    assert float(first_token_kl(q, q)) == 0.0


def test_vtw_search(small_lm):
    samples = [vlm_like_inputs(small_lm, seed=s) for s in range(2)]
    k, tried = search_vtw_layer(small_lm, samples, eta=1e9, start=2, progress=False)
    assert k == 2 and list(tried) == [2]
    k, tried = search_vtw_layer(small_lm, samples, eta=-1.0, start=2, progress=False)
    assert k == 6 and list(tried) == [2, 3, 4, 5]
    with torch.no_grad():
        full = [small_lm(**s).logits for s in samples]
        want = torch.cat([first_token_kl(small_lm(**s, hook=build("vtw", layer=4)).logits, f)
                          for s, f in zip(samples, full)]).mean()
    assert tried[4] == pytest.approx(float(want))
