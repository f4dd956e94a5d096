"""The planned policy: what :func:`~mambaprune.planner.measure.plan` returns, and the JSON it is written as
(``mambaprune plan --out``, read by ``mambaprune eval --policy``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .curves import Curves

__all__ = ["Policy"]


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
        from ..eval.config import method_label

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
