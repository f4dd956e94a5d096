"""Hooks that watch a forward pass without changing it: what each layer received, which visual tokens survived.

They wrap an optional inner hook (any pruner of :mod:`mambaprune.pruning`, or a plain function): the model
calls the wrapper, the wrapper calls the inner hook and returns its result unchanged, then records the
sequence the next layer will see. ``start(config)`` and ``signal_layers`` are passed through, so a pruner
behaves exactly as if the model called it directly.
"""
from __future__ import annotations

from ..pruning.sequence import TokenSequence


class ObservingHook:
    """Base class: run ``inner_hook`` (if any), then :meth:`observe` the sequence the next layer will see."""

    def __init__(self, inner_hook=None):
        if inner_hook is not None and not callable(inner_hook):
            raise ValueError(f"inner_hook must be callable (a pruner or a function), got {type(inner_hook).__name__}")
        self.inner_hook = inner_hook

    def start(self, config) -> None:
        """Called by the model once per forward pass; forwarded to the inner hook when it has ``start``."""
        if hasattr(self.inner_hook, "start"):
            self.inner_hook.start(config)

    @property
    def signal_layers(self):
        """The inner hook's ``signal_layers`` (the layers whose importance signals it needs), else none."""
        return getattr(self.inner_hook, "signal_layers", None) or set()

    def __call__(self, seq: TokenSequence) -> TokenSequence | None:
        new = self.inner_hook(seq) if self.inner_hook is not None else None
        self.observe(seq if new is None else new)
        return new

    def observe(self, seq: TokenSequence) -> None:
        raise NotImplementedError


class KeptTokenRecorder(ObservingHook):
    """Records, between every two layers, the original positions of the visual tokens still present.

    ``positions_by_layer[l]`` is a list (one entry per sample) of the original positions, in sequence order,
    of the real visual tokens in the sequence *after* layer ``l`` ran and the inner hook acted on its output,
    i.e. the visual tokens that **layer l + 1 processes**. Key ``-1`` is the input of layer 0 (after any
    pre-LLM method); key ``n_layer - 1`` is what reaches the final norm. With the pruners' convention (a
    method acting at layer k decides after layer k - 1), the tokens a method keeps at layer k are in
    ``positions_by_layer[k - 1]``, also given by :meth:`visual_positions_at`.
    """

    def __init__(self, inner_hook=None):
        super().__init__(inner_hook)
        self.positions_by_layer: dict[int, list[list[int]]] = {}

    def start(self, config) -> None:
        super().start(config)
        self.positions_by_layer = {}

    def observe(self, seq: TokenSequence) -> None:
        visual = seq.is_visual & seq.mask
        self.positions_by_layer[seq.layer] = [seq.positions[i, visual[i]].tolist()
                                              for i in range(seq.batch_size)]

    def visual_positions_at(self, layer: int) -> list[list[int]]:
        """Per sample, the original positions of the visual tokens that ``layer`` processed."""
        if layer - 1 not in self.positions_by_layer:
            known = sorted(k + 1 for k in self.positions_by_layer)
            raise ValueError(f"visual_positions_at: no record for layer {layer} (recorded: layers {known}); "
                             f"run the model with this recorder as its hook first")
        return self.positions_by_layer[layer - 1]
