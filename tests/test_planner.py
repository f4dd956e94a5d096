"""The budget planner (DOP's search over DTP policies): divergence (Eq. 9-10), interpolation (Eq. 8), FLOPs of a
policy, the Eq. 7 search on hand-made divergence tables, Appendix C.4's n_min, Spearman's rho, and the planner
end to end on the tiny random MLLM of ``runner_fixture_model`` (8 layers, 16 visual tokens), CLI and
``eval --policy`` included. Expected values are worked out by hand in the comments.
"""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

import runner_fixture_model as fx  # noqa: E402
from mambaprune import planner as P  # noqa: E402
from mambaprune.data import SynthConfig, generate_synthvqa, load_dataset  # noqa: E402
from mambaprune.eval.cli import add_eval_arguments, config_from_args  # noqa: E402
from mambaprune.eval.records import read_records  # noqa: E402
from mambaprune.eval.runner import run_eval  # noqa: E402
from mambaprune.flops import lm_macs  # noqa: E402
from mambaprune.models.mamba_lm import MambaConfig  # noqa: E402
from mambaprune.planner.measure import _n_text, _prepared  # noqa: E402
from mambaprune.pruning import build  # noqa: E402

MODEL = "runner_fixture_model:load_tiny"


pytestmark = pytest.mark.usefixtures("one_thread")


def logits_of(probs):
    """Logits whose softmax is exactly ``probs`` (log 0 = -inf)."""
    return torch.tensor(probs, dtype=torch.float64).log()


# ---------------------------------------------------------------------------------------------- divergence
def test_divergence_top_k_and_renormalisation_by_hand():
    # unpruned [.5 .3 .15 .05], pruned [.2 .4 .1 .3], k = 2: top-2 of the unpruned = tokens 0, 1
    # p = [.5 .3] / .8 = [.625 .375], q = [.2 .4] / .6 = [1/3 2/3]
    ref, pru = logits_of([0.5, 0.3, 0.15, 0.05]), logits_of([0.2, 0.4, 0.1, 0.3])
    want = 0.625 * math.log(0.625 / (1 / 3)) + 0.375 * math.log(0.375 / (2 / 3))
    assert want == pytest.approx(0.1771191, abs=1e-6)
    got = P.first_token_divergence(ref, pru, k=2, eps=0.0)
    assert got.dim() == 0 and float(got) == pytest.approx(want, rel=1e-12)
    # KL(unpruned || pruned), top-k of the first argument: swapped, the top-2 of [.2 .4 .1 .3] are tokens 1, 3
    # p = [.4 .3] / .7 = [4/7 3/7], q = [.3 .05] / .35 = [6/7 1/7]
    swapped = 4 / 7 * math.log((4 / 7) / (6 / 7)) + 3 / 7 * math.log((3 / 7) / (1 / 7))
    assert float(P.first_token_divergence(pru, ref, k=2, eps=0.0)) == pytest.approx(swapped, rel=1e-12)
    # k = 10 on a vocabulary of 4: every token, the full KL
    full = sum(a * math.log(a / b) for a, b in zip([0.5, 0.3, 0.15, 0.05], [0.2, 0.4, 0.1, 0.3]))
    assert float(P.first_token_divergence(ref, pru, eps=0.0)) == pytest.approx(full, rel=1e-12)
    # identical distributions: 0
    assert float(P.first_token_divergence(ref, ref)) == pytest.approx(0.0, abs=1e-15)


def test_divergence_top_k_restriction_ignores_mass_moved_outside():
    # unpruned [.4 .2 .2 .2]: top-2 = tokens 0 and 1 (ties go to the lower id); the pruned model moves mass to
    # tokens 2 and 3 but keeps the 2:1 ratio of tokens 0 and 1 -> both renormalise to [2/3 1/3]: divergence 0
    ref, pru = logits_of([0.4, 0.2, 0.2, 0.2]), logits_of([0.2, 0.1, 0.35, 0.35])
    assert float(P.first_token_divergence(ref, pru, k=2, eps=0.0)) == pytest.approx(0.0, abs=1e-15)
    full = sum(a * math.log(a / b) for a, b in zip([0.4, 0.2, 0.2, 0.2], [0.2, 0.1, 0.35, 0.35]))
    assert float(P.first_token_divergence(ref, pru, k=4, eps=0.0)) == pytest.approx(full, rel=1e-12) and full > 0.1
    # a tie inside the reference: top-2 of [.2 .4 .2 .2] = tokens 1 and 0 (the lower id of the tied ones)
    ref2, pru2 = logits_of([0.2, 0.4, 0.2, 0.2]), logits_of([0.1, 0.3, 0.3, 0.3])
    p, q = [0.4 / 0.6, 0.2 / 0.6], [0.3 / 0.4, 0.1 / 0.4]
    want = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert float(P.first_token_divergence(ref2, pru2, k=2, eps=0.0)) == pytest.approx(want, rel=1e-12)


def test_divergence_epsilon():
    # the pruned model gives 0 to a top-2 token: infinite without epsilon, finite with it
    ref, pru = logits_of([0.6, 0.4, 0.0]), logits_of([1.0, 0.0, 0.0])
    assert math.isinf(float(P.first_token_divergence(ref, pru, k=2, eps=0.0)))
    e = 1e-8
    p = [(0.6 + e) / (1 + 2 * e), (0.4 + e) / (1 + 2 * e)]
    q = [(1 + e) / (1 + 2 * e), e / (1 + 2 * e)]
    want = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert want == pytest.approx(0.6 * math.log(0.6) + 0.4 * math.log(0.4 / 1e-8), rel=1e-6)    # ~ 6.6953
    assert float(P.first_token_divergence(ref, pru, k=2)) == pytest.approx(want, rel=1e-10)
    # a large epsilon changes the value as the formula says: case of the first test with eps = 0.1
    # p = [.6 .4] / 1.0, q = [.3 .5] / .8 = [.375 .625]
    ref, pru = logits_of([0.5, 0.3, 0.15, 0.05]), logits_of([0.2, 0.4, 0.1, 0.3])
    want = 0.6 * math.log(0.6 / 0.375) + 0.4 * math.log(0.4 / 0.625)
    assert float(P.first_token_divergence(ref, pru, k=2, eps=0.1)) == pytest.approx(want, rel=1e-12)


def test_divergence_batch_rows_and_errors():
    ref = torch.stack([logits_of([0.5, 0.3, 0.15, 0.05]), logits_of([0.4, 0.2, 0.2, 0.2])])
    pru = torch.stack([logits_of([0.2, 0.4, 0.1, 0.3]), logits_of([0.2, 0.1, 0.35, 0.35])])
    rows = P.first_token_divergence(ref, pru, k=2, eps=0.0)
    assert rows.shape == (2,)
    assert rows.tolist() == pytest.approx([0.1771191, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        P.first_token_divergence(ref, pru[0])
    with pytest.raises(ValueError, match="k must"):
        P.first_token_divergence(ref, pru, k=0)


# ---------------------------------------------------------------------------------------------- interpolation
def test_interpolate_eq8_by_hand():
    xs, ys = [0, 2, 6], [1.0, 0.5, 0.0]
    # x = 1: 1 + (1-0)/(2-0) (0.5-1) = 0.75; x = 4: 0.5 + (4-2)/(6-2) (0-0.5) = 0.25; x = 5: 0.5 - 0.375 = 0.125
    assert P.interpolate(1, xs, ys) == pytest.approx(0.75)
    assert P.interpolate(4, xs, ys) == pytest.approx(0.25)
    assert P.interpolate(5, xs, ys) == pytest.approx(0.125)
    assert [P.interpolate(x, xs, ys) for x in xs] == [1.0, 0.5, 0.0]         # the sampled points themselves
    assert isinstance(P.interpolate(3, xs, ys), float)
    assert P.interpolate([0, 1, 3, 6], xs, ys).tolist() == pytest.approx([1.0, 0.75, 0.375, 0.0])
    assert P.interpolate(7, [7], [0.3]) == 0.3
    with pytest.raises(ValueError, match="outside"):
        P.interpolate(7, xs, ys)                                              # Eq. 8 does not extrapolate
    with pytest.raises(ValueError, match="increasing"):
        P.interpolate(1, [0, 2, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        P.interpolate(1, [0, 2], [1.0])


# ---------------------------------------------------------------------------------------------- Spearman
def test_spearman_by_hand():
    # no ties: ranks of y = 1 3 2 4, d = 0 -1 1 0, rho = 1 - 6*2 / (4*15) = 0.8
    assert P.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert P.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert P.spearman([0.1, 5, 7], [1, 2, 100]) == pytest.approx(1.0)
    # ties: y = 5 6 7 8 7 -> ranks 1 2 3.5 5 3.5; deviations from 3: x -2 -1 0 1 2, y -2 -1 .5 2 .5
    # sxy = 4 + 1 + 0 + 2 + 1 = 8, sxx = 10, syy = 9.5 -> rho = 8 / sqrt(95)
    assert P.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert math.isnan(P.spearman([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError):
        P.spearman([1], [2])
    with pytest.raises(ValueError):
        P.spearman([1, 2], [1, 2, 3])


# ---------------------------------------------------------------------------------------------- FLOPs
def test_flops_ratio_closed_form_matches_the_methods_own_count():
    cfg = MambaConfig(d_model=32, n_layer=8, vocab_size=257, d_state=8)
    N, T, L = 16, 5, 8
    base = lm_macs(cfg, [N + T] * L)
    checked = 0
    for e in range(L - 1):
        for n in range(1, N):
            for l in range(e + 2, L + 1):
                method, params = P.policy_method(e, n, l, L, N)
                pruner = build(method, **params)
                tokens = pruner.expected_tokens(L, N, T)
                assert method == "dtp" and tokens == P.policy_tokens(L, N, T, e, n, l)
                ratio = float(P.flops_ratios(cfg, N, T, e, n, l))
                assert ratio == pytest.approx(lm_macs(cfg, tokens) / base, rel=1e-12)
                checked += 1
    for l in range(1, L + 1):
        method, params = P.policy_method(-1, N, l, L, N)
        assert (method, params) == (("none", {}) if l == L else ("vtw", {"layer": l}))
        tokens = build(method, **params).expected_tokens(L, N, T)
        assert tokens == P.policy_tokens(L, N, T, -1, N, l)
        assert float(P.flops_ratios(cfg, N, T, -1, N, l)) == pytest.approx(lm_macs(cfg, tokens) / base, rel=1e-12)
    assert checked == 15 * sum(L - e - 1 for e in range(L - 1))
    # a hand case: 4 layers, 4 visual + 2 text tokens, (e=0, n=2, l=3) -> tokens 6 4 4 2 = 16 of 24
    small = MambaConfig(d_model=16, n_layer=4, vocab_size=16)
    assert P.policy_tokens(4, 4, 2, 0, 2, 3) == [6, 4, 4, 2]
    per, head = lm_macs(small, [1, 0, 0, 0]) - lm_macs(small, [0, 0, 0, 0]), lm_macs(small, [0, 0, 0, 0])
    assert float(P.flops_ratios(small, 4, 2, 0, 2, 3)) == pytest.approx((16 * per + head) / (24 * per + head))
    # keep / N (6 decimals) gives back exactly n tokens under DTP's rounding, for every n
    assert P.policy_method(2, 5, 6, 8, 16) == ("dtp", {"keep_ratio": 0.3125, "early_layer": 2, "late_layer": 6})
    assert P.policy_method(15, 532, 51, 64, 729)[1]["keep_ratio"] == 0.729767           # 532 / 729 = 0.7297668...
    for N in (16, 256, 729, 2880):
        for n in range(1, N):
            ratio = P.policy_method(15, n, 45, 64, N)[1]["keep_ratio"]
            dtp = build("dtp", keep_ratio=ratio, early_layer=15, late_layer=45)
            assert dtp.expected_tokens(64, N, 21)[20] == n + 21
    with pytest.raises(ValueError):
        P.policy_method(3, 5, 4, 8, 16)                                     # late = early + 1: no selective stage


def test_min_visual_tokens_appendix_c4():
    cfg = MambaConfig(d_model=32, n_layer=8, vocab_size=257, d_state=8)
    N, T, e_ref = 16, 4, 1
    base = lm_macs(cfg, [N + T] * 8)

    def alone(n):                                       # tokens reduced alone: DTP at e_ref, no late pruning
        return lm_macs(cfg, build("dtp", keep_ratio=n / N, early_layer=e_ref, late_layer=8)
                       .expected_tokens(8, N, T)) / base

    budget = alone(6)                                   # exactly met by n_e = 6
    assert P.min_visual_tokens_for(cfg, N, T, budget, e_ref, alpha=1.25) == 8     # ceil(7.5)
    assert P.min_visual_tokens_for(cfg, N, T, budget, e_ref, alpha=1.5) == 9
    assert P.min_visual_tokens_for(cfg, N, T, budget, e_ref, alpha=1.0) == 6
    assert P.min_visual_tokens_for(cfg, N, T, budget, e_ref, alpha=0.0) == 1
    assert P.min_visual_tokens_for(cfg, N, T, budget + 1e-4, e_ref, alpha=1.0) == 6      # closest count
    assert P.min_visual_tokens_for(cfg, N, T, budget, e_ref, alpha=4.0) == N            # capped at N
    mid = (alone(6) + alone(7)) / 2                                       # halfway: the tie goes to the larger
    assert P.min_visual_tokens_for(cfg, N, T, mid, e_ref, alpha=1.0) == 7
    assert P.min_visual_tokens_for(cfg, N, T, 0.01, e_ref, alpha=1.25) == 1             # n_e = 0


# ---------------------------------------------------------------------------------------------- Eq. 7 search
#: 3 layers, 2 visual + 1 text token: tokens summed over the layers (unpruned 9) of every policy
#:   vtw l=1: 3 1 1 = 5   vtw l=2: 3 3 1 = 7   (0,1,2): 3 2 1 = 6   (0,1,3): 3 2 2 = 7   (1,1,3): 3 3 2 = 8
TOY_CFG = MambaConfig(d_model=16, n_layer=3, vocab_size=16)
TOY_LATE = {1: 1.0, 2: 0.3}
TOY_KEEP = {1: 0.2}
TOY_EARLY = {0: 0.15, 1: 0.05}
#: Eq. 7 sums: vtw1 1.0, vtw2 0.3, (0,1,2) 0.3+0.15+0.2 = 0.65, (0,1,3) 0.35, (1,1,3) 0.25, none 0


def toy_budget(total_tokens):
    """The FLOPs ratio of a policy whose layers process ``total_tokens`` tokens in all (head included)."""
    return lm_macs(TOY_CFG, [total_tokens, 0, 0]) / lm_macs(TOY_CFG, [3, 3, 3])


def toy_solve(budget, **kw):
    kw.setdefault("d_early", TOY_EARLY)
    kw.setdefault("d_keep", TOY_KEEP)
    kw.setdefault("d_late", TOY_LATE)
    r = P.solve(TOY_CFG, 2, 1, budget, **kw)
    return (r["early"], r["keep"], r["late"]), r["predicted_divergence"]


def test_solve_toy_table_by_hand():
    assert toy_solve(toy_budget(8)) == ((1, 1, 3), pytest.approx(0.25))
    assert toy_solve(toy_budget(7)) == ((-1, 2, 2), pytest.approx(0.3))       # vtw 2 beats (0,1,3) = 0.35
    assert toy_solve(toy_budget(6)) == ((0, 1, 2), pytest.approx(0.65))
    assert toy_solve(toy_budget(5)) == ((-1, 2, 1), pytest.approx(1.0))
    assert toy_solve(1.0) == ((-1, 2, 3), 0.0)                               # budget 1: no pruning
    with pytest.raises(ValueError, match="no policy meets"):
        toy_solve(toy_budget(5) - 1e-6)
    # Appendix C.4: n_min = 2 leaves the policies without a selective stage only
    assert toy_solve(toy_budget(8), min_visual_tokens=2) == ((-1, 2, 2), pytest.approx(0.3))
    # separable: stage = D_keep(n) * w(e), w = {0: 2, 1: 0.5}: (0,1,3) 0.4, (1,1,3) 0.1, (0,1,2) 0.7
    sep = dict(d_early={0: 2.0, 1: 0.5}, interaction="separable")
    assert toy_solve(toy_budget(8), **sep) == ((1, 1, 3), pytest.approx(0.1))
    assert toy_solve(toy_budget(7), **sep) == ((-1, 2, 2), pytest.approx(0.3))
    # the anchored stage is clipped at 0: D_early(0) = -0.5 -> (0,1,3) scores max(0, -0.3) = 0, the best at 7
    assert toy_solve(toy_budget(7), d_early={0: -0.5, 1: 0.05}) == ((0, 1, 3), 0.0)
    # ties go to the larger FLOPs ratio: (0,1,3) (7 tokens) and (1,1,3) (8) both score 0
    assert toy_solve(toy_budget(8), d_early={0: -0.5, 1: -0.3}) == ((1, 1, 3), 0.0)


def brute_force(cfg, N, T, budget, d_early, d_keep, d_late, n_min):
    """Eq. 7 by plain loops over every policy, FLOPs counted by the methods themselves."""
    L = cfg.n_layer
    base = lm_macs(cfg, [N + T] * L)
    best = None
    cands = [(-1, N, l) for l in range(1, L + 1)]
    cands += [(e, n, l) for e in range(L - 1) for n in range(max(1, n_min), N) for l in range(e + 2, L + 1)]
    feasible = []
    for e, n, l in cands:
        method, params = P.policy_method(e, n, l, L, N)
        ratio = lm_macs(cfg, build(method, **params).expected_tokens(L, N, T)) / base
        if ratio > budget + 1e-12:
            continue
        score = {**d_late, L: 0.0}[l] + (d_early[e] + d_keep[n] if n < N else 0.0)
        feasible.append((e, n, l))
        key = (score, -ratio)
        if best is None or key < best[0]:
            best = (key, (e, n, l))
    return best[1], best[0][0], feasible


def test_solve_is_the_argmin_and_never_over_budget():
    cfg = MambaConfig(d_model=16, n_layer=6, vocab_size=32, d_state=4)
    N, T, L = 8, 3, 6
    g = torch.Generator().manual_seed(3)
    d_late = {l: float(v) for l, v in zip(range(1, L), torch.rand(L - 1, generator=g).sort(descending=True).values)}
    d_keep = {n: float(v) for n, v in zip(range(1, N), torch.rand(N - 1, generator=g).sort(descending=True).values)}
    d_early = {e: float(v) for e, v in zip(range(L - 1), torch.rand(L - 1, generator=g))}
    base = lm_macs(cfg, [N + T] * L)
    for budget in [0.6 + 0.02 * i for i in range(21)]:
        for n_min in (1, 4):
            pol = P.enumerate_policies(cfg, N, T, budget, min_visual_tokens=n_min)
            assert bool((pol["flops_ratio"] <= budget + 1e-12).all())
            assert bool(((pol["keep"] >= n_min) | (pol["keep"] == N)).all())
            want, score, feasible = brute_force(cfg, N, T, budget, d_early, d_keep, d_late, n_min)
            got_set = set(zip(pol["early"].tolist(), pol["keep"].tolist(), pol["late"].tolist()))
            assert got_set == set(feasible) and len(got_set) == len(feasible)
            r = P.solve(cfg, N, T, budget, d_early, d_keep, d_late, min_visual_tokens=n_min)
            assert (r["early"], r["keep"], r["late"]) == want
            assert r["predicted_divergence"] == pytest.approx(score)
            method, params = P.policy_method(r["early"], r["keep"], r["late"], L, N)
            assert lm_macs(cfg, build(method, **params).expected_tokens(L, N, T)) / base <= budget + 1e-12


# ---------------------------------------------------------------------------------------------- curves
def hand_curves():
    return P.Curves(n_layer=8, n_visual=16, n_text=4, n_samples=3, ref_early=2, ref_keep=8,
                    early={0: 0.4, 2: 0.1, 6: 0.02}, keep={1: 0.5, 8: 0.1, 16: 0.0}, late={1: 0.9, 5: 0.1, 8: 0.0})


def test_curve_tables_and_prediction_by_hand():
    c = hand_curves()
    d_early, d_keep, d_late = c.tables("additive")
    assert sorted(d_early) == list(range(0, 7)) and sorted(d_keep) == list(range(1, 17))
    assert sorted(d_late) == list(range(1, 9))
    # early: anchored at D(2, 8) = 0.1; e = 1: (0.4 + 0.1) / 2 - 0.1 = 0.15; e = 4: (0.1 + 0.02) / 2 - 0.1 = -0.04
    assert d_early[1] == pytest.approx(0.15) and d_early[4] == pytest.approx(-0.04) and d_early[2] == 0.0
    assert d_keep[12] == pytest.approx(0.05) and d_keep[4] == pytest.approx(0.5 + 3 / 7 * (0.1 - 0.5))
    assert d_late[3] == pytest.approx(0.5) and d_late[8] == 0.0
    sep_early = c.tables("separable")[0]
    assert sep_early[1] == pytest.approx(2.5) and sep_early[4] == pytest.approx(0.6) and sep_early[2] == 1.0
    # objective: (1, 12, 3) additive 0.5 + max(0, 0.15 + 0.05) = 0.7, separable 0.5 + 0.05 * 2.5 = 0.625
    assert c.predict(1, 12, 3) == pytest.approx(0.7)
    assert P.predict_divergence(c, 1, 12, 3, "separable") == pytest.approx(0.625)
    assert c.predict(4, 12, 8) == pytest.approx(0.01)                        # 0 + (-0.04 + 0.05)
    assert c.predict(4, 15, 8) == pytest.approx(0.0)                         # max(0, -0.04 + 0.0125)
    assert c.predict(-1, 16, 3) == pytest.approx(0.5) and c.predict(5, 16, 8) == 0.0   # no selective stage
    # the JSON round trip keeps integer keys
    back = P.Curves.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c


def test_default_points_by_hand():
    # 8 layers, 16 tokens, 3 points: late int(1 + 7 i / 3 + .5) = 1 3 6; keep 7/8 and 1/2 of 16 and 1; early 0 3 6
    assert P.default_points(8, 16, 3) == {"early": [0, 3, 6], "keep": [1, 8, 14], "late": [1, 3, 6]}
    pts = P.default_points(64, 729, 6)
    assert pts["late"] == [1, 12, 22, 33, 43, 54]
    assert pts["keep"] == [1, 46, 91, 182, 365, 638]
    assert pts["early"] == [0, 12, 25, 37, 50, 62]
    with pytest.raises(ValueError):
        P.default_points(8, 16, 1)


# ---------------------------------------------------------------------------------------------- on a model
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("planner") / "synth"
    generate_synthvqa(root, SynthConfig(seed=1, per_family=2, train_multiplier=1))
    return root


@pytest.fixture(scope="module")
def model():
    return fx.load_tiny()


@pytest.fixture(scope="module")
def prepared(model, data):
    return _prepared(model, load_dataset("synthvqa", data, "val")[:3])


@pytest.fixture(scope="module")
def curves(model, prepared):
    return P.measure_curves(model, prepared, points=3, progress=False)


def test_measure_curves_on_the_tiny_model(model, prepared, curves):
    L, N = 8, 16
    assert (curves.n_layer, curves.n_visual, curves.n_samples, curves.ref_early, curves.ref_keep) == (L, N, 3, 2, 8)
    assert curves.n_text == _n_text(prepared) == round(sum(len(p.text_ids[0]) for p in prepared) / 3)
    assert sorted(curves.early) == [0, 2, 3, 6] and sorted(curves.keep) == [1, 8, 14, 16]
    assert sorted(curves.late) == [1, 3, 6, 8]
    assert curves.keep[N] == 0.0 and curves.late[L] == 0.0
    # 3 late + 3 keep + 4 early points, the anchor (e_ref, n_ref) shared: 9 runs, linear in the points
    assert curves.runs == 9
    assert curves.early[2] == curves.keep[8]
    assert all(v >= 0 for c in (curves.early, curves.keep, curves.late) for v in c.values())
    assert curves.late[1] > 0 and curves.keep[1] > 0
    # one point by hand: VTW at layer 3 against the unpruned model, Eq. 9-10 averaged over the samples
    values = []
    vocab = model.lm.config.vocab_size
    for p in prepared:
        ref = model.prefill(p).logits[..., :vocab]
        cut = model.prefill(p, pruner=build("vtw", layer=3)).logits[..., :vocab]
        values.append(float(P.first_token_divergence(ref, cut)))
    assert curves.late[3] == pytest.approx(sum(values) / len(values), rel=1e-9)


def test_plan_on_the_tiny_model(model, prepared, curves):
    none = P.plan(model, [], 1.0)                                     # no samples needed, no run made
    assert (none.method, none.params, none.flops_ratio, none.predicted_divergence) == ("none", {}, 1.0, 0.0)
    assert P.plan(model, [], 1.0, curves=curves).method == "none"
    for budget in (0.95, 0.9, 0.85, 0.8):
        for inter in P.INTERACTIONS:
            pol = P.plan(model, prepared, budget, curves=curves, interaction=inter)
            assert pol.flops_ratio <= budget
            e, n, l = pol.policy["early_layer"], pol.policy["n_keep"], pol.policy["late_layer"]
            assert pol.predicted_divergence == pytest.approx(curves.predict(-1 if e is None else e, n, l, inter))
            assert n >= pol.search["min_visual_tokens"] or n == 16
            # the method and params run exactly this policy: the real prefill's per-layer token counts
            pruner = build(pol.method, **pol.params)
            for p in prepared:
                out = model.prefill(p, pruner=pruner)
                T = len(p.text_ids[0])
                assert out.tokens_per_layer == P.policy_tokens(8, 16, T, -1 if e is None else e, n, l)
    # FLOPs counted at another text length when asked (a comparison at matched FLOPs gives its prompts' length)
    short = P.plan(model, [], 0.9, curves=curves, n_text=20)
    p = short.policy
    assert p["n_text"] == 20 and short.flops_ratio <= 0.9
    e = -1 if p["early_layer"] is None else p["early_layer"]
    assert short.flops_ratio == pytest.approx(float(P.flops_ratios(model.lm.config, 16, 20, e, p["n_keep"],
                                                                   p["late_layer"])))
    with pytest.raises(ValueError, match="no policy meets"):
        P.plan(model, prepared, 0.5, curves=curves)                       # 52 text tokens: 0.5 is out of reach
    with pytest.raises(ValueError, match="budget"):
        P.plan(model, prepared, 0.0, curves=curves)


def test_check_additivity_on_the_tiny_model(model, prepared, curves):
    check = P.check_additivity(model, prepared, 6, curves=curves, progress=False)
    assert check["n_policies"] == 6 and check["n_samples"] == 3
    seen = {(r["early"], r["keep"], r["late"]) for r in check["policies"]}
    assert len(seen) == 6
    for r in check["policies"]:
        assert 0 <= r["early"] <= 6 and 1 <= r["keep"] < 16 and r["late"] >= r["early"] + 2
        assert r["joint"] >= 0
        assert r["predicted"]["additive"] == pytest.approx(curves.predict(r["early"], r["keep"], r["late"]))
    for inter in P.INTERACTIONS:
        rho = check["spearman"][inter]
        assert rho == pytest.approx(P.spearman([r["predicted"][inter] for r in check["policies"]],
                                               [r["joint"] for r in check["policies"]]))
        assert -1 <= rho <= 1


# ---------------------------------------------------------------------------------------------- command line
def plan_args(*argv):
    return P.add_plan_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def eval_args(*argv):
    return add_eval_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_plan_command_writes_a_policy_that_eval_runs(data, tmp_path, capsys):
    out = tmp_path / "policy.json"
    rc = P.plan_command(plan_args("--model", MODEL, "--budget", "0.9", "--data", "synthvqa", "--data-root",
                                  str(data), "--split", "val", "--samples", "3", "--points", "3", "--out", str(out),
                                  "--check", "4", "--no-progress"))
    assert rc == 0
    text = capsys.readouterr().out
    assert "FLOPs ratio" in text and "Spearman" in text
    policy = json.loads(out.read_text())
    assert list(policy)[:4] == ["method", "params", "flops_ratio", "predicted_divergence"]
    assert policy["flops_ratio"] <= 0.9 and policy["curves"]["runs"] == 9
    assert policy["search"]["additivity_check"]["n_policies"] == 4
    again = P.Policy.from_json(out)
    assert (again.method, again.params) == (policy["method"], policy["params"])

    # another budget from the measured curves: no data needed
    out2 = tmp_path / "policy85.json"
    assert P.plan_command(plan_args("--model", MODEL, "--budget", "0.85", "--curves", str(out), "--out", str(out2),
                                    "--no-progress")) == 0
    assert json.loads(out2.read_text())["flops_ratio"] <= 0.85
    # budget 1: no pruning, no data
    out3 = tmp_path / "none.json"
    assert P.plan_command(plan_args("--model", MODEL, "--budget", "1", "--out", str(out3))) == 0
    assert json.loads(out3.read_text())["method"] == "none"
    with pytest.raises(SystemExit, match="data-root"):
        P.plan_command(plan_args("--model", MODEL, "--budget", "0.9"))

    # eval --policy: the policy's method and params, flags over them
    common = ("--model", MODEL, "--data", "synthvqa", "--data-root", str(data), "--out", str(tmp_path / "run"),
              "--device", "cpu")
    cfg = config_from_args(eval_args("--policy", str(out), *common))
    assert (cfg.method, cfg.params) == (policy["method"], policy["params"])
    cfg = config_from_args(eval_args("--policy", str(out), "--param", "seed=3", *common))
    assert cfg.params == {**policy["params"], "seed": 3}
    # a --method or --param contradicting the policy is an error (it would change or drop the planned policy)
    with pytest.raises(ValueError, match="--method fastv contradicts --policy"):
        config_from_args(eval_args("--policy", str(out), "--method", "fastv", "--param", "layer=2", *common))
    cfg = config_from_args(eval_args("--policy", str(out), "--method", policy["method"], *common))
    assert (cfg.method, cfg.params) == (policy["method"], policy["params"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"params": {}}))
    with pytest.raises(ValueError, match="method"):
        config_from_args(eval_args("--policy", str(bad), *common))

    cfg = config_from_args(eval_args("--policy", str(out), "--limit", "2", "--warmup", "0", "--split", "test",
                                     *common))
    summary = run_eval(cfg, progress=False)
    assert summary["config"]["method"] == policy["method"] and summary["n_samples"] == 2
    p = policy["policy"]
    for rec in read_records(tmp_path / "run" / "samples.jsonl"):
        e = -1 if p["early_layer"] is None else p["early_layer"]
        assert rec["tokens_per_layer"] == P.policy_tokens(8, 16, rec["n_text"], e, p["n_keep"], p["late_layer"])


def test_benchmark_script_parses():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "planner_vs_dtp.py"
    spec = importlib.util.spec_from_file_location("planner_vs_dtp", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.build_parser().parse_args(["--data-root", "d", "--out", "o", "--samples", "20", "--per-family", "5"])
    assert (args.data_root, args.out, args.samples, args.per_family, args.model) == ("d", "o", 20, 5, "testbed")
    assert tuple(args.budgets) == (0.7, 0.5)
