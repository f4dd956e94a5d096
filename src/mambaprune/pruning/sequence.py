"""The object that travels between Mamba layers, and that every pruning method sees.

A :class:`TokenSequence` holds, per token, the two tensors a Mamba layer hands to the next one (the mixer
output ``hidden`` and the residual stream ``residual``; the layer input is ``hidden + residual``), the token's
original position in the input sequence, whether it is a visual token, whether it is real or left padding,
and, when asked for, the importance signals of the layer just run. A method cuts or merges tokens by
returning a new sequence (:meth:`TokenSequence.select`, :meth:`TokenSequence.replace`); hidden and residual
are always cut together.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

#: Names of the per-token importance signals a layer can report (channel means; see MambaMixer.forward).
SIGNAL_NAMES = ("delta", "B", "C", "y")


@dataclass
class TokenSequence:
    """Token states between two layers.

    Attributes:
        hidden: (batch, L, d_model) output of the layer just run (the embeddings before the first layer).
        residual: (batch, L, d_model) residual stream, or None before the first layer (read as zeros).
        positions: (batch, L) long, each token's index in the original input sequence; -1 for padding.
        is_visual: (batch, L) bool, True for visual tokens.
        mask: (batch, L) bool, False for left padding.
        layer: index of the layer just run, -1 before the first layer.
        signals: per-token importance signals of ``layer`` (name -> (batch, L) fp32), only when requested:
            ``delta`` = mean over d_inner of softplus(dt_proj(.)) (DTP Eq. 6), ``B`` / ``C`` = mean over
            d_state of the input-dependent B / C, ``y`` = mean over d_inner of the SSM output
            ``C_t h_t + D x_t`` before the silu(z) gate. In a Mamba-2 layer, ``delta`` is Δ averaged over heads
            (the same mean over channels), ``B`` / ``C`` are averaged over groups and d_state, and ``y`` is taken
            before the gated norm (:meth:`mambaprune.models.mamba2.Mamba2Mixer.forward`).
    """

    hidden: torch.Tensor
    residual: torch.Tensor | None
    positions: torch.Tensor
    is_visual: torch.Tensor
    mask: torch.Tensor
    layer: int = -1
    signals: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    def num_tokens(self) -> torch.Tensor:
        """(batch,) number of real (non-padding) tokens per sample."""
        return self.mask.sum(1)

    def num_visual(self) -> torch.Tensor:
        """(batch,) number of real visual tokens per sample."""
        return (self.is_visual & self.mask).sum(1)

    def stream(self) -> torch.Tensor:
        """The residual stream the next layer reads, ``hidden + residual`` (fp32 when the residual is)."""
        return self.hidden if self.residual is None else self.residual + self.hidden

    def replace(self, **changes) -> "TokenSequence":
        """A copy with some fields replaced (e.g. merged ``hidden`` and ``residual`` from a merge method)."""
        return dataclasses.replace(self, **changes)

    def select(self, keep: torch.Tensor) -> "TokenSequence":
        """Keep a subset of tokens, in their current order.

        ``keep`` is either a (batch, L) bool mask (samples may keep different numbers of tokens; the result is
        left-padded to the longest) or a (batch, K) long tensor of indices into the current sequence (sorted
        ascending to keep the order). Padding tokens are never kept. Every sample must keep at least one token.
        """
        b, L = self.mask.shape
        if keep.dtype == torch.bool:
            if tuple(keep.shape) != (b, L):
                raise ValueError(f"select: bool keep mask must have shape {(b, L)}, got {tuple(keep.shape)}")
            keep = keep & self.mask
            counts = keep.sum(1)
            k = int(counts.max())
            # stable sort puts dropped tokens first and kept ones last, each group in ascending order
            order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, L - k:]
            new_mask = torch.arange(k, device=keep.device)[None, :] >= (k - counts)[:, None]
        else:
            if keep.dim() != 2 or keep.shape[0] != b or keep.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"select: index keep must be a (batch={b}, K) integer tensor, "
                                 f"got {tuple(keep.shape)} {keep.dtype}")
            if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= L):
                raise ValueError(f"select: indices must lie in [0, {L}), got [{int(keep.min())}, {int(keep.max())}]")
            order = torch.sort(keep.long(), dim=1).values
            new_mask = self.mask.gather(1, order)
            counts = new_mask.sum(1)
        if order.shape[1] == 0 or bool((counts == 0).any()):
            raise ValueError("select: every sample must keep at least one token")
        return self.gather(order, new_mask)

    def gather(self, order: torch.Tensor, new_mask: torch.Tensor) -> "TokenSequence":
        """Rebuild the sequence from the tokens at ``order`` (batch, K); ``new_mask`` marks the real ones."""
        def take(x):
            if x is None:
                return None
            if x.dim() == 3:
                return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
            return x.gather(1, order)

        return TokenSequence(
            hidden=take(self.hidden),
            residual=take(self.residual),
            positions=take(self.positions).masked_fill(~new_mask, -1),
            is_visual=take(self.is_visual) & new_mask,
            mask=new_mask,
            layer=self.layer,
            signals={name: take(value) for name, value in self.signals.items()},
        )
