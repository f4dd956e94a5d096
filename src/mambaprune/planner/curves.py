"""The planner's curves: the individual divergences measured at sampled points (:class:`Curves`, the default
points), their interpolation (Eq. 8) and the objective of a policy predicted from them.

**The individual divergences** (Eq. 7's three terms), each measured at a few sampled points
(:func:`~mambaprune.planner.measure.measure_curves`) and linearly interpolated in between (Eq. 8,
:func:`interpolate`):

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .divergence import DEFAULT_EPS, DEFAULT_K
from .search import INTERACTIONS, policy_scores

__all__ = ["Curves", "default_points", "interpolate", "predict_divergence"]


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
