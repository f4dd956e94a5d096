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

One job per module; each module's docstring holds the part of the method it implements:

* :mod:`~mambaprune.planner.divergence`: the divergence (Eq. 9-10) and Spearman's rho (Appendix E.1);
* :mod:`~mambaprune.planner.search`: the policy grid, its FLOPs, the constraints (Appendix C.4), Eq. 7's objective
  and the search for its minimum;
* :mod:`~mambaprune.planner.curves`: the individual divergences (Eq. 7's three terms) at their sampled points and
  their interpolation (Eq. 8);
* :mod:`~mambaprune.planner.policy`: the planned policy and its JSON;
* :mod:`~mambaprune.planner.measure`: the runs on a model: the curves, one method's divergence, :func:`plan` and
  the additivity check (Appendix E.1);
* :mod:`~mambaprune.planner.cli`: ``mambaprune plan`` and ``python -m mambaprune.planner``.
"""
from .cli import add_plan_arguments, plan_command
from .curves import Curves, default_points, interpolate, predict_divergence
from .divergence import DEFAULT_EPS, DEFAULT_K, first_token_divergence, spearman
from .measure import check_additivity, measure_curves, measure_divergence, plan
from .policy import Policy
from .search import (DEFAULT_ALPHA, INTERACTIONS, enumerate_policies, flops_ratios, min_visual_tokens_for,
                     policy_method, policy_scores, policy_tokens, solve)

__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_EPS", "DEFAULT_K", "INTERACTIONS", "Curves", "Policy", "add_plan_arguments",
    "check_additivity", "default_points", "enumerate_policies", "first_token_divergence", "flops_ratios",
    "interpolate", "measure_curves", "measure_divergence", "min_visual_tokens_for", "plan", "plan_command",
    "policy_method", "policy_scores", "policy_tokens", "predict_divergence", "solve", "spearman",
]
