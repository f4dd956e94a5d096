"""Calibration on a few samples: DTP's layer-wise Std curve and layer choice (Eq. 7-9), VTW's KL search.

A *sample* is whatever the model's prefill takes: for a :class:`~mambaprune.models.MambaLM` a dict of
``forward`` keyword arguments (``input_ids`` or ``inputs_embeds``, ``is_visual``, optionally
``attention_mask``); for a multimodal model (anything with ``prefill(prepared, pruner=, signal_layers=)``) its
prepared inputs. A sample may be a batch; every row counts as one calibration sample.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from ..progress import progress_bar

from .dtp import layer_std, select_layers
from .sequence import SIGNAL_NAMES, TokenSequence


def prefill(model, sample, hook=None, signal_layers=None):
    """Run one sample through ``model`` (a MambaLM or a multimodal model with ``prefill``) and return its output."""
    with torch.no_grad():
        if hasattr(model, "prefill"):
            return model.prefill(sample, pruner=hook, signal_layers=signal_layers)
        if not isinstance(sample, dict):
            raise ValueError("a calibration sample for a MambaLM must be a dict of forward() keyword arguments, "
                             f"got {type(sample).__name__}")
        return model(**sample, hook=hook, signal_layers=signal_layers)


class _SignalRecorder:
    """A hook that keeps, after every layer, each sample's visual-token signal (a list of 1-D tensors)."""

    def __init__(self, signal: str):
        self.signal = signal
        self.by_layer: dict[int, list[torch.Tensor]] = {}

    def __call__(self, seq: TokenSequence):
        if seq.layer >= 0:
            values = seq.signals[self.signal]
            vis = seq.is_visual & seq.mask
            self.by_layer[seq.layer] = [values[b][vis[b]].float().cpu() for b in range(seq.batch_size)]
        return None


def importance_by_layer(model, sample, signal: str = "delta") -> dict[int, list[torch.Tensor]]:
    """layer -> per sample row, the importance (Eq. 6 for ``delta``) of its visual tokens, unpruned run."""
    if signal not in SIGNAL_NAMES:
        raise ValueError(f"signal must be one of {SIGNAL_NAMES}, got {signal!r}")
    rec = _SignalRecorder(signal)
    prefill(model, sample, hook=rec, signal_layers=True)
    return rec.by_layer


def std_curve(model, samples: Iterable, signal: str = "delta", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 per layer and sample, averaged over the samples.

    Returns ``(curve (n_layer,), per_sample (n_samples, n_layer))``, fp64. Samples without visual tokens are an
    error (the statistic is about visual tokens).
    """
    rows = []
    for sample in progress_bar(list(samples), desc="std curve", disable=not progress, leave=False):
        by_layer = importance_by_layer(model, sample, signal)
        n_layer = len(by_layer)
        n_rows = len(by_layer[0])
        for b in range(n_rows):
            if by_layer[0][b].numel() == 0:
                raise ValueError("a calibration sample has no visual token")
            rows.append([float(layer_std(by_layer[l][b])) for l in range(n_layer)])
    if not rows:
        raise ValueError("std_curve needs at least one calibration sample")
    per_sample = torch.tensor(rows, dtype=torch.float64)
    return per_sample.mean(0), per_sample


@dataclass
class DTPCalibration:
    """The result of :func:`calibrate_dtp`: the averaged Std curve and Eq. 8-9's layers."""

    std_curve: list[float]
    early_layer: int
    late_layer: int
    n_samples: int
    signal: str = "delta"

    def to_json(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, path) -> "DTPCalibration":
        return cls(**json.loads(Path(path).read_text()))


def default_cache_dir() -> Path:
    """``$MAMBAPRUNE_CACHE/calibration``, else ``~/.cache/mambaprune/calibration``."""
    root = os.environ.get("MAMBAPRUNE_CACHE") or Path.home() / ".cache" / "mambaprune"
    return Path(root) / "calibration"


def calibrate_dtp(model, samples: Sequence, signal: str = "delta", cache_key: str | None = None,
                  cache_dir=None, progress: bool = True) -> DTPCalibration:
    """DTP's calibration: the Std curve over ``samples`` (50 in the paper) and (early, late) = Eq. 8-9.

    With a ``cache_key`` (e.g. ``"cobra/vqav2/50"``) the result is stored as JSON under ``cache_dir``
    (:func:`default_cache_dir`) and read back instead of recomputed next time.
    """
    path = None
    if cache_key is not None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{cache_key}-{signal}")
        path = Path(cache_dir or default_cache_dir()) / f"dtp-{safe}.json"
        if path.exists():
            return DTPCalibration.from_json(path)
    curve, per_sample = std_curve(model, samples, signal, progress)
    early, late = select_layers(curve, curve.numel())
    result = DTPCalibration([float(v) for v in curve], early, late, per_sample.shape[0], signal)
    if path is not None:
        result.to_json(path)
    return result


def first_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row between the next-token distributions of two (batch, vocab) logit tensors."""
    logp = torch.log_softmax(logits_p.double(), -1)
    logq = torch.log_softmax(logits_q.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def search_vtw_layer(model, samples: Sequence, eta: float, start: int = 5,
                     progress: bool = True) -> tuple[int, dict[int, float]]:
    """VTW's withdrawal layer: the first K >= ``start`` whose mean first-token KL(P_withdrawn || P_full) over
    ``samples`` is at most ``eta``. Returns ``(K, {K: mean KL})`` for the layers tried; ``K = n_layer`` (never
    withdraw) if no layer qualifies."""
    from .vtw import VTW

    samples = list(samples)
    if not samples:
        raise ValueError("search_vtw_layer needs at least one calibration sample")
    outs = [prefill(model, s) for s in samples]
    full = [o.logits for o in outs]
    n_layer = len(outs[0].tokens_per_layer)
    tried: dict[int, float] = {}
    for k in progress_bar(range(max(0, start), n_layer), desc="vtw search", disable=not progress, leave=False):
        pruner = VTW(layer=k)
        kls = [first_token_kl(prefill(model, s, hook=pruner).logits, ref) for s, ref in zip(samples, full)]
        tried[k] = float(torch.cat(kls).mean())
        if tried[k] <= eta:
            return k, tried
    return n_layer, tried
