"""What every pruning method is: a decision, taken between two layers, about which tokens go on.

**The one convention, for every method.** A method that acts *at layer k* takes its decision between layer
``k - 1`` and layer ``k``: in the model's hook call after layer ``k - 1`` (``seq.layer == k - 1``), or before the
first layer when ``k == 0`` (``seq.layer == -1``, "pre-LLM"). Layers ``0 .. k-1`` process every token; layer ``k``
is the first layer that processes the reduced sequence. The importance signals a method reads at layer ``k``
(Δ and the others, see :class:`~mambaprune.pruning.sequence.TokenSequence`) are therefore those of layer
``k - 1``, the last layer that saw the whole sequence, computed in that layer's mixer from its full input.

This is FastV's convention (the attention of layer K-1 decides what layer K sees) and it reproduces the DTP
paper's FLOPs figures: on Cobra (64 layers, ~729 visual + ~21 text tokens), FastV k=2 r=0.5 -> 53%, VTW k=45 ->
71%, DTP (early 15, late 45) r=0.9 -> 67% and r=0.5 -> 48%, and its Table 6 (1.26 -> 0.97 with late pruning)
all come out of this convention and not of "layer k is the last full layer".

A pruner is callable on a :class:`TokenSequence` and returns a smaller one (or None for "no change"); the
model calls ``start(config)`` once per forward pass. The time a pruner spends deciding and re-laying out is
summed in ``method_seconds`` (with a CUDA synchronisation on a GPU).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from .sequence import TokenSequence


def resolve_layer(value, n_layer: int, name: str = "layer", allow_end: bool = False) -> int:
    """A layer index from an int (0-based) or a float fraction of the depth (``int(value * n_layer)``).

    ``allow_end`` admits ``n_layer`` itself (meaning "never": e.g. late pruning switched off).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an int layer index or a float fraction of the depth, got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} as a fraction of the depth must lie in [0, 1], got {value}")
        value = int(value * n_layer)
    hi = n_layer if allow_end else n_layer - 1
    if not 0 <= value <= hi:
        raise ValueError(f"{name} = {value} is outside [0, {hi}] for a {n_layer}-layer model")
    return int(value)


def check_ratio(value, name: str = "keep_ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def num_to_keep(n: int, keep_ratio: float) -> int:
    """Tokens kept out of ``n`` at ``keep_ratio``: ``round(n * keep_ratio)`` (half away from zero)."""
    return int(n * keep_ratio + 0.5)


class Pruner:
    """Base class. Subclasses set ``name`` and implement :meth:`act` and :meth:`expected_tokens`.

    ``act_layers`` (set in :meth:`setup`) are the layers k at which the method acts; ``signal_layers`` the
    layers whose signals it reads (``k - 1`` for each k, see the module docstring).
    """

    name = "base"
    #: the importance signal the method reads, if any (one of SIGNAL_NAMES)
    signal: str | None = None

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.n_layer: int | None = None
        self.act_layers: set[int] = set()
        self.method_seconds = 0.0
        self.generator = torch.Generator().manual_seed(self.seed)

    # -- called by the model ------------------------------------------------------------------------------
    def start(self, config) -> None:
        """Once per forward pass: resolve layers for this model, reset the timer and the seeded generator."""
        if config.n_layer != self.n_layer:
            self.n_layer = config.n_layer
            self.act_layers = set(self.setup(config.n_layer))
        self.method_seconds = 0.0
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def signal_layers(self) -> set[int]:
        """Layers whose importance signals the model must compute for this pruner."""
        if self.signal is None:
            return set()
        return {k - 1 for k in self.scored_layers() if k >= 1}

    def scored_layers(self) -> set[int]:
        """The act layers at which the decision reads ``signal`` (all of them unless a method says otherwise)."""
        return self.act_layers

    def __call__(self, seq: TokenSequence) -> TokenSequence | None:
        k = seq.layer + 1
        if k not in self.act_layers:
            return None
        cuda = seq.hidden.is_cuda
        if cuda:
            torch.cuda.synchronize(seq.hidden.device)
        t0 = time.perf_counter()
        out = self.act(seq, k)
        if cuda:
            torch.cuda.synchronize(seq.hidden.device)
        self.method_seconds += time.perf_counter() - t0
        return out

    # -- for subclasses -----------------------------------------------------------------------------------
    def setup(self, n_layer: int) -> Sequence[int]:
        """Resolve the method's layers for an ``n_layer``-layer model; return the layers it acts at."""
        raise NotImplementedError

    def act(self, seq: TokenSequence, layer: int) -> TokenSequence | None:
        """The decision at ``layer`` (the first layer that will see the result)."""
        raise NotImplementedError

    def expected_tokens(self, n_layer: int, n_visual: int, n_text: int) -> list[int]:
        """Tokens each layer processes for one sample with ``n_visual`` + ``n_text`` tokens (FLOPs planning)."""
        raise NotImplementedError

    def importance(self, seq: TokenSequence) -> torch.Tensor:
        """(batch, L) the method's importance signal at this point; a clear error if it was not computed."""
        if self.signal not in seq.signals:
            raise RuntimeError(
                f"{self.name}: signal {self.signal!r} of layer {seq.layer} was not computed; the model must run "
                f"with this pruner as its hook (it asks for signal_layers={sorted(self.signal_layers)})")
        return seq.signals[self.signal]

    def params(self) -> dict:
        """The method's parameters, as given to :func:`mambaprune.pruning.build`."""
        return {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"


class NoPruning(Pruner):
    """The unpruned model, as a pruner (so the harness times every run the same way)."""

    name = "none"

    def setup(self, n_layer):
        return ()

    def act(self, seq, layer):
        return None

    def expected_tokens(self, n_layer, n_visual, n_text):
        return [n_visual + n_text] * n_layer


class KeepVisualAtLayer(Pruner):
    """A method that, at one layer ``layer`` (K), lets ``round(keep_ratio * n_visual)`` visual tokens go on.

    Subclasses implement :meth:`act` (which tokens); this class holds the parameters, resolves K (a method
    with a ``signal`` reads it from layer K - 1, so it needs K >= 1) and predicts the per-layer token counts.
    """

    def __init__(self, keep_ratio: float, layer: int | float, seed: int = 0):
        super().__init__(seed)
        self.keep_ratio = check_ratio(keep_ratio)
        self.layer_spec = layer

    def params(self):
        return dict(keep_ratio=self.keep_ratio, layer=self.layer_spec)

    def setup(self, n_layer):
        k = resolve_layer(self.layer_spec, n_layer, "layer")
        if self.signal is not None and k < 1:
            raise ValueError(f"{self.name} needs layer >= 1: it reads the {self.signal} of layer K - 1")
        return {k}

    def expected_tokens(self, n_layer, n_visual, n_text):
        k = resolve_layer(self.layer_spec, n_layer, "layer")
        kept = num_to_keep(n_visual, self.keep_ratio)
        return [n_visual + n_text if l < k else kept + n_text for l in range(n_layer)]


def topk_in_order(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """(batch, L) bool: for each sample the ``k`` highest-scoring candidate tokens (ties: the earlier token).

    ``candidates`` (batch, L) bool; ``k`` an int or a (batch,) tensor (clamped to the number of candidates).
    """
    b, L = scores.shape
    s = scores.float().masked_fill(~candidates, float("-inf"))
    if isinstance(k, int):
        k = torch.full((b,), k, dtype=torch.long, device=scores.device)
    k = torch.minimum(k.to(scores.device), candidates.sum(1))
    kmax = int(k.max()) if b else 0
    chosen = torch.zeros(b, L, dtype=torch.bool, device=scores.device)
    if kmax == 0:
        return chosen
    # stable descending sort: equal scores keep their order, so the earlier token wins a tie
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :kmax]
    take = torch.arange(kmax, device=scores.device)[None, :] < k[:, None]
    chosen.scatter_(1, order, take)
    return chosen & candidates


def keep_visual(seq: TokenSequence, chosen_visual: torch.Tensor) -> TokenSequence:
    """Keep every text token and the visual tokens marked in ``chosen_visual`` (batch, L), in order."""
    return seq.select(seq.mask & (~seq.is_visual | chosen_visual))


def visual_keep_counts(seq: TokenSequence, keep_ratio: float) -> torch.Tensor:
    """(batch,) visual tokens to keep per sample: :func:`num_to_keep` of each sample's visual count."""
    n = seq.num_visual()
    return torch.floor(n.double() * keep_ratio + 0.5).long()


def random_visual_subset(seq: TokenSequence, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(batch, L) bool: ``counts[b]`` visual tokens of sample b drawn uniformly without replacement."""
    noise = torch.rand(seq.mask.shape, generator=generator).to(seq.mask.device)
    return topk_in_order(noise, seq.is_visual & seq.mask, counts)
