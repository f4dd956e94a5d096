"""The implicit attention matrix of a selective SSM layer (DTP paper, Section 3.2, Eq. 3-5; Ali et al. 2024).

With ``h_0 = 0`` the scan ``h_t = Ā_t h_{t-1} + B̄_t x_t, y_t = C_t h_t`` unrolls into (Eq. 3-4)::

    y_t = sum_{j <= t} K[t, j] x_j,     K[t, j] = C_t (prod_{k=j+1..t} Ā_k) B̄_j

which, arranged over all t and j, is a lower-triangular (L, L) matrix per channel (Eq. 5). In Mamba v1
every channel d of d_inner has its own matrix: ``Ā_k = exp(Δ_{k,d} A_d)`` is diagonal over the d_state states,
so ``K_d[t, j] = sum_n C[t, n] exp(A[d, n] sum_{k=j+1..t} Δ[k, d]) Δ[j, d] B[j, n]``.

**Discretisation.** Eq. 2 of the paper writes the zero-order-hold ``B̄ = (ΔA)^{-1}(exp(ΔA) - I) ΔB``; the
released Mamba code (and :func:`mambaprune.ssm.reference.selective_scan_reference`) uses the simplified
``B̄_j = Δ_j B_j``. We use the simplified form, so that ``sum_j K_d[t, j] u[j, d]`` is exactly the scan output
``C_t h_t`` of the model (without the ``D u_t`` skip term).

**How it is computed.** Never as (L, L, d_inner, d_state) at once: channels are processed in blocks of
``block_size``, and within a block the d_state states one at a time, so the working memory is a few
``block_size * L * L`` floats. The decay between j and t is ``exp(A[d, n] * (S[t, d] - S[j, d]))`` with
``S = cumsum(Δ)``; the cumulative sum and the differences are taken in float64 (a difference of two large
fp32 sums would lose the small decays late in a long sequence), the upper triangle (t < j, where the
exponent would be positive) is set to -inf *before* exponentiating, and on and below the diagonal the
exponent is ``A * (non-negative sum)`` <= 0, since Δ >= 0 and A <= 0 are checked. So nothing can overflow:
large decays underflow to an exact 0, and the upper triangle is exactly 0.

**Mamba-2** (:func:`ssd_implicit_attention`). The SSD recurrence ``h_t = exp(Δ_{t,h} A_h) h_{t-1} + Δ_{t,h} x_t
B_t^T, y_t = h_t C_t`` has one scalar decay per head h, and B, C shared by the heads of a group g(h), so one
(L, L) matrix per head serves all its headdim channels::

    K_h[t, j] = (C_t . B_j)_{g(h)} * exp(A_h sum_{k=j+1..t} Δ_{k,h}) * Δ_{j,h},    y_t = sum_{j <= t} K_h[t, j] x_j

(the head's SSD output before the D skip). The decay is computed with the same safe arithmetic, once per head
instead of once per state. :func:`implicit_attention_maps` takes the layer kind from ``lm.config.layer`` and reads
the scan inputs through the mixer of that kind (:data:`LAYER_MAPS`); for a Mamba-2 layer its ``channels`` are
heads (each head's K applies to all its channels, so the mean over heads is the mean over the d_ssm channels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import torch

from .hooks import ObservingHook

REDUCTIONS = ("mean", "abs_mean", "none")
_LOG2E = 1.4426950408889634


def _check_inputs(delta, A, B, C):
    for name, x in (("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"implicit_attention: {name} must be a floating-point tensor")
    if delta.dim() not in (2, 3):
        raise ValueError(f"implicit_attention: delta must be (L, d_inner) or (batch, L, d_inner), "
                         f"got shape {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != delta.shape[-1]:
        raise ValueError(f"implicit_attention: A must be (d_inner={delta.shape[-1]}, d_state), "
                         f"got shape {tuple(A.shape)}")
    want = (*delta.shape[:-1], A.shape[1])
    for name, x in (("B", B), ("C", C)):
        if tuple(x.shape) != want:
            raise ValueError(f"implicit_attention: {name} must have shape {want} (delta's batch and length, "
                             f"A's d_state), got {tuple(x.shape)}")
    if delta.shape[-2] == 0:
        raise ValueError("implicit_attention: the sequence is empty (L = 0)")
    if bool((A > 0).any()):
        raise ValueError("implicit_attention: A must be <= 0 everywhere (Mamba's A = -exp(A_log))")
    if bool((delta < 0).any()):
        raise ValueError("implicit_attention: delta must be >= 0 (it is a softplus output)")


def _channel_index(channels, count: int, device, name: str = "implicit_attention",
                   what: str = "channels") -> torch.Tensor:
    """The indices in ``channels`` (all ``count`` when None) as a long tensor; bad ones are a ValueError."""
    if channels is None:
        return torch.arange(count, device=device)
    idx = torch.as_tensor(channels, device=device)
    if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"{name}: {what} must be a non-empty 1-D collection of indices, got {channels!r}")
    if int(idx.min()) < 0 or int(idx.max()) >= count:
        raise ValueError(f"{name}: {what} must lie in [0, {count}), got [{int(idx.min())}, {int(idx.max())}]")
    return idx.long()


def _decay(seg: torch.Tensor, rate: torch.Tensor, upper: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``exp(rate * seg)`` into ``out`` (c, L, L), exactly 0 where ``upper`` (t < j) and never exp of a positive
    number: seg (c, L, L) holds non-negative Δ sums on and below the diagonal, ``rate`` (c,) is ``A log2(e)`` <= 0;
    the upper triangle is set to -inf before exponentiating. exp(A x) is taken as exp2(A log2(e) x), the same
    value to fp32 rounding, cheaper on CPUs."""
    torch.mul(seg, rate[:, None, None], out=out)
    out.masked_fill_(upper, float("-inf"))
    return torch.exp2(out, out=out)


def _segments(cum: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """(c, t, j) fp32 ``sum_{k=j+1..t} Δ[k]`` for the channels (or heads) ``ch`` from the float64 cumulative
    sums ``cum`` (L, channels); the difference is taken in float64."""
    s = cum[:, ch].t()
    return (s[:, :, None] - s[:, None, :]).float()


class _Reduction:
    """Collects the (c, L, L) blocks of K: kept (``none``), or summed over channels (``mean``, ``abs_mean``)."""

    def __init__(self, reduce: str):
        self.reduce, self.blocks, self.total = reduce, [], None

    def add(self, k_block: torch.Tensor) -> None:
        if self.reduce == "none":
            self.blocks.append(k_block)
            return
        part = (k_block.abs() if self.reduce == "abs_mean" else k_block).sum(0)
        self.total = part if self.total is None else self.total + part

    def result(self, count: int) -> torch.Tensor:
        return torch.cat(self.blocks) if self.reduce == "none" else self.total / count


def _one_sequence(delta, A, B, C, idx, reduce, block_size):
    """Eq. 4-5 for one sequence: delta (L, d_inner), B/C (L, d_state) -> (L, L) or (len(idx), L, L)."""
    L, n_state = delta.shape[0], A.shape[1]
    delta, A, B, C = delta.float(), A.float(), B.float(), C.float()
    A2 = A * _LOG2E
    cum = delta.double().cumsum(0)                                          # S[t, d] = sum_{k<=t} Δ[k, d]
    upper = torch.ones(L, L, dtype=torch.bool, device=delta.device).triu(1)  # t < j: not causal
    out = _Reduction(reduce)
    for start in range(0, idx.numel(), block_size):
        ch = idx[start:start + block_size]
        seg = _segments(cum, ch)                                            # (c, t, j): sum_{k=j+1..t} Δ[k]
        k_block = torch.zeros_like(seg)
        decay = torch.empty_like(seg)
        for n in range(n_state):
            # C_t (prod Ā) B_j for state n, summed over states; Δ_j multiplies below (B̄_j = Δ_j B_j)
            k_block.addcmul_(_decay(seg, A2[ch, n], upper, decay), torch.outer(C[:, n], B[:, n]))
        k_block.mul_(delta[:, ch].t()[:, None, :])
        out.add(k_block)
    return out.result(idx.numel())


def implicit_attention(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       channels: Collection[int] | torch.Tensor | None = None, reduce: str = "mean",
                       block_size: int = 16) -> torch.Tensor:
    """The implicit attention matrix K of a selective SSM (Eq. 4-5), per channel or averaged over channels.

    ``K_d[t, j] = C_t (prod_{k=j+1..t} exp(Δ_{k,d} A_d)) Δ_{j,d} B_j`` for ``j <= t`` and 0 above the
    diagonal, with the simplified ``B̄_j = Δ_j B_j`` of the released code (see the module docstring), so that
    ``sum_j K_d[t, j] u[j, d] = C_t h_t`` for channel d (Eq. 3-4; the model's ``D u_t`` term is not in K).

    Args:
        delta: (L, d_inner) or (batch, L, d_inner), Δ after softplus (>= 0), as
            :meth:`~mambaprune.models.mamba_lm.MambaMixer.ssm_inputs` returns it.
        A: (d_inner, d_state), <= 0.
        B, C: (L, d_state) or (batch, L, d_state), matching ``delta``.
        channels: the d_inner channels to use (default all).
        reduce: ``"mean"`` averages K over the channels, ``"abs_mean"`` averages |K|, ``"none"`` keeps one
            matrix per channel (memory ``len(channels) * L * L``).
        block_size: channels processed at once; peak working memory is about ``5 * block_size * L * L``
            floats (the float64 decay sums, the fp32 decays and the block's K), plus the result. The result
            does not depend on it.

    Returns:
        float32 (L, L) for ``mean``/``abs_mean``, (len(channels), L, L) for ``none``; with a leading batch
        dimension when the inputs have one.
    """
    _check_inputs(delta, A, B, C)
    if reduce not in REDUCTIONS:
        raise ValueError(f"implicit_attention: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"implicit_attention: block_size must be a positive int, got {block_size!r}")
    idx = _channel_index(channels, delta.shape[-1], delta.device)
    if delta.dim() == 2:
        return _one_sequence(delta, A, B, C, idx, reduce, block_size)
    return torch.stack([_one_sequence(delta[i], A, B[i], C[i], idx, reduce, block_size)
                        for i in range(delta.shape[0])])


def _check_ssd_inputs(delta, A, B, C):
    name = "ssd_implicit_attention"
    for key, x in (("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name}: {key} must be a floating-point tensor")
    if delta.dim() not in (2, 3):
        raise ValueError(f"{name}: delta must be (L, nheads) or (batch, L, nheads), got shape {tuple(delta.shape)}")
    if A.dim() != 1 or A.shape[0] != delta.shape[-1]:
        raise ValueError(f"{name}: A must be (nheads={delta.shape[-1]},), got shape {tuple(A.shape)}")
    if B.dim() != delta.dim() + 1 or tuple(B.shape[:-2]) != tuple(delta.shape[:-1]) or tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"{name}: B and C must both be {(*delta.shape[:-1], 'ngroups', 'd_state')} (delta's batch "
                         f"and length), got {tuple(B.shape)} and {tuple(C.shape)}")
    if B.shape[-2] == 0 or delta.shape[-1] % B.shape[-2]:
        raise ValueError(f"{name}: nheads ({delta.shape[-1]}) must be a multiple of ngroups ({B.shape[-2]})")
    if delta.shape[-2] == 0:
        raise ValueError(f"{name}: the sequence is empty (L = 0)")
    if bool((A > 0).any()):
        raise ValueError(f"{name}: A must be <= 0 everywhere (Mamba's A = -exp(A_log))")
    if bool((delta < 0).any()):
        raise ValueError(f"{name}: delta must be >= 0 (it is a softplus output)")


def _ssd_one_sequence(delta, A, B, C, idx, reduce, block_size):
    """K_h for one sequence: delta (L, nheads), B/C (L, ngroups, d_state) -> (L, L) or (len(idx), L, L)."""
    L, nheads, ngroups = delta.shape[0], delta.shape[1], B.shape[1]
    delta = delta.float()
    A2 = A.float() * _LOG2E
    CB = torch.einsum("tgn,jgn->gtj", C.float(), B.float())                 # (ngroups, t, j): C_t . B_j
    group = torch.arange(nheads, device=delta.device) // (nheads // ngroups)  # head h -> its group
    cum = delta.double().cumsum(0)
    upper = torch.ones(L, L, dtype=torch.bool, device=delta.device).triu(1)
    out = _Reduction(reduce)
    for start in range(0, idx.numel(), block_size):
        heads = idx[start:start + block_size]
        seg = _segments(cum, heads)                                         # (c, t, j): sum_{k=j+1..t} Δ[k, h]
        k_block = _decay(seg, A2[heads], upper, seg)                        # one scalar decay rate per head
        k_block.mul_(CB[group[heads]]).mul_(delta[:, heads].t()[:, None, :])
        out.add(k_block)
    return out.result(idx.numel())


def ssd_implicit_attention(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           heads: Collection[int] | torch.Tensor | None = None, reduce: str = "mean",
                           block_size: int = 16) -> torch.Tensor:
    """The implicit attention of a Mamba-2 (SSD) layer, per head or averaged over heads (module docstring).

    ``K_h[t, j] = (C_t . B_j)_{g(h)} exp(A_h sum_{k=j+1..t} Δ_{k,h}) Δ_{j,h}`` for ``j <= t``, 0 above the
    diagonal, so that ``sum_j K_h[t, j] x[j, h, :]`` is head h's SSD output without the ``D x`` skip.

    Args:
        delta: (L, nheads) or (batch, L, nheads), Δ after softplus and the clamp (>= 0), as
            :meth:`~mambaprune.models.mamba2.Mamba2Mixer.ssd_inputs` returns it.
        A: (nheads,), <= 0.
        B, C: (L, ngroups, d_state) or (batch, L, ngroups, d_state); head h uses group ``h // (nheads / ngroups)``.
        heads: the heads to use (default all).
        reduce: ``"mean"`` / ``"abs_mean"`` average K / |K| over the heads (every head has headdim channels, so
            this is the average over the d_ssm channels), ``"none"`` keeps one matrix per head.
        block_size: heads processed at once (working memory about ``3 * block_size * L * L`` floats); the
            result does not depend on it.

    Returns:
        float32 (L, L), or (len(heads), L, L) for ``none``; with a leading batch dimension when the inputs have one.
    """
    _check_ssd_inputs(delta, A, B, C)
    if reduce not in REDUCTIONS:
        raise ValueError(f"ssd_implicit_attention: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"ssd_implicit_attention: block_size must be a positive int, got {block_size!r}")
    idx = _channel_index(heads, delta.shape[-1], delta.device, "ssd_implicit_attention", "heads")
    if delta.dim() == 2:
        return _ssd_one_sequence(delta, A, B, C, idx, reduce, block_size)
    return torch.stack([_ssd_one_sequence(delta[i], A, B[i], C[i], idx, reduce, block_size)
                        for i in range(delta.shape[0])])


def _mamba1_map(mixer, x, mask, real, channels, reduce, block_size):
    """Eq. 5 of a Mamba-1 layer for the normalised input x (1, L, d_model), over the real tokens."""
    _, _, _, delta, A, B, C = mixer.ssm_inputs(x, mask)
    return implicit_attention(delta[0, real], A, B[0, real], C[0, real], channels=channels, reduce=reduce,
                              block_size=block_size)


def _mamba2_map(mixer, x, mask, real, channels, reduce, block_size):
    """The per-head K of a Mamba-2 layer for the normalised input x (1, L, d_model); ``channels`` are heads."""
    inp = mixer.ssd_inputs(x, mask)
    return ssd_implicit_attention(inp.delta[0, real], inp.A, inp.B[0, real], inp.C[0, real], heads=channels,
                                  reduce=reduce, block_size=block_size)


#: How the implicit attention of one layer is read, per layer kind (``MambaConfig.layer``).
LAYER_MAPS = {"Mamba1": _mamba1_map, "Mamba2": _mamba2_map}


@dataclass
class LayerImplicitAttention:
    """The implicit attention of one layer for one sample, over the tokens that layer processed.

    Attributes:
        layer: the layer (0-based).
        map: (L, L) channel-averaged K, or (channels, L, L) with ``reduce="none"``; row t / column j is the
            t-th / j-th token the layer processed (left padding removed).
        positions: (L,) each of those tokens' index in the original input (differs from 0..L-1 when a hook
            cut tokens before this layer).
        is_visual: (L,) bool, True for visual tokens.
    """

    layer: int
    map: torch.Tensor
    positions: torch.Tensor
    is_visual: torch.Tensor

    @property
    def visual_span(self) -> tuple[int, int] | None:
        """(first, last + 1) row index of the visual tokens, or None when the layer saw none."""
        rows = torch.nonzero(self.is_visual).flatten()
        if rows.numel() == 0:
            return None
        return int(rows[0]), int(rows[-1]) + 1


class _LayerInputs(ObservingHook):
    """Keeps the sequences that the layers in ``layers`` receive (after the inner hook acted)."""

    def __init__(self, layers: set[int], inner_hook=None):
        super().__init__(inner_hook)
        self.layers = layers
        self.inputs: dict[int, object] = {}

    def start(self, config) -> None:
        super().start(config)
        self.inputs = {}

    def observe(self, seq) -> None:
        if seq.layer + 1 in self.layers:
            self.inputs[seq.layer + 1] = seq


@torch.no_grad()
def implicit_attention_maps(lm, layers: Sequence[int], input_ids=None, *, inputs_embeds=None,
                            attention_mask=None, is_visual=None, sample: int = 0, hook=None,
                            channels=None, reduce: str = "mean",
                            block_size: int = 16) -> dict[int, LayerImplicitAttention]:
    """Implicit attention (Eq. 5) of several layers of a :class:`~mambaprune.models.mamba_lm.MambaLM`, one pass.

    The model runs once with a hook that keeps the sequence each requested layer l receives (the one after
    layer l - 1, or the embeddings for l = 0, after ``hook`` acted if one is given, e.g. a pruner: then the
    maps are those of the pruned model). The layer input is formed exactly as in the layer,
    ``norm(hidden + residual)``, and :meth:`MambaMixer.ssm_inputs` gives its Δ, A, B, C; then
    :func:`implicit_attention` on the real (non-padding) tokens of sample ``sample``. A Mamba-2 model
    (``lm.config.layer == "Mamba2"``) goes through :meth:`Mamba2Mixer.ssd_inputs` and
    :func:`ssd_implicit_attention` instead (:data:`LAYER_MAPS`); ``channels`` then selects heads.

    Returns ``{layer: LayerImplicitAttention}``, with the tokens' original positions and kinds.
    """
    n_layer = lm.config.n_layer
    if isinstance(layers, int):
        raise ValueError("implicit_attention_maps: layers must be a sequence of layer indices "
                         "(layer_implicit_attention takes a single one)")
    wanted = list(layers)
    if not wanted:
        raise ValueError("implicit_attention_maps: give at least one layer")
    for layer in wanted:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layer:
            raise ValueError(f"implicit_attention_maps: layer {layer!r} is outside [0, {n_layer - 1}] "
                             f"for a {n_layer}-layer model")
    wanted = sorted(set(wanted))
    if reduce not in REDUCTIONS:
        raise ValueError(f"implicit_attention_maps: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    kind = getattr(lm.config, "layer", "Mamba1")
    if kind not in LAYER_MAPS:
        raise ValueError(f"implicit_attention_maps: no implicit attention for layer kind {kind!r}; "
                         f"known: {', '.join(LAYER_MAPS)}")
    layer_map = LAYER_MAPS[kind]
    capture = _LayerInputs(set(wanted), hook)
    lm(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, is_visual=is_visual, hook=capture)
    batch = next(iter(capture.inputs.values())).batch_size
    if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample < batch:
        raise ValueError(f"implicit_attention_maps: sample must be an int in [0, {batch - 1}], got {sample!r}")
    out = {}
    for layer in wanted:
        seq = capture.inputs[layer]
        block = lm.backbone.layers[layer]
        normed, _ = block.add_norm(seq.hidden[sample:sample + 1],
                                   None if seq.residual is None else seq.residual[sample:sample + 1])
        real = seq.mask[sample]
        mask = None if bool(real.all()) else real[None]
        out[layer] = LayerImplicitAttention(
            layer=layer,
            map=layer_map(block.mixer, normed, mask, real, channels, reduce, block_size),
            positions=seq.positions[sample, real].clone(),
            is_visual=seq.is_visual[sample, real].clone(),
        )
    return out


def layer_implicit_attention(lm, input_ids=None, *, inputs_embeds=None, attention_mask=None, is_visual=None,
                             layer: int, sample: int = 0, hook=None, channels=None, reduce: str = "mean",
                             block_size: int = 16) -> LayerImplicitAttention:
    """Implicit attention (Eq. 5) of one layer; see :func:`implicit_attention_maps` (one pass per call)."""
    return implicit_attention_maps(lm, [layer], input_ids, inputs_embeds=inputs_embeds,
                                   attention_mask=attention_mask, is_visual=is_visual, sample=sample, hook=hook,
                                   channels=channels, reduce=reduce, block_size=block_size)[layer]
