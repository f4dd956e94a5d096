"""The planner on a model: the runs that measure the individual divergences (:func:`measure_curves`) or one
method's divergence, :func:`plan` (measure if needed, then search) and the additivity check.

**The check** (Appendix E.1, :func:`check_additivity`; Eq. 6 is what it tests): random policies of the selective
grid (uniformly over the whole grid, not only DOP's grid of sampled points, so interpolation is checked too),
their joint divergence measured directly, Spearman's rank correlation
(:func:`~mambaprune.planner.divergence.spearman`, average ranks for ties) with the predicted (interpolated, summed)
divergence, for both interactions.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..progress import progress_bar
from .curves import Curves, default_points
from .divergence import DEFAULT_EPS, DEFAULT_K, first_token_divergence, spearman
from .policy import Policy
from .search import (DEFAULT_ALPHA, INTERACTIONS, TIE_TOLERANCE, flops_ratios, min_visual_tokens_for, policy_method,
                     policy_scores, solve)

__all__ = ["check_additivity", "measure_curves", "measure_divergence", "plan"]


def _lm_config(model):
    return getattr(model, "lm", model).config


def _prepared(model, samples) -> list:
    """Prepared inputs: reader Samples are prepared (one per sample), anything else is taken as prepared."""
    samples = list(samples)
    if samples and hasattr(samples[0], "image") and hasattr(samples[0], "question"):
        from ..workflows import prepare_samples

        return prepare_samples(model, samples)
    return samples


def _logits(model, sample, pruner=None) -> torch.Tensor:
    from ..pruning.calibration import prefill

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
    from ..pruning import build

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
    from ..pruning import build

    prepared = _prepared(model, samples)
    if not prepared:
        raise ValueError("measuring a divergence needs at least one sample")
    refs = [_logits(model, s) for s in prepared]
    return _mean_divergence(model, prepared, refs, build(method, **(params or {})), k, eps)


def _resolve_refs(n_layer: int, n_visual: int, ref_early, ref_keep) -> tuple[int, int]:
    from ..pruning.base import num_to_keep, resolve_layer

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
    """Measure the three individual divergences at their sampled points (see :mod:`mambaprune.planner.curves`).

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
    from ..flops import lm_macs
    from ..pruning import build

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
