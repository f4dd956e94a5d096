"""The planner's policy search: the policy grid (:mod:`mambaprune.planner`), the tokens and FLOPs of a policy,
the method that runs it, Appendix C.4's ``n_min``, Eq. 7's objective and the search for its minimum within a
budget, all from divergence tables (no model is run here).

**The objective** (Eq. 7) of a policy, :func:`policy_scores`:

* ``n = N``: ``D_late(l)`` (no selective stage, so no selective term: exact on the ``D_late`` line);
* ``n < N``, ``interaction="additive"`` (default, DOP's sum): ``D_late(l) + max(0, D_early(e) + D_keep(n))``. The
  anchored selective term can come out negative (a cut later than ``e_ref`` keeping nearly every token), which no
  divergence can be; it is clipped at the divergence's lower bound 0.
* ``n < N``, ``interaction="separable"`` (an alternative, for comparison): ``D_late(l) + D_keep(n) * w(e)``,
  ``w(e) = D(e, n_ref, L) / D(e_ref, n_ref, L)``: exact on the same two lines, non-negative, and zero at ``n = N``
  for every ``e`` by construction. It needs the same runs; :func:`~mambaprune.planner.measure.check_additivity`
  reports both.

**The constraints**: the FLOPs ratio (this project's count, LM multiply-adds of the tokens each layer processes,
:mod:`mambaprune.flops`, in place of DOP's Eq. 11 for a transformer; over the unpruned prefill with the same ``N``
visual + ``T`` text tokens, ``T`` the calibration prompts' mean length unless given) is at most the budget, and at
least ``n_min`` visual tokens go on after the early layer (Appendix C.4): ``n_e`` is the count that, reduced
alone (``(e_ref, n_e, L)``), comes closest to the budget (ties: the larger), and ``n_min = ceil(alpha * n_e)``
with ``alpha = 1.25`` (DOP's value for the non-LLaVA models; ``alpha = 0`` or an explicit ``min_visual_tokens``
overrides it). Among the feasible policies the smallest objective wins; ties (within 1e-12) go to the larger FLOPs
ratio (the milder pruning), then to the first in enumeration order. A budget of 1 (or more) is "no pruning".
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

__all__ = [
    "DEFAULT_ALPHA", "INTERACTIONS", "TIE_TOLERANCE", "enumerate_policies", "flops_ratios", "min_visual_tokens_for",
    "policy_method", "policy_scores", "policy_tokens", "solve",
]


#: Appendix C.4's alpha for the models that are not LLaVA (Qwen2.5-VL, InternVL3)
DEFAULT_ALPHA = 1.25
INTERACTIONS = ("additive", "separable")
#: ties in the objective: scores within this of the minimum count as equal
TIE_TOLERANCE = 1e-12


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
    from ..pruning.base import num_to_keep

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
    from ..flops import head_macs, layer_macs_per_token

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
