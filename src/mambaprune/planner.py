"""A budget planner: DOP's policy search (seed 002, Section 3.2 and Appendix C) over DTP's pruning policies.

Given a FLOPs budget, ``plan`` returns the DTP policy (or the VTW / no-pruning special case of it) whose
*predicted* divergence from the unpruned model is smallest among the policies within the budget.

**The policy space.** A DTP policy is ``(e, n, l)``: the visual tokens are ranked by layer ``e``'s Δ and only
``n`` of the ``N`` visual tokens go on after layer ``e`` (keep ratio ``n / N``); from layer ``l`` on no visual
token is processed (the convention of :mod:`mambaprune.pruning.dtp`). In DOP's terms (Eq. 3-4) this is a
depth-wise policy over the visual-token group with one module per layer (the Mamba mixer): ``l`` is DOP's depth
``d``, ``n`` its token count ``n_v``; DTP adds ``e``, the layer at which the token reduction happens (DOP reduces
before the decoder). The grid is every early layer ``0 <= e <= L - 2``, every count ``1 <= n < N`` and every late
layer ``e + 2 <= l <= L`` (``l = e + 1`` would leave the selective stage no layer), plus the policies without a
selective stage, ``n = N``, which do not depend on ``e``: VTW at ``l`` (``vtw(layer=l)``, the same as DTP with
``keep_ratio = 1``) and, for ``l = L``, no pruning. Internally those carry ``e = -1``.

**The individual divergences** (Eq. 7's three terms), each measured at a few sampled points (:func:`measure_curves`)
and linearly interpolated in between (Eq. 8, :func:`interpolate`):

* ``D_late(l) = D(-, N, l)``: no selective stage, every visual token withdrawn from layer ``l`` on. This is DOP's
  ``D_A(d_A) = D(d_A, L, N_v)`` exactly (the other parameters at their no-pruning values); ``D_late(L) = 0``.
* ``D_keep(n) = D(e_ref, n, L)``: ``n`` tokens kept after the reference early layer ``e_ref``, no late pruning.
  DOP's ``D_v(n_v) = D(L, L, n_v)`` with the reduction at ``e_ref`` instead of before the decoder; ``D_keep(N) = 0``.
* ``D_early(e)``: the early layer has no no-pruning value that leaves it meaningful (with ``n = N`` the cut removes
  nothing, so ``D(e, N, L) = 0`` for every ``e``). It is therefore measured at a reference count ``n_ref``:
  ``D_early(e) = D(e, n_ref, L) - D(e_ref, n_ref, L)``, the change that moving the cut from ``e_ref`` to ``e``
  makes. With ``D_keep`` this is the first-order *anchored* expansion of the selective stage around
  ``(e_ref, n_ref)``: ``D(e, n, L) ~ D(e, n_ref, L) + D(e_ref, n, L) - D(e_ref, n_ref, L)``, exact on both
  measured lines, and it reduces to DOP's decomposition when the anchor is the no-pruning point. The run
  ``(e_ref, n_ref, L)`` is a point of both curves and is measured once.

With ``I`` points per curve this costs about ``3 I + 1`` runs over the calibration samples (DOP's count, Section
3.2.2): linear in ``I``, independent of the size of the policy space. The defaults (``points = 6``, as DOP's
``K = 6``): late layers evenly spread over ``[1, L)``; kept counts ``7/8, 1/2, 1/4, 1/8, ...`` of ``N`` (``points - 1``
of them) and 1 (DOP's halving sequence of Appendix E.1, with a point near ``N`` as its 512 of 576); early layers
evenly spread over
``[0, L - 2]``; ``e_ref = int(0.25 L)`` (DTP's default early layer) and ``n_ref = N / 2``.

**The objective** (Eq. 7) of a policy, :func:`policy_scores`:

* ``n = N``: ``D_late(l)`` (no selective stage, so no selective term: exact on the ``D_late`` line);
* ``n < N``, ``interaction="additive"`` (default, DOP's sum): ``D_late(l) + max(0, D_early(e) + D_keep(n))``. The
  anchored selective term can come out negative (a cut later than ``e_ref`` keeping nearly every token), which no
  divergence can be; it is clipped at the divergence's lower bound 0.
* ``n < N``, ``interaction="separable"`` (an alternative, for comparison): ``D_late(l) + D_keep(n) * w(e)``,
  ``w(e) = D(e, n_ref, L) / D(e_ref, n_ref, L)``: exact on the same two lines, non-negative, and zero at ``n = N``
  for every ``e`` by construction. It needs the same runs; :func:`check_additivity` reports both.

**The constraints**: the FLOPs ratio (this project's count, LM multiply-adds of the tokens each layer processes,
:mod:`mambaprune.flops`, in place of DOP's Eq. 11 for a transformer; over the unpruned prefill with the same ``N``
visual + ``T`` text tokens, ``T`` the calibration prompts' mean length unless given) is at most the budget, and at
least ``n_min`` visual tokens go on after the early layer (Appendix C.4): ``n_e`` is the count that, reduced
alone (``(e_ref, n_e, L)``), comes closest to the budget (ties: the larger), and ``n_min = ceil(alpha * n_e)``
with ``alpha = 1.25`` (DOP's value for the non-LLaVA models; ``alpha = 0`` or an explicit ``min_visual_tokens``
overrides it). Among the feasible policies the smallest objective wins; ties (within 1e-12) go to the larger FLOPs
ratio (the milder pruning), then to the first in enumeration order. A budget of 1 (or more) is "no pruning".

**The divergence** (Eq. 9-10, :func:`first_token_divergence`): the first generated token's distribution (the
prefill's last-position logits, cut to the real vocabulary), restricted to the top ``k = 10`` tokens of the
unpruned distribution, each side ``+ eps`` (``1e-8``) and renormalised, then ``KL(unpruned || pruned)``; averaged
over the calibration samples.

**The check** (Appendix E.1, :func:`check_additivity`; Eq. 6 is what it tests): random policies of the selective
grid (uniformly over the whole grid, not only DOP's grid of sampled points, so interpolation is checked too),
their joint divergence measured directly, Spearman's rank correlation (:func:`spearman`, average ranks for ties)
with the predicted (interpolated, summed) divergence, for both interactions.

Command line glue: :func:`add_plan_arguments` and :func:`plan_command` (``mambaprune plan``); the policy JSON it
writes (``--out``) holds ``method``, ``params``, ``flops_ratio``, ``predicted_divergence`` (and the measured curves,
so other budgets can be planned without new runs: ``--curves``), and ``mambaprune eval --policy`` runs it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from .progress import progress_bar

__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_EPS", "DEFAULT_K", "INTERACTIONS", "Curves", "Policy", "add_plan_arguments",
    "check_additivity", "default_points", "enumerate_policies", "first_token_divergence", "flops_ratios",
    "interpolate", "measure_curves", "measure_divergence", "min_visual_tokens_for", "plan", "plan_command",
    "policy_method", "policy_scores", "policy_tokens", "predict_divergence", "solve", "spearman",
]

#: DOP's top-k and epsilon (Appendix C.2)
DEFAULT_K = 10
DEFAULT_EPS = 1e-8
#: Appendix C.4's alpha for the models that are not LLaVA (Qwen2.5-VL, InternVL3)
DEFAULT_ALPHA = 1.25
INTERACTIONS = ("additive", "separable")
#: ties in the objective: scores within this of the minimum count as equal
TIE_TOLERANCE = 1e-12


# ---------------------------------------------------------------------------------------------- the pieces
def first_token_divergence(logits_ref, logits_pruned, k: int = DEFAULT_K, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """DOP's output divergence (Appendix C.2, Eq. 9-10) between two next-token logit tensors.

    ``Pr = softmax(logits)`` on each side; ``X_top`` = the ``k`` most probable tokens of the unpruned (reference)
    distribution (Eq. 9; ties: the lower token id; ``k`` is capped at the vocabulary size); ``p = Pr[X_top]`` on each
    side, then ``p~ = (p + eps) / ||p + eps||_1``; the divergence is ``KL(p~_ref || p~_pruned)`` (Eq. 10).

    ``logits_*``: (vocab,) or (batch, vocab). Returns a 0-d tensor or one value per row (float64). With
    ``eps = 0`` a top-k token the pruned model gives probability 0 makes the divergence infinite; the epsilon
    keeps it finite.
    """
    ref = torch.as_tensor(logits_ref).detach().double()
    pru = torch.as_tensor(logits_pruned).detach().double()
    if ref.shape != pru.shape:
        raise ValueError(f"the logits differ in shape: {tuple(ref.shape)} and {tuple(pru.shape)}")
    if ref.dim() not in (1, 2) or ref.shape[-1] < 1:
        raise ValueError(f"expected (vocab,) or (batch, vocab) logits, got shape {tuple(ref.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    single = ref.dim() == 1
    if single:
        ref, pru = ref[None], pru[None]
    k = min(k, ref.shape[-1])
    pr_ref, pr_pru = torch.softmax(ref, -1), torch.softmax(pru, -1)
    top = torch.sort(pr_ref, dim=-1, descending=True, stable=True).indices[:, :k]          # Eq. 9
    p = pr_ref.gather(-1, top) + eps
    q = pr_pru.gather(-1, top) + eps
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    kl = (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)                                   # Eq. 10
    return kl[0] if single else kl


def interpolate(x, xs: Sequence[float], ys: Sequence[float]):
    """Eq. 8 (Appendix C.1): the value at ``x`` of the piecewise-linear curve through ``(xs[i], ys[i])``.

    ``D^(x) = D(x_i) + (x - x_i) / (x_{i+1} - x_i) * (D(x_{i+1}) - D(x_i))`` with ``x_i <= x <= x_{i+1}`` the
    nearest sampled points. ``xs`` must be strictly increasing; ``x`` (a number or a sequence / tensor) must lie in
    ``[xs[0], xs[-1]]``: Eq. 8 does not extrapolate. Returns a float for a number, a float64 tensor otherwise.
    """
    xs_t = torch.as_tensor(xs, dtype=torch.float64).reshape(-1)
    ys_t = torch.as_tensor(ys, dtype=torch.float64).reshape(-1)
    if xs_t.numel() == 0 or xs_t.numel() != ys_t.numel():
        raise ValueError(f"interpolate needs as many sampled values as points (>= 1), got {xs_t.numel()} points "
                         f"and {ys_t.numel()} values")
    if xs_t.numel() > 1 and not bool((xs_t[1:] > xs_t[:-1]).all()):
        raise ValueError("the sampled points must be strictly increasing")
    scalar = not isinstance(x, (torch.Tensor, Sequence))
    xt = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    if bool(((xt < xs_t[0]) | (xt > xs_t[-1])).any()):
        raise ValueError(f"x outside the sampled range [{float(xs_t[0]):g}, {float(xs_t[-1]):g}]: Eq. 8 interpolates "
                         "between sampled points only")
    if xs_t.numel() == 1:
        out = ys_t.expand(xt.shape).clone()
    else:
        i = (torch.searchsorted(xs_t, xt, right=True) - 1).clamp(0, xs_t.numel() - 2)
        x0, x1, y0, y1 = xs_t[i], xs_t[i + 1], ys_t[i], ys_t[i + 1]
        out = y0 + (xt - x0) / (x1 - x0) * (y1 - y0)
    return float(out[0]) if scalar else out


def _average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n; tied values share the mean of the ranks they span."""
    n = len(values)
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Appendix E.1): Pearson's correlation of the average ranks (ties share the mean
    rank, as scipy's ``spearmanr`` does); without ties it equals ``1 - 6 sum d^2 / (n (n^2 - 1))``. NaN when one
    side is constant (the correlation is undefined)."""
    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y):
        raise ValueError(f"spearman needs two sequences of one length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise ValueError("spearman needs at least two pairs")
    if any(math.isnan(v) for v in x + y):
        raise ValueError("spearman got NaN values")
    rx, ry = _average_ranks(x), _average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


# ---------------------------------------------------------------------------------------------- policies, FLOPs
def policy_tokens(n_layer: int, n_visual: int, n_text: int, early: int, keep: int, late: int) -> list[int]:
    """Tokens each layer processes under policy ``(early, keep, late)`` (``early = -1``: no selective stage):
    ``N + T`` up to layer ``early``, ``keep + T`` up to ``late - 1``, ``T`` from ``late`` on (DTP's
    ``expected_tokens``)."""
    return [n_visual + n_text if i <= early else (keep + n_text if i < late else n_text) for i in range(n_layer)]


def policy_method(early: int, keep: int, late: int, n_layer: int, n_visual: int) -> tuple[str, dict]:
    """The registered method and parameters that run policy ``(early, keep, late)``:

    ``("none", {})`` for ``keep = N, late = L``; ``("vtw", {"layer": late})`` for ``keep = N`` (DTP with
    ``keep_ratio = 1`` is the same policy); else ``("dtp", {"keep_ratio": keep / N, "early_layer": early,
    "late_layer": late})`` (``late = L``: no late pruning). The keep ratio is ``keep / N`` rounded to 6 decimals
    (readable labels), which gives back exactly ``keep`` tokens under DTP's rounding (``round(N * r)``), checked.
    """
    from .pruning.base import num_to_keep

    if keep == n_visual:
        return ("none", {}) if late >= n_layer else ("vtw", {"layer": int(late)})
    if not (0 <= early <= n_layer - 2 and early + 2 <= late <= n_layer and 1 <= keep < n_visual):
        raise ValueError(f"({early}, {keep}, {late}) is not a DTP policy of a {n_layer}-layer model with "
                         f"{n_visual} visual tokens")
    ratio = round(keep / n_visual, 6)
    if num_to_keep(n_visual, ratio) != keep:
        ratio = keep / n_visual
    return "dtp", {"keep_ratio": ratio, "early_layer": int(early), "late_layer": int(late)}


def flops_ratios(config, n_visual: int, n_text: int, early, keep, late) -> torch.Tensor:
    """The LM FLOPs ratio of policies (tensors or numbers, broadcast; ``early = -1`` for no selective stage):
    :func:`mambaprune.flops.lm_macs` of :func:`policy_tokens`, over the unpruned prefill, in closed form.

    The token total is ``(e + 1)(N + T) + (l - e - 1)(n + T) + (L - l) T`` (valid for ``l >= e + 1``); the head
    (one position) counts on both sides, as ``lm_macs`` counts it.
    """
    from .flops import head_macs, layer_macs_per_token

    L, N, T = config.n_layer, n_visual, n_text
    e = torch.as_tensor(early, dtype=torch.float64)
    n = torch.as_tensor(keep, dtype=torch.float64)
    l = torch.as_tensor(late, dtype=torch.float64)
    per_token, head = float(layer_macs_per_token(config)), float(head_macs(config))
    total = (e + 1) * (N + T) + (l - e - 1) * (n + T) + (L - l) * T
    return (per_token * total + head) / (per_token * L * (N + T) + head)


def min_visual_tokens_for(config, n_visual: int, n_text: int, budget: float, ref_early: int,
                          alpha: float = DEFAULT_ALPHA) -> int:
    """Appendix C.4's ``n_min = alpha * n_e``: ``n_e`` is the kept count whose FLOPs ratio, with the tokens reduced
    alone (after ``ref_early``, no late pruning), comes closest to ``budget`` (ties: the larger count);
    ``n_min = ceil(alpha * n_e)`` within ``[1, N]`` (``alpha = 0``: 1, i.e. no constraint beyond DTP's own)."""
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    counts = torch.arange(0, n_visual + 1)
    ratios = flops_ratios(config, n_visual, n_text, ref_early, counts, config.n_layer)
    gap = (ratios - budget).abs()
    best = gap.min()
    n_e = int(counts[gap <= best + TIE_TOLERANCE].max())
    return max(1, min(n_visual, math.ceil(alpha * n_e - 1e-9)))


def enumerate_policies(config, n_visual: int, n_text: int, budget: float, *, min_visual_tokens: int = 1,
                       early_layers: Sequence[int] | None = None, keep_counts: Sequence[int] | None = None,
                       late_layers: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Every policy of the grid that meets the constraints of Eq. 7: FLOPs ratio ``<= budget`` and, for a
    selective stage, at least ``min_visual_tokens`` visual tokens kept (Appendix C.4).

    Grid (defaults: all of it): early layers ``0..L-2``, kept counts ``1..N-1``, late layers ``1..L``; a selective
    policy needs ``late >= early + 2``. The policies without a selective stage (``keep = N``, ``early = -1``) come
    first, one per late layer; then the selective ones in ``(early, keep, late)`` order. Returns
    ``{"early", "keep", "late"}`` (int64) and ``"flops_ratio"`` (float64), one entry per policy.
    """
    L = config.n_layer
    if not (isinstance(budget, (int, float)) and 0 < budget):
        raise ValueError(f"budget must be a FLOPs ratio > 0, got {budget!r}")
    early_layers = list(range(0, L - 1)) if early_layers is None else sorted(set(int(e) for e in early_layers))
    keep_counts = list(range(1, n_visual)) if keep_counts is None else sorted(set(int(n) for n in keep_counts))
    late_layers = list(range(1, L + 1)) if late_layers is None else sorted(set(int(l) for l in late_layers))
    if any(not 0 <= e <= L - 2 for e in early_layers):
        raise ValueError(f"early layers must lie in [0, {L - 2}]")
    if any(not 1 <= n < n_visual for n in keep_counts):
        raise ValueError(f"kept counts must lie in [1, {n_visual - 1}] (N itself is the no-selective-stage case)")
    if any(not 1 <= l <= L for l in late_layers):
        raise ValueError(f"late layers must lie in [1, {L}]")
    limit = budget + TIE_TOLERANCE
    parts = {"early": [], "keep": [], "late": [], "flops_ratio": []}

    def add(e, n, l, ratio):
        ok = ratio <= limit
        for name, t in (("early", e), ("keep", n), ("late", l), ("flops_ratio", ratio)):
            parts[name].append(t[ok])

    lat = torch.tensor(late_layers, dtype=torch.long)
    add(torch.full_like(lat, -1), torch.full_like(lat, n_visual), lat, flops_ratios(config, n_visual, n_text, -1,
                                                                                     n_visual, lat))
    kept = torch.tensor([n for n in keep_counts if n >= min_visual_tokens], dtype=torch.long)
    for e in early_layers:
        ls = lat[lat >= e + 2]
        if kept.numel() == 0 or ls.numel() == 0:
            continue
        n_grid, l_grid = torch.meshgrid(kept, ls, indexing="ij")
        n_grid, l_grid = n_grid.reshape(-1), l_grid.reshape(-1)
        e_grid = torch.full_like(n_grid, e)
        add(e_grid, n_grid, l_grid, flops_ratios(config, n_visual, n_text, e_grid, n_grid, l_grid))
    return {name: torch.cat(ts) for name, ts in parts.items()}


def _table(values: Mapping[int, float], lo: int, hi: int) -> torch.Tensor:
    """A dense float64 lookup table over ``lo..hi`` (NaN where ``values`` has no entry)."""
    out = torch.full((hi - lo + 1,), float("nan"), dtype=torch.float64)
    for key, v in values.items():
        if lo <= int(key) <= hi:
            out[int(key) - lo] = float(v)
    return out


def policy_scores(policies: Mapping[str, torch.Tensor], d_early: Mapping[int, float], d_keep: Mapping[int, float],
                  d_late: Mapping[int, float], n_layer: int, n_visual: int,
                  interaction: str = "additive") -> torch.Tensor:
    """Eq. 7's objective for each policy, from per-value tables of the individual divergences (see the module
    docstring): ``d_late[l]`` alone for ``keep = N``; for ``keep < N`` plus ``max(0, d_early[e] + d_keep[n])``
    (``additive``) or ``d_keep[n] * d_early[e]`` (``separable``: ``d_early`` holds the weights ``w(e)``).
    ``d_late`` must cover every late layer used (``d_late[L]`` is 0 by definition if absent), ``d_early`` and
    ``d_keep`` every early layer and kept count used."""
    if interaction not in INTERACTIONS:
        raise ValueError(f"interaction must be one of {INTERACTIONS}, got {interaction!r}")
    e, n, l = policies["early"], policies["keep"], policies["late"]
    late_t = _table({n_layer: 0.0, **dict(d_late)}, 0, n_layer)
    early_t = _table(d_early, 0, max(n_layer - 2, 0))
    keep_t = _table(d_keep, 0, n_visual)
    score = late_t[l]
    sel = n < n_visual
    if bool(sel.any()):
        de, dk = early_t[e[sel]], keep_t[n[sel]]
        stage = (de + dk).clamp_min(0.0) if interaction == "additive" else dk * de
        score = score.clone()
        score[sel] = score[sel] + stage
    if bool(torch.isnan(score).any()):
        i = int(torch.nonzero(torch.isnan(score))[0])
        raise ValueError(f"no divergence for policy (early {int(e[i])}, keep {int(n[i])}, late {int(l[i])}): the "
                         "tables do not cover the grid")
    return score


def solve(config, n_visual: int, n_text: int, budget: float, d_early: Mapping[int, float],
          d_keep: Mapping[int, float], d_late: Mapping[int, float], *, interaction: str = "additive",
          min_visual_tokens: int = 1, early_layers=None, keep_counts=None, late_layers=None) -> dict:
    """Eq. 7: the feasible policy (:func:`enumerate_policies`) of smallest objective (:func:`policy_scores`).

    Ties (within 1e-12) go to the larger FLOPs ratio, then to the first policy in enumeration order. Returns
    ``{"early", "keep", "late", "flops_ratio", "predicted_divergence", "n_candidates"}`` (``early = -1``: no
    selective stage). A budget no policy meets is a ValueError naming the cheapest policy's ratio.
    """
    pol = enumerate_policies(config, n_visual, n_text, budget, min_visual_tokens=min_visual_tokens,
                             early_layers=early_layers, keep_counts=keep_counts, late_layers=late_layers)
    if pol["early"].numel() == 0:
        cheapest = float(flops_ratios(config, n_visual, n_text, -1, n_visual, 1))
        raise ValueError(f"no policy meets the budget {budget:g} (the cheapest, every visual token withdrawn "
                         f"after layer 0, has a FLOPs ratio of {cheapest:.4f})")
    score = policy_scores(pol, d_early, d_keep, d_late, config.n_layer, n_visual, interaction)
    best = score.min()
    tied = torch.nonzero(score <= best + TIE_TOLERANCE).reshape(-1)
    ratios = pol["flops_ratio"][tied]
    top = tied[ratios >= ratios.max() - TIE_TOLERANCE]
    i = int(top[0])
    return {"early": int(pol["early"][i]), "keep": int(pol["keep"][i]), "late": int(pol["late"][i]),
            "flops_ratio": float(pol["flops_ratio"][i]), "predicted_divergence": float(score[i]),
            "n_candidates": int(score.numel())}


# ---------------------------------------------------------------------------------------------- the curves
def default_points(n_layer: int, n_visual: int, points: int = 6) -> dict[str, list[int]]:
    """The default sampled points (module docstring): ``{"early", "keep", "late"}``, each at most ``points``
    values (the free no-pruning values ``N`` and ``L`` are not included: their divergence is 0 by definition)."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    L, N = n_layer, n_visual
    late = sorted({int(1 + (L - 1) * i / points + 0.5) for i in range(points)} - {L})
    fractions = [0.875] + [2.0 ** -i for i in range(1, points - 1)]            # 7/8, 1/2, 1/4, ... then 1 token
    keep = sorted({max(1, int(N * f + 0.5)) for f in fractions} | {1} - {N})
    early = sorted({int((L - 2) * i / (points - 1) + 0.5) for i in range(points)})
    return {"early": early, "keep": keep, "late": late}


@dataclass
class Curves:
    """The measured individual divergences (mean over ``n_samples`` calibration samples), by sampled point.

    ``early[e] = D(e, ref_keep, L)`` (raw, not yet anchored), ``keep[n] = D(ref_early, n, L)`` (with ``keep[N] = 0``),
    ``late[l] = D(-, N, l)`` (with ``late[L] = 0``); see the module docstring. ``runs``: the distinct pruned
    configurations measured (each over every sample), the reference run not counted.
    """

    n_layer: int
    n_visual: int
    n_text: int
    n_samples: int
    ref_early: int
    ref_keep: int
    early: dict[int, float]
    keep: dict[int, float]
    late: dict[int, float]
    k: int = DEFAULT_K
    eps: float = DEFAULT_EPS
    runs: int = 0

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        for name in ("early", "keep", "late"):
            out[name] = {str(key): float(v) for key, v in sorted(getattr(self, name).items())}
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "Curves":
        d = dict(d)
        for name in ("early", "keep", "late"):
            d[name] = {int(key): float(v) for key, v in d[name].items()}
        return cls(**d)

    def _curve(self, name: str) -> tuple[list[int], list[float]]:
        values = getattr(self, name)
        xs = sorted(values)
        return xs, [values[x] for x in xs]

    def anchor(self) -> float:
        """``D(ref_early, ref_keep, L)``, the point shared by the early and keep curves."""
        return self.early[self.ref_early]

    def tables(self, interaction: str = "additive") -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
        """``(d_early, d_keep, d_late)`` over every integer of their sampled ranges, interpolated (Eq. 8), as
        :func:`policy_scores` takes them: ``d_early[e] = D^(e, n_ref) - D(e_ref, n_ref)`` (additive) or
        ``D^(e, n_ref) / D(e_ref, n_ref)`` (separable)."""
        if interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {interaction!r}")
        out = []
        for name in ("early", "keep", "late"):
            xs, ys = self._curve(name)
            grid = list(range(xs[0], xs[-1] + 1))
            out.append(dict(zip(grid, interpolate(grid, xs, ys).tolist())))
        d_early, d_keep, d_late = out
        anchor = self.anchor()
        if interaction == "additive":
            d_early = {e: v - anchor for e, v in d_early.items()}
        else:
            if not anchor > 0:
                raise ValueError("the separable form divides by D(ref_early, ref_keep, L), which is 0 here; use the "
                                 "additive form or another reference")
            d_early = {e: v / anchor for e, v in d_early.items()}
        return d_early, d_keep, d_late

    def predict(self, early: int, keep: int, late: int, interaction: str = "additive") -> float:
        """The objective of one policy (``early = -1`` or ``keep = N``: no selective stage)."""
        d_early, d_keep, d_late = self.tables(interaction)
        pol = {"early": torch.tensor([max(early, 0) if keep < self.n_visual else -1]),
               "keep": torch.tensor([keep]), "late": torch.tensor([late])}
        return float(policy_scores(pol, d_early, d_keep, d_late, self.n_layer, self.n_visual, interaction)[0])


def predict_divergence(curves: Curves, early: int, keep: int, late: int, interaction: str = "additive") -> float:
    """Eq. 7's objective of policy ``(early, keep, late)`` under ``curves`` (e.g. to compare DTP's own policy)."""
    return curves.predict(early, keep, late, interaction)


def _lm_config(model):
    return getattr(model, "lm", model).config


def _prepared(model, samples) -> list:
    """Prepared inputs: reader Samples are prepared (one per sample), anything else is taken as prepared."""
    samples = list(samples)
    if samples and hasattr(samples[0], "image") and hasattr(samples[0], "question"):
        from .workflows import prepare_samples

        return prepare_samples(model, samples)
    return samples


def _logits(model, sample, pruner=None) -> torch.Tensor:
    from .pruning.calibration import prefill

    logits = prefill(model, sample, hook=pruner).logits
    return logits[..., : _lm_config(model).vocab_size]


def _n_text(prepared) -> int:
    lengths = []
    for p in prepared:
        if hasattr(p, "text_ids"):
            lengths += [len(ids) for ids in p.text_ids]
        else:
            mask = p.get("attention_mask")
            vis = p["is_visual"]
            real = mask if mask is not None else torch.ones_like(vis)
            lengths += (real & ~vis).sum(-1).tolist()
    return int(sum(lengths) / len(lengths) + 0.5)


def _n_visual(model, prepared) -> int:
    first = prepared[0]
    if hasattr(first, "num_visual"):
        return int(first.num_visual)
    return int(first["is_visual"][0].sum())


def _pruner(early: int, keep: int, late: int, n_layer: int, n_visual: int):
    from .pruning import build

    method, params = policy_method(early, keep, late, n_layer, n_visual)
    return build(method, **params)


def _mean_divergence(model, prepared, refs, pruner, k, eps) -> float:
    values = [first_token_divergence(ref, _logits(model, s, pruner), k, eps).reshape(-1)
              for s, ref in zip(prepared, refs)]
    return float(torch.cat(values).mean())


def measure_divergence(model, samples, method: str, params: dict | None = None, k: int = DEFAULT_K,
                       eps: float = DEFAULT_EPS) -> float:
    """The mean Eq. 9-10 divergence of one pruning method (``build(method, **params)``) from the unpruned model on
    ``samples`` (reader Samples or prepared inputs): e.g. to compare a planned policy with DTP's own."""
    from .pruning import build

    prepared = _prepared(model, samples)
    if not prepared:
        raise ValueError("measuring a divergence needs at least one sample")
    refs = [_logits(model, s) for s in prepared]
    return _mean_divergence(model, prepared, refs, build(method, **(params or {})), k, eps)


def _resolve_refs(n_layer: int, n_visual: int, ref_early, ref_keep) -> tuple[int, int]:
    from .pruning.base import num_to_keep, resolve_layer

    e_ref = resolve_layer(ref_early, n_layer, "ref_early")
    if e_ref > n_layer - 2:
        raise ValueError(f"ref_early = {e_ref} leaves no layer after it (the model has {n_layer})")
    if isinstance(ref_keep, bool) or not isinstance(ref_keep, (int, float)):
        raise ValueError(f"ref_keep must be a keep ratio (float) or a token count (int), got {ref_keep!r}")
    n_ref = ref_keep if isinstance(ref_keep, int) else num_to_keep(n_visual, float(ref_keep))
    if not 1 <= n_ref < n_visual:
        raise ValueError(f"ref_keep gives {n_ref} kept tokens; it must keep between 1 and {n_visual - 1}")
    return e_ref, int(n_ref)


def measure_curves(model, samples, *, points: int = 6, early_points: Sequence[int] | None = None,
                   keep_points: Sequence[int] | None = None, late_points: Sequence[int] | None = None,
                   ref_early: int | float = 0.25, ref_keep: int | float = 0.5, k: int = DEFAULT_K,
                   eps: float = DEFAULT_EPS, progress: bool = True) -> Curves:
    """Measure the three individual divergences at their sampled points (see the module docstring).

    ``samples``: reader Samples or prepared inputs. The sampled points default to :func:`default_points`; the
    end points needed to interpolate over the whole grid (early ``0`` and ``L - 2``, kept ``1``, late ``1``) and
    the references are added when missing. Each distinct pruned configuration is one run over every sample (one
    prefill each) and the unpruned reference one more.
    """
    prepared = _prepared(model, samples)
    if not prepared:
        raise ValueError("measuring divergences needs at least one calibration sample")
    L, N = _lm_config(model).n_layer, _n_visual(model, prepared)
    if L < 3 or N < 2:
        raise ValueError(f"a DTP policy needs >= 3 layers and >= 2 visual tokens, the model has {L} and {N}")
    e_ref, n_ref = _resolve_refs(L, N, ref_early, ref_keep)
    pts = default_points(L, N, points)
    early_pts = sorted(set(pts["early"] if early_points is None else map(int, early_points)) | {0, L - 2, e_ref})
    keep_pts = sorted((set(pts["keep"] if keep_points is None else map(int, keep_points)) | {1, n_ref}) - {N})
    late_pts = sorted((set(pts["late"] if late_points is None else map(int, late_points)) | {1}) - {L})
    for name, vals, lo, hi in (("early", early_pts, 0, L - 2), ("keep", keep_pts, 1, N - 1),
                               ("late", late_pts, 1, L - 1)):
        if any(not lo <= v <= hi for v in vals):
            raise ValueError(f"{name} points must lie in [{lo}, {hi}], got {vals}")

    wanted: dict[tuple[int, int, int], list[tuple[str, int]]] = {}
    for l in late_pts:
        wanted.setdefault((-1, N, l), []).append(("late", l))
    for n in keep_pts:
        wanted.setdefault((e_ref, n, L), []).append(("keep", n))
    for e in early_pts:
        wanted.setdefault((e, n_ref, L), []).append(("early", e))

    refs = [_logits(model, s)
            for s in progress_bar(prepared, desc="unpruned reference", disable=not progress, leave=False)]
    curves = Curves(n_layer=L, n_visual=N, n_text=_n_text(prepared), n_samples=sum(int(r.shape[0]) for r in refs),
                    ref_early=e_ref, ref_keep=n_ref, early={}, keep={N: 0.0}, late={L: 0.0}, k=k, eps=eps,
                    runs=len(wanted))
    for (e, n, l), uses in progress_bar(list(wanted.items()), desc="divergence curves", disable=not progress):
        value = _mean_divergence(model, prepared, refs, _pruner(e, n, l, L, N), k, eps)
        for name, x in uses:
            getattr(curves, name)[x] = value
    return curves


# ---------------------------------------------------------------------------------------------- the planner
@dataclass
class Policy:
    """A planned policy. ``to_dict`` gives the JSON ``mambaprune plan --out`` writes (``method``, ``params``,
    ``flops_ratio``, ``predicted_divergence`` first; then ``budget``, ``policy`` = ``{early_layer, n_keep,
    late_layer, n_layer, n_visual, n_text}`` (``early_layer`` None: no selective stage), ``search`` details and the
    measured ``curves``)."""

    method: str
    params: dict
    flops_ratio: float
    predicted_divergence: float
    budget: float
    policy: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    curves: Curves | None = None

    def to_dict(self) -> dict:
        return {"method": self.method, "params": dict(self.params), "flops_ratio": self.flops_ratio,
                "predicted_divergence": self.predicted_divergence, "budget": self.budget,
                "policy": dict(self.policy), "search": dict(self.search),
                "curves": None if self.curves is None else self.curves.to_dict()}

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: Mapping) -> "Policy":
        curves = d.get("curves")
        return cls(method=d["method"], params=dict(d.get("params") or {}), flops_ratio=float(d["flops_ratio"]),
                   predicted_divergence=float(d["predicted_divergence"]), budget=float(d.get("budget", 1.0)),
                   policy=dict(d.get("policy") or {}), search=dict(d.get("search") or {}),
                   curves=Curves.from_dict(curves) if curves else None)

    @classmethod
    def from_json(cls, path) -> "Policy":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def describe(self) -> str:
        from .eval.config import method_label

        p = self.policy
        if self.method == "none":
            what = "no pruning"
        elif self.method == "vtw":
            what = f"every visual token withdrawn from layer {p['late_layer']} on"
        else:
            late = ("no late pruning" if p["late_layer"] >= p.get("n_layer", p["late_layer"] + 1)
                    else f"none from layer {p['late_layer']} on")
            what = (f"{p['n_keep']}/{p['n_visual']} visual tokens go on after layer {p['early_layer']}, {late}")
        return (f"{method_label(self.method, self.params)}: {what}; FLOPs ratio {self.flops_ratio:.4f} "
                f"(budget {self.budget:g}), predicted divergence {self.predicted_divergence:.6g}")


def plan(model, samples, budget: float, *, curves: Curves | None = None, interaction: str = "additive",
         min_visual_tokens: int | None = None, alpha: float = DEFAULT_ALPHA, points: int = 6,
         ref_early: int | float = 0.25, ref_keep: int | float = 0.5, k: int = DEFAULT_K, eps: float = DEFAULT_EPS,
         n_text: int | None = None, progress: bool = True) -> Policy:
    """The policy of smallest predicted divergence within ``budget`` (a FLOPs ratio in (0, 1]), Eq. 7.

    ``samples``: the calibration samples (reader Samples or prepared inputs; DOP uses 100); ``curves``: divergences
    measured before (:func:`measure_curves`, or a policy's ``curves``), so that other budgets cost no run (then
    ``samples`` may be empty and the measuring options are not used). ``min_visual_tokens``: Appendix C.4's
    ``n_min`` (None: ``ceil(alpha * n_e)``, :func:`min_visual_tokens_for`). ``n_text``: the text length the FLOPs
    are counted at (None: the calibration prompts' mean, ``curves.n_text``; prompts of another length cost a
    slightly different ratio, so a comparison at matched FLOPs should give its own). A budget of 1 or more returns
    "no pruning" without any run. The returned ``flops_ratio`` is recounted with the method's own
    ``expected_tokens`` and :func:`mambaprune.flops.lm_macs`.
    """
    from .flops import lm_macs
    from .pruning import build

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"budget must be a FLOPs ratio in (0, 1], got {budget!r}")
    if interaction not in INTERACTIONS:
        raise ValueError(f"interaction must be one of {INTERACTIONS}, got {interaction!r}")
    config = _lm_config(model)
    if budget >= 1.0:
        policy = {"early_layer": None, "n_keep": curves.n_visual if curves else None, "late_layer": config.n_layer,
                  "n_layer": config.n_layer}
        return Policy("none", {}, 1.0, 0.0, float(budget), policy=policy,
                      search={"note": "a budget of 1 admits the unpruned model, whose divergence is 0"},
                      curves=curves)
    if curves is None:
        curves = measure_curves(model, samples, points=points, ref_early=ref_early, ref_keep=ref_keep, k=k, eps=eps,
                                progress=progress)
    if curves.n_layer != config.n_layer:
        raise ValueError(f"the curves were measured on a {curves.n_layer}-layer model, this one has {config.n_layer}")
    n_vis = getattr(getattr(model, "vision", None), "num_tokens", curves.n_visual)
    if curves.n_visual != n_vis:
        raise ValueError(f"the curves were measured with {curves.n_visual} visual tokens, this model has {n_vis}")
    L, N, T = curves.n_layer, curves.n_visual, curves.n_text if n_text is None else int(n_text)
    if T < 0:
        raise ValueError(f"n_text must be >= 0, got {n_text!r}")
    n_min = (min_visual_tokens_for(config, N, T, budget, curves.ref_early, alpha) if min_visual_tokens is None
             else int(min_visual_tokens))
    d_early, d_keep, d_late = curves.tables(interaction)
    best = solve(config, N, T, budget, d_early, d_keep, d_late, interaction=interaction, min_visual_tokens=n_min)
    e, n, l = best["early"], best["keep"], best["late"]
    method, params = policy_method(e, n, l, L, N)
    ratio = lm_macs(config, build(method, **params).expected_tokens(L, N, T)) / lm_macs(config, [N + T] * L)
    if ratio > budget + TIE_TOLERANCE:                      # the closed form and the count must agree
        raise RuntimeError(f"planned policy {method}({params}) costs {ratio:.6f} > budget {budget}")
    return Policy(method, params, float(ratio), best["predicted_divergence"], float(budget),
                  policy={"early_layer": e if n < N else None, "n_keep": n, "late_layer": l, "n_layer": L,
                          "n_visual": N, "n_text": T},
                  search={"interaction": interaction, "min_visual_tokens": n_min,
                          "alpha": alpha if min_visual_tokens is None else None,
                          "n_candidates": best["n_candidates"], "runs": curves.runs, "n_samples": curves.n_samples,
                          "k": curves.k, "eps": curves.eps},
                  curves=curves)


def _sample_policies(n_layer: int, n_visual: int, count: int, generator: torch.Generator) -> list[tuple[int, int, int]]:
    """``count`` distinct policies drawn uniformly from the selective grid (rejection sampling)."""
    L, N = n_layer, n_visual
    space = sum((N - 1) * (L - e - 1) for e in range(L - 1))
    if count > space:
        raise ValueError(f"asked for {count} policies, the grid holds {space}")
    out: list[tuple[int, int, int]] = []
    seen = set()
    while len(out) < count:
        e = int(torch.randint(0, L - 1, (1,), generator=generator))
        n = int(torch.randint(1, N, (1,), generator=generator))
        l = int(torch.randint(1, L + 1, (1,), generator=generator))
        if l >= e + 2 and (e, n, l) not in seen:
            seen.add((e, n, l))
            out.append((e, n, l))
    return out


def check_additivity(model, samples, n_policies: int = 50, *, curves: Curves | None = None, seed: int = 0,
                     progress: bool = True, **measure_options) -> dict:
    """Appendix E.1 on the model at hand: draw ``n_policies`` distinct policies uniformly from the selective grid
    (``n < N``, ``l >= e + 2``), measure each one's joint divergence ``D(e, n, l)`` on ``samples``, and compare its
    ranking with that of the predicted one (Eq. 7's objective: interpolated curves, summed) by Spearman's rho.

    This checks the planner's objective as it is used (the decomposition and the interpolation together), for
    both interactions. ``curves``: measured before (else measured here with ``measure_options``, on the same
    samples). Returns ``{"n_policies", "n_samples", "spearman": {"additive": rho, "separable": rho},
    "policies": [{"early", "keep", "late", "flops_ratio", "joint", "predicted": {...}}]}``.
    """
    prepared = _prepared(model, samples)
    if not prepared:
        raise ValueError("the additivity check needs at least one calibration sample")
    if isinstance(n_policies, bool) or not isinstance(n_policies, int) or n_policies < 2:
        raise ValueError(f"n_policies must be an integer >= 2, got {n_policies!r}")
    if curves is None:
        curves = measure_curves(model, prepared, progress=progress, **measure_options)
    L, N = curves.n_layer, curves.n_visual
    config = _lm_config(model)
    k, eps = curves.k, curves.eps
    tables = {}
    for inter in INTERACTIONS:
        try:
            tables[inter] = curves.tables(inter)
        except ValueError:
            tables[inter] = None
    policies = _sample_policies(L, N, n_policies, torch.Generator().manual_seed(seed))
    refs = [_logits(model, s) for s in prepared]
    rows = []
    for e, n, l in progress_bar(policies, desc="joint divergences", disable=not progress):
        joint = _mean_divergence(model, prepared, refs, _pruner(e, n, l, L, N), k, eps)
        pol = {"early": torch.tensor([e]), "keep": torch.tensor([n]), "late": torch.tensor([l])}
        predicted = {inter: (None if t is None else float(policy_scores(pol, *t, L, N, inter)[0]))
                     for inter, t in tables.items()}
        rows.append({"early": e, "keep": n, "late": l,
                     "flops_ratio": float(flops_ratios(config, N, curves.n_text, e, n, l)),
                     "joint": joint, "predicted": predicted})
    joint = [r["joint"] for r in rows]
    rho = {inter: (float("nan") if tables[inter] is None else spearman([r["predicted"][inter] for r in rows], joint))
           for inter in INTERACTIONS}
    return {"n_policies": len(rows), "n_samples": curves.n_samples, "seed": seed, "spearman": rho, "policies": rows}


# ---------------------------------------------------------------------------------------------- command line
def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``mambaprune plan``."""
    from .eval.cli import key_value

    a = parser.add_argument
    a("--model", default="testbed", help="registered model name or module.path:function (default: testbed)")
    a("--model-arg", action="append", type=key_value, default=None, metavar="KEY=VALUE",
      help="a keyword argument of the model's loader (repeatable)")
    a("--device", default=None, help="e.g. cuda, cpu (default: where the loader puts it)")
    a("--dtype", default=None, help="e.g. bfloat16, float16, float32")
    a("--budget", type=float, required=True, help="FLOPs ratio to stay within, in (0, 1] (1: no pruning)")
    a("--data", default="synthvqa", help="calibration dataset name (default synthvqa)")
    a("--data-root", default=None, help="the dataset's folder (not needed with --curves or --budget 1)")
    a("--split", default=None, help="calibration split (default: the dataset's; pick one you do not evaluate on)")
    a("--samples", type=int, default=100, help="calibration samples, evenly spread over the split (default 100)")
    a("--out", default=None, metavar="FILE", help="write the policy JSON here (for `mambaprune eval --policy`)")
    a("--curves", default=None, metavar="FILE",
      help="reuse the divergences measured before (a policy JSON written by --out): no new runs")
    a("--check", type=int, default=0, metavar="N",
      help="also check the additive approximation on N random policies (Spearman's rho, DOP Appendix E.1)")
    a("--points", type=int, default=6, help="sampled points per divergence curve (default 6, as DOP)")
    a("--ref-early", type=parse_number, default=0.25,
      help="reference early layer of D_keep (int layer, or float fraction of the depth; default 0.25)")
    a("--ref-keep", type=parse_number, default=0.5,
      help="reference keep ratio (float) or token count (int) of D_early (default 0.5)")
    a("--interaction", choices=INTERACTIONS, default="additive",
      help="how early layer and keep ratio combine (default additive, DOP's Eq. 7)")
    a("--alpha", type=float, default=DEFAULT_ALPHA,
      help=f"Appendix C.4: at least alpha x n_e visual tokens after the early layer (default {DEFAULT_ALPHA})")
    a("--min-visual-tokens", type=int, default=None, help="a fixed n_min instead of the alpha rule")
    a("--k", type=int, default=DEFAULT_K, help=f"top-k of the divergence (default {DEFAULT_K})")
    a("--eps", type=float, default=DEFAULT_EPS, help=f"epsilon of the divergence (default {DEFAULT_EPS:g})")
    a("--seed", type=int, default=0, help="seed of the --check policies and of the model's construction")
    a("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_number(text: str):
    """``"3"`` -> 3 (int), ``"0.25"`` -> 0.25 (float)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _calibration_samples(args) -> list:
    from .data.readers import load_dataset
    from .workflows import spread

    if not args.data_root:
        raise ValueError("--data-root is needed to measure the divergences")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    samples = load_dataset(args.data, args.data_root, args.split)
    if not samples:
        raise ValueError(f"no samples in {args.data} ({args.split or 'default split'}) under {args.data_root}")
    return spread(samples, args.samples)


def plan_command(args: argparse.Namespace) -> int:
    """``mambaprune plan``: measure (or reuse) the divergences, plan, print, write ``--out``, optionally check."""
    from .eval.runner import load_named_model

    try:
        model = load_named_model(args.model, dict(args.model_arg or []), args.device, args.dtype, args.seed)
        curves = None
        if args.curves:
            raw = json.loads(Path(args.curves).read_text(encoding="utf-8"))
            raw = raw.get("curves", raw) if isinstance(raw, dict) else None
            if not raw:
                raise ValueError(f"{args.curves} holds no measured curves")
            curves = Curves.from_dict(raw)
        need_samples = (curves is None and args.budget < 1.0) or args.check
        samples = _calibration_samples(args) if need_samples else []
        prepared = _prepared(model, samples)
        progress = not args.no_progress
        policy = plan(model, prepared, args.budget, curves=curves, interaction=args.interaction,
                      min_visual_tokens=args.min_visual_tokens, alpha=args.alpha, points=args.points,
                      ref_early=args.ref_early, ref_keep=args.ref_keep, k=args.k, eps=args.eps, progress=progress)
        print(f"planned policy for a FLOPs budget of {args.budget:g}:")
        print(f"  {policy.describe()}")
        if policy.curves is not None:
            c = policy.curves
            print(f"  from {c.runs} runs over {c.n_samples} samples; {policy.search.get('n_candidates')} policies "
                  f"within budget (at least {policy.search.get('min_visual_tokens')} visual tokens kept)")
            heads = {"early": f"D(e, n={c.ref_keep}, L={c.n_layer}) by early layer e",
                     "keep": f"D(e={c.ref_early}, n, L={c.n_layer}) by kept count n",
                     "late": f"D(no cut, N={c.n_visual}, l) by late layer l"}
            for name, head in heads.items():
                pts = ", ".join(f"{x}: {v:.4g}" for x, v in sorted(getattr(c, name).items()))
                print(f"  {head}: {pts}")
        if args.check:
            curves = policy.curves or measure_curves(model, prepared, points=args.points, ref_early=args.ref_early,
                                                     ref_keep=args.ref_keep, k=args.k, eps=args.eps,
                                                     progress=progress)
            check = check_additivity(model, prepared, args.check, curves=curves, seed=args.seed, progress=progress)
            policy.search["additivity_check"] = check
            rho = ", ".join(f"{name} {v:.3f}" for name, v in check["spearman"].items())
            print(f"additivity check (DOP Appendix E.1), {check['n_policies']} policies: Spearman's rho {rho}")
        if args.out:
            path = policy.to_json(args.out)
            print(f"written {path}; run it with: mambaprune eval --policy {path} ...")
    except ValueError as e:
        raise SystemExit(f"mambaprune plan: {e}") from None
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mambaprune.planner",
                                     description="Plan a pruning policy for a FLOPs budget (DOP's search over DTP)")
    add_plan_arguments(parser)
    return plan_command(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
