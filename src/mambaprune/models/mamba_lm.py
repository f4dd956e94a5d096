"""A Mamba language model that owns its layer loop, so a pruning method can act between any two layers.

Its layers are Mamba (v1) blocks, or Mamba-2 blocks (:class:`~mambaprune.models.mamba2.Mamba2Mixer`) when
``config.layer == "Mamba2"``; the loop, the token sequence and the hooks are the same for both.

Module and weight names follow mamba_ssm (``backbone.embedding``, ``backbone.layers.{i}.norm``,
``backbone.layers.{i}.mixer.{in_proj,conv1d,x_proj,dt_proj,out_proj,A_log,D}``, ``backbone.norm_f``,
``lm_head``); loading of transformers and mamba_ssm folders is in :mod:`mambaprune.models.checkpoints`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Collection

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..pruning.sequence import TokenSequence
from ..ssm import scan_layer, selective_state_update
from ..ssm.conv import causal_conv1d, causal_conv1d_final_state, causal_conv1d_update
from .mamba2 import Mamba2Mixer

Hook = Callable[[TokenSequence], "TokenSequence | None"]


@dataclass
class MambaConfig:
    """Hyper-parameters of a Mamba LM, named as in mamba_ssm's ``MambaConfig``.

    ``vocab_size`` is the tokenizer's vocabulary; the embedding has ``padded_vocab_size`` rows (rounded up to
    a multiple of ``pad_vocab_size_multiple``, 8 in the released checkpoints). ``dt_rank="auto"`` means
    ``ceil(d_model / 16)``.

    ``layer`` is the mixer kind, as ``ssm_cfg["layer"]`` of mamba_ssm: ``"Mamba1"`` or ``"Mamba2"``. The fields
    after it are the arguments of mamba_ssm's ``Mamba2`` (``modules/mamba2.py``) and are read by Mamba-2 layers
    only: ``headdim``, ``ngroups`` (groups of heads sharing B and C), ``chunk_size`` of the SSD scan,
    ``dt_limit`` (Δ is clamped to it), ``norm_before_gate``, ``D_has_hdim`` (D per channel instead of per head),
    ``rmsnorm`` (the gated RMSNorm before ``out_proj``), ``d_ssm`` (channels that go through the SSM, default
    all ``d_inner``; the others form a gated MLP). A Mamba-2 checkpoint's ``d_state`` is 128 unless it says
    otherwise (mamba_ssm's default; see :mod:`mambaprune.models.checkpoints`).
    """

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    pad_vocab_size_multiple: int = 8
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    conv_bias: bool = True
    bias: bool = False
    eos_token_id: int | None = 0
    pad_token_id: int | None = 0
    layer: str = "Mamba1"
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    norm_before_gate: bool = False
    D_has_hdim: bool = False
    rmsnorm: bool = True
    d_ssm: int | None = None

    def __post_init__(self):
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        names = ["d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank",
                 "pad_vocab_size_multiple"]
        if self.layer not in LAYER_KINDS:
            raise ValueError(f"MambaConfig.layer must be one of {LAYER_KINDS}, got {self.layer!r}")
        if self.layer == "Mamba2":
            names += ["headdim", "ngroups", "chunk_size"] + ([] if self.d_ssm is None else ["d_ssm"])
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive integer, got {value!r}")
        try:
            self.dt_limit = tuple(float(v) for v in self.dt_limit)
        except (TypeError, ValueError):
            self.dt_limit = None
        if self.dt_limit is None or len(self.dt_limit) != 2 or not 0.0 <= self.dt_limit[0] <= self.dt_limit[1]:
            raise ValueError(f"MambaConfig.dt_limit must be (low, high) with 0 <= low <= high, got {self.dt_limit!r}")
        if self.layer == "Mamba2":
            d_ssm = self.d_inner if self.d_ssm is None else self.d_ssm
            if d_ssm > self.d_inner or d_ssm % self.headdim or (d_ssm // self.headdim) % self.ngroups:
                raise ValueError(f"MambaConfig: a Mamba-2 layer needs d_ssm ({d_ssm}) <= d_inner ({self.d_inner}), "
                                 f"a multiple of headdim ({self.headdim}), and a number of heads that is a "
                                 f"multiple of ngroups ({self.ngroups})")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


#: Mixer kinds of :attr:`MambaConfig.layer` (the names of mamba_ssm's ``ssm_cfg["layer"]``).
LAYER_KINDS = ("Mamba1", "Mamba2")


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and rounded once, as mamba_ssm's Triton kernel does.

    ``x`` (any float dtype, in the layers the fp32 residual sum) is normalised in fp32, scaled by the weight in
    fp32 and rounded once to the weight's dtype (the model's): ``ops/triton/layer_norm.py`` l.259-282 of
    state-spaces/mamba. In fp32 this is transformers' ``MambaRMSNorm``.
    """

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(self.weight.dtype)


def _fp32_sum(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``hidden + residual`` formed in fp32 (``hidden`` alone before the first layer): the sum mamba_ssm's fused
    add+norm forms before normalising (``ops/triton/layer_norm.py`` l.233-261)."""
    return hidden.float() if residual is None else residual.float() + hidden.float()


@dataclass
class LayerCache:
    """Decoding state of one layer: the last ``d_conv`` conv inputs (model dtype) and the SSM state."""

    conv_state: torch.Tensor  # (batch, d_inner, d_conv); Mamba-2: (batch, conv_dim, d_conv)
    ssm_state: torch.Tensor   # (batch, d_inner, d_state); Mamba-2: (batch, nheads, headdim, d_state); dtype:
    #                           MambaCache.state_dtype


@dataclass
class MambaCache:
    """Per-layer decoding states. Fixed size, so a prefill that dropped tokens needs no resizing.

    ``state_dtype``: the dtype the SSM states are kept in; None: the model's dtype (see
    :attr:`MambaLM.state_dtype`). The updates are computed in fp32 either way.
    """

    layers: list[LayerCache | None] = field(default_factory=list)
    state_dtype: torch.dtype | None = None

    def set_layer(self, layer_idx: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        """Store layer ``layer_idx``'s state after a prefill (how mixers of other modules write it)."""
        self.layers[layer_idx] = LayerCache(conv_state, ssm_state)


class DeltaProjection(nn.Linear):
    """``dt_proj``: an ``nn.Linear`` whose forward is the matmul alone. Its bias is Δ's bias, which the scan adds in
    fp32 before the softplus (``delta_bias``), as mamba_ssm's fast path uses ``dt_proj.weight`` and passes
    ``dt_proj.bias.float()`` to the kernel (``modules/mamba_simple.py`` l.184, 197). A module of its own, so
    that hooks and FLOP counters see the projection under its released name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MambaMixer(nn.Module):
    """The selective SSM block of Mamba v1 (Gu & Dao 2023, Fig. 3), released-checkpoint weight names.

    In bf16/fp16 it rounds where the released kernels round (mamba_ssm ``modules/mamba_simple.py``): the
    projections are matmuls in the model's dtype; the conv accumulates in fp32 and its SiLU output is rounded
    once (causal-conv1d); ``dt_proj`` is a matmul without its bias, which is added to Δ in fp32 inside the scan
    before the softplus; D and the silu(z) gate are applied in fp32 and the gated output rounded once.
    ``scan_method`` is the scan :func:`~mambaprune.ssm.scan_layer` runs (set it through
    :attr:`MambaLM.scan_method`).
    """

    scan_method: str = "auto"

    def __init__(self, config: MambaConfig):
        super().__init__()
        d, di, n, r = config.d_model, config.d_inner, config.d_state, config.dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = di, n, r, config.d_conv
        self.in_proj = nn.Linear(d, 2 * di, bias=config.bias)
        self.conv1d = nn.Conv1d(di, di, kernel_size=config.d_conv, groups=di, padding=config.d_conv - 1,
                                bias=config.conv_bias)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = DeltaProjection(r, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=config.bias)

    def project(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """The projections of a normalised layer input x (batch, L, d_model), in the model's dtype.

        Returns ``(xs, z, u, dt, B, C)``: the in_proj halves ``xs`` (conv input, zeroed at padding) and ``z``
        (gate), ``u`` = silu(conv(xs)) (causal-conv1d's arithmetic; zeroed at padding after x_proj read it),
        ``dt`` = dt_proj's matmul without its bias (the bias goes into the scan, mamba_simple.py l.184, 197),
        ``B``, ``C`` (batch, L, d_state). All in (batch, L, channels) layout.
        """
        xs, z = self.in_proj(x).chunk(2, dim=-1)                                   # (b, L, d_inner) each
        if mask is not None:
            xs = xs * mask[..., None].to(xs.dtype)
        u = causal_conv1d(xs, self.conv1d.weight[:, 0, :], self.conv1d.bias, activation="silu")
        dt, B, C = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if mask is not None:
            u = u * mask[..., None].to(u.dtype)
        return xs, z, u, self.dt_proj(dt), B, C

    def delta(self, dt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Δ = softplus(dt + dt_proj.bias) in fp32, 0 at padding: what the scan forms from ``dt`` and its
        ``delta_bias``."""
        delta = F.softplus(dt.float() + self.dt_proj.bias.float())
        return delta if mask is None else delta * mask[..., None]

    def ssm_inputs(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """The scan's inputs for a normalised layer input x (batch, L, d_model), in (batch, L, channels) layout.

        Returns ``(xs, z, u, delta, A, B, C)``: ``xs``, ``z`` as :meth:`project`, ``u`` in fp32, ``delta`` =
        softplus(dt_proj(dt)) in fp32 (0 at padding), ``A`` = -exp(A_log) (d_inner, d_state), ``B``/``C``
        (batch, L, d_state) fp32. The analyses (implicit attention, Eq. 3-5 of the DTP paper) read them here.
        """
        xs, z, u, dt, B, C = self.project(x, mask)
        A = -torch.exp(self.A_log.float())
        return xs, z, u.float(), self.delta(dt, mask), A, B.float(), C.float()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, want_signals: bool = False,
                cache: MambaCache | None = None, layer_idx: int = 0):
        """x (batch, L, d_model) normalised input -> (output (batch, L, d_model), signals dict).

        Left padding (``mask`` False) leaves the conv and SSM states untouched: the conv input and the scan
        input are zero there and Δ = 0, so ``exp(Δ A) = 1`` and nothing is added to the state.
        Signals are read from tensors this pass computes anyway (see TokenSequence.signals).
        All tensors stay in (batch, L, channels) layout.
        """
        xs, z, u, dt, B, C = self.project(x, mask)
        A = -torch.exp(self.A_log.float())
        signals = {}
        if mask is None and not want_signals:
            # the released call (mamba_simple.py l.189-200): Δ bias, softplus, D and the gate inside the scan
            y, last_state = scan_layer(u, dt, A, B, C, D=self.D, z=z, delta_bias=self.dt_proj.bias,
                                       delta_softplus=True, method=self.scan_method)
        else:
            # Δ is zeroed at padding and is a signal: the same fp32 arithmetic, outside the scan; y before the gate
            delta = self.delta(dt, mask)
            y, last_state = scan_layer(u, delta, A, B, C, D=self.D, method=self.scan_method)
            if want_signals:
                signals = {"delta": delta.mean(-1), "B": B.float().mean(-1), "C": C.float().mean(-1),
                           "y": y.mean(-1)}
            y = y * F.silu(z.float())
        if cache is not None:
            cache.set_layer(layer_idx, causal_conv1d_final_state(xs, self.d_conv),     # (b, d_inner, d_conv)
                            last_state.to(cache.state_dtype or xs.dtype))
        return self.out_proj(y.to(z.dtype)), signals

    def step(self, x: torch.Tensor, state: LayerCache) -> torch.Tensor:
        """One decoding step: x (batch, d_model) -> (batch, d_model); ``state`` is updated in place.

        mamba_simple.py ``step`` (l.208-253) with causal-conv1d's and mamba_ssm's update kernels: no host
        synchronisation and no new state tensor, so it can be captured in a CUDA graph.
        """
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        u = causal_conv1d_update(xs, state.conv_state, self.conv1d.weight[:, 0, :], self.conv1d.bias,
                                 activation="silu")
        dt, B, C = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        y = selective_state_update(state.ssm_state, u, self.dt_proj(dt), A, B, C, D=self.D,
                                   z=z, delta_bias=self.dt_proj.bias, delta_softplus=True, method=self.scan_method)
        return self.out_proj(y)


class MambaBlock(nn.Module):
    """Add-norm-mix, mamba_ssm style: ``residual = hidden + residual``, ``hidden = mixer(norm(residual))``.

    The add and the norm are mamba_ssm's fused add+norm (``modules/block.py`` l.57-66, ``residual_in_fp32``):
    the sum is formed in fp32 and normalised from there, the normalised input is rounded once to the model's
    dtype, and the residual passed on is that fp32 sum (rounded to the residual's dtype without
    ``residual_in_fp32``).
    """

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mixer = Mamba2Mixer(config) if config.layer == "Mamba2" else MambaMixer(config)

    def add_norm(self, hidden, residual):
        """(mixer input in the model's dtype, residual stream to pass on)."""
        total = _fp32_sum(hidden, residual)
        if not self.residual_in_fp32:
            return self.norm(total), total.to(hidden.dtype if residual is None else residual.dtype)
        return self.norm(total), total

    def forward(self, hidden, residual, mask=None, want_signals=False, cache=None, layer_idx=0):
        normed, residual = self.add_norm(hidden, residual)
        out, signals = self.mixer(normed, mask=mask, want_signals=want_signals, cache=cache, layer_idx=layer_idx)
        return out, residual, signals

    def step(self, hidden, residual, state: LayerCache):
        normed, residual = self.add_norm(hidden, residual)
        return self.mixer.step(normed, state), residual


class MambaBackbone(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.rms_norm_eps)


def _synchronizer(device) -> Callable[[], None]:
    """A no-argument function that waits for ``device``'s queued work (CUDA), or does nothing (CPU)."""
    if device is not None and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class _DecodeGraph:
    """:meth:`MambaLM.step` captured as one CUDA graph for one batch shape, as mamba_ssm's ``capture_graph``
    (utils/generation.py l.342-389): static token and per-layer state buffers, two warm-up steps on a side
    stream, the capture, then each call copies the token in, replays, and returns a copy of the static logits."""

    WARMUPS = 2

    def __init__(self, lm: "MambaLM", like: MambaCache, pool):
        device = like.layers[0].ssm_state.device
        self.cache = MambaCache([LayerCache(torch.zeros_like(c.conv_state), torch.zeros_like(c.ssm_state))
                                 for c in like.layers], like.state_dtype)
        self.token = torch.zeros(like.layers[0].conv_state.shape[0], dtype=torch.long, device=device)
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUPS):
                    lm.step(self.token, self.cache)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits = lm.step(self.token, self.cache)

    def load(self, cache: MambaCache) -> None:
        """Copy the states of a prefill (possibly pruned: the states have a fixed size) into the static ones."""
        for static, state in zip(self.cache.layers, cache.layers):
            static.conv_state.copy_(state.conv_state)
            static.ssm_state.copy_(state.ssm_state)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        self.graph.replay()
        return self.logits.clone()


@dataclass
class MambaOutput:
    """Result of :meth:`MambaLM.forward`.

    ``logits``: (batch, vocab) of the last position, or (batch, L, vocab) when all positions were asked for
    (L is then the length after any cutting). ``sequence``: the final token sequence (what reached the last
    layer), ``tokens_per_layer``: (n_layer,) list of the number of real tokens each layer processed, summed
    over the batch. ``cache`` when ``use_cache``.
    """

    logits: torch.Tensor
    sequence: TokenSequence
    tokens_per_layer: list[int]
    cache: MambaCache | None = None


class MambaLM(nn.Module):
    """Mamba language model with a pruning-ready layer loop, decoding, and released-checkpoint loading.

    Options, attributes that may be set at any time:

    * ``scan_method``: the selective scan every Mamba (v1) layer runs (:func:`mambaprune.ssm.scan_layer`'s
      ``method``), default ``"auto"`` (chunked on a CPU; on CUDA Triton, else parallel).
    * ``state_dtype``: the dtype the SSM states are kept in for decoding. None (default): the model's dtype,
      as every released decoding path keeps them (mamba_ssm ``Mamba.allocate_inference_cache`` and
      ``_get_states_from_cache``, modules/mamba_simple.py l.255-294, which the CUDA-graph cache of
      ``utils/generation.py`` l.311 allocates in the parameters' dtype, and so Cobra's and RoboMamba's
      generation), so bf16 decoding gives the released tokens; ``torch.float32`` keeps them in fp32 (more
      accurate decoding in bf16/fp16; no difference in fp32). The update itself is computed in fp32 either way.
    * ``cuda_graph``: on CUDA, decode with :meth:`step` captured as one CUDA graph per batch size (True by
      default; see :meth:`generate`).
    """

    state_dtype: torch.dtype | None = None
    cuda_graph: bool = True

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = MambaBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.scan_method = MambaMixer.scan_method

    @property
    def scan_method(self) -> str:
        return self._scan_method

    @scan_method.setter
    def scan_method(self, method: str) -> None:
        if not isinstance(method, str):
            raise ValueError(f"scan_method must be the name of a scan method, got {method!r}")
        self.__dict__["_scan_method"] = method
        for module in self.modules():
            if module is not self and hasattr(module, "scan_method"):
                module.scan_method = method

    def _new_cache(self) -> MambaCache:
        dtype = self.state_dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"state_dtype must be None (the model's dtype) or a floating torch.dtype, got {dtype!r}")
        return MambaCache([None] * self.config.n_layer, state_dtype=dtype)

    # ------------------------------------------------------------------ inputs
    def _check_ids(self, input_ids):
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, L), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.padded_vocab_size:
            raise ValueError(f"input_ids out of range: values in [{lo}, {hi}], the vocabulary has "
                             f"{self.config.padded_vocab_size} entries")

    def _check_mask(self, mask, shape, device):
        if mask is None:
            return torch.ones(shape, dtype=torch.bool, device=device)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
            raise ValueError(f"attention_mask must be a tensor of shape {tuple(shape)}, "
                             f"got {getattr(mask, 'shape', type(mask).__name__)}")
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"attention_mask must be bool or integer, got {mask.dtype}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = mask.bool()
        if not bool(mask[:, -1].all()) or bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
            raise ValueError("attention_mask must be left-padded: zeros first, then ones, and each row must "
                             "have at least one token")
        return mask

    def initial_sequence(self, input_ids=None, inputs_embeds=None, attention_mask=None, is_visual=None):
        """The token sequence before the first layer (embeddings, positions 0..L-1, kinds, padding mask)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            self._check_ids(input_ids)
            inputs_embeds = self.backbone.embedding(input_ids.long())
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
                raise ValueError("inputs_embeds must be a floating-point tensor")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
                raise ValueError(f"inputs_embeds must be (batch, L, {self.config.d_model}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
                raise ValueError(f"inputs_embeds is empty (shape {tuple(inputs_embeds.shape)})")
        b, L = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        mask = self._check_mask(attention_mask, (b, L), device)
        if is_visual is None:
            is_visual = torch.zeros(b, L, dtype=torch.bool, device=device)
        elif not isinstance(is_visual, torch.Tensor) or tuple(is_visual.shape) != (b, L):
            raise ValueError(f"is_visual must be a (batch, L) = {(b, L)} tensor")
        pad_offset = (~mask).sum(1, keepdim=True)
        positions = (torch.arange(L, device=device)[None, :] - pad_offset).masked_fill(~mask, -1)
        return TokenSequence(hidden=inputs_embeds, residual=None, positions=positions,
                             is_visual=is_visual.bool() & mask, mask=mask, layer=-1)

    # ------------------------------------------------------------------ prefill
    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, is_visual=None,
                hook: Hook | None = None, signal_layers: Collection[int] | bool | None = None,
                return_all_logits: bool = False, use_cache: bool = False) -> MambaOutput:
        """Run the prompt through all layers.

        Args:
            input_ids: (batch, L) token ids, left-padded when ``attention_mask`` is given; or ``inputs_embeds``
                (batch, L, d_model) (how a multimodal model feeds visual tokens).
            is_visual: optional (batch, L) bool marking visual tokens.
            hook: called with the :class:`TokenSequence` before the first layer (``layer == -1``) and after
                every layer; it may return a new sequence (cut or merged tokens) or None to leave it as is.
                If it has a ``start(config)`` method, that is called first, once per forward pass (the
                pruners of :mod:`mambaprune.pruning` use it to resolve their layers and reset records).
            signal_layers: layers whose importance signals are computed (a collection of indices, True for
                all); by default the hook's ``signal_layers`` attribute if it has one, else none.
            return_all_logits: logits for every remaining position instead of the last one only.
            use_cache: also return the per-layer decoding states for :meth:`step`.
        """
        seq = self.initial_sequence(input_ids, inputs_embeds, attention_mask, is_visual)
        if hook is not None and hasattr(hook, "start"):
            hook.start(self.config)               # a pruner resolves its layers and clears per-run records
        if signal_layers is None:
            signal_layers = getattr(hook, "signal_layers", None) or ()
        cache = self._new_cache() if use_cache else None
        tokens_per_layer = []
        if hook is not None:
            seq = self._apply_hook(hook, seq)
        for i, block in enumerate(self.backbone.layers):
            want = signal_layers is True or i in signal_layers
            tokens_per_layer.append(int(seq.mask.sum()))
            mask = None if bool(seq.mask.all()) else seq.mask
            hidden, residual, signals = block(seq.hidden, seq.residual, mask=mask, want_signals=want,
                                              cache=cache, layer_idx=i)
            seq = seq.replace(hidden=hidden, residual=residual, layer=i, signals=signals)
            if hook is not None:
                seq = self._apply_hook(hook, seq)
        hidden, residual = seq.hidden, seq.residual
        if not return_all_logits:
            hidden, residual = hidden[:, -1], None if residual is None else residual[:, -1]
        logits = self.lm_head(self.backbone.norm_f(_fp32_sum(hidden, residual)))  # norm_f on the fp32 sum
        return MambaOutput(logits=logits, sequence=seq, tokens_per_layer=tokens_per_layer, cache=cache)

    @staticmethod
    def _apply_hook(hook, seq):
        new = hook(seq)
        if new is None:
            return seq
        if not isinstance(new, TokenSequence):
            raise ValueError(f"a hook must return a TokenSequence or None, got {type(new).__name__}")
        b, L = new.mask.shape
        if new.hidden.shape[:2] != (b, L) or (new.residual is not None and new.residual.shape[:2] != (b, L)):
            raise ValueError("the hook returned a sequence whose hidden/residual do not match its mask")
        if b != seq.batch_size or L == 0 or bool((new.mask.sum(1) == 0).any()):
            raise ValueError("the hook must keep the batch size and at least one token per sample")
        return new

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """Feed one token per sample (batch,) and return next-token logits (batch, vocab); updates ``cache``."""
        hidden = self.backbone.embedding(token_ids)
        residual = None
        for block, state in zip(self.backbone.layers, cache.layers):
            hidden, residual = block.step(hidden, residual, state)
        return self.lm_head(self.backbone.norm_f(_fp32_sum(hidden, residual)))

    def _decoder(self, cache: MambaCache) -> Callable[[torch.Tensor], torch.Tensor]:
        """The decoding step :meth:`generate` runs from ``cache``: token (batch,) -> logits (batch, vocab).

        :meth:`step` itself; or, on CUDA with :attr:`cuda_graph`, the replay of :meth:`step` captured once per
        batch shape, with ``cache``'s states copied into the graph's static ones first. A graph is kept until the
        weights move or change dtype (then all are captured anew).
        """
        first = cache.layers[0]
        if not (self.cuda_graph and first.ssm_state.device.type == "cuda"):
            return lambda token: self.step(token, cache)
        weights = tuple((p.data_ptr(), p.dtype) for p in self.parameters())
        graphs = self.__dict__.setdefault("_decode_graphs", {})
        if graphs.get("weights") != weights:
            graphs.clear()
            graphs.update(weights=weights, pool=torch.cuda.graph_pool_handle())
        key = (tuple(first.conv_state.shape), first.conv_state.dtype, first.ssm_state.dtype,
               first.ssm_state.device, self.scan_method, torch.is_inference_mode_enabled())
        if key not in graphs:
            graphs[key] = _DecodeGraph(self, cache, graphs["pool"])
        graph = graphs[key]
        graph.load(cache)
        return graph

    def _next_token(self, logits, do_sample, temperature, top_p, generator):
        logits = logits[..., : self.config.vocab_size].float()
        if not do_sample:
            return logits.argmax(-1)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    @torch.no_grad()
    def generate(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, is_visual=None,
                 hook: Hook | None = None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | None = -1,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 timings: dict | None = None, first_logits: list | None = None) -> torch.Tensor:
        """Prefill (with whatever cutting ``hook`` does), then one-token steps from the per-layer states.

        Greedy by default; ``do_sample`` with ``temperature`` and nucleus ``top_p``. A sample stops at
        ``eos_token_id`` (default: the config's; None never stops) and everything stops after
        ``max_new_tokens``. Returns the new tokens (batch, n) including the EOS, with ``pad_token_id``
        (default: EOS or 0) after a sample has stopped.

        ``timings``: a dict to fill with ``prefill_s`` (seconds of the prefill forward, the hook included),
        ``decode_s`` (a list: seconds of each :meth:`step` call, so ``len(decode_s)`` steps were run),
        ``tokens_per_layer`` (the prefill's, see :class:`MambaOutput`) and ``method_s`` (the hook's
        ``method_seconds`` after the prefill, 0.0 for a hook without one). Timers are ``time.perf_counter``;
        on CUDA tensors the device is synchronised before each timer is read.

        ``first_logits``: a list to which the prefill's last-position logits (batch, vocab), in fp32, are appended:
        the distribution the first new token is taken from (candidate-probability answers read it; no second pass).

        On CUDA the steps replay a CUDA graph of :meth:`step` captured for the batch shape (once, on the first
        call with that shape), as mamba_ssm's ``generate(cg=True)`` does; the prefill's states, after whatever
        the hook cut, are copied into the graph's static states first. The tokens are those of the step-by-step
        loop, which runs instead when :attr:`cuda_graph` is False.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        eos = self.config.eos_token_id if eos_token_id == -1 else eos_token_id
        pad = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)
        timed = timings is not None
        if timed:
            ref = inputs_embeds if inputs_embeds is not None else input_ids
            sync = _synchronizer(ref.device if isinstance(ref, torch.Tensor) else None)
            sync()
            t0 = time.perf_counter()
        out = self.forward(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           is_visual=is_visual, hook=hook, use_cache=True)
        if timed:
            sync()
            timings["prefill_s"] = time.perf_counter() - t0
            timings["decode_s"] = []
            timings["tokens_per_layer"] = list(out.tokens_per_layer)
            timings["method_s"] = float(getattr(hook, "method_seconds", 0.0) or 0.0)
        if first_logits is not None:
            first_logits.append(out.logits.float())
        token = self._next_token(out.logits, do_sample, temperature, top_p, generator)
        decode = None
        done = torch.zeros_like(token, dtype=torch.bool)
        tokens = []
        for i in range(max_new_tokens):
            token = token.masked_fill(done, pad)
            tokens.append(token)
            if eos is not None:
                done = done | (token == eos)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            if decode is None:                      # a graph is captured here, outside the timed steps
                decode = self._decoder(out.cache)
            if timed:
                sync()
                t0 = time.perf_counter()
            logits = decode(token)
            if timed:
                sync()
                timings["decode_s"].append(time.perf_counter() - t0)
            token = self._next_token(logits, do_sample, temperature, top_p, generator)
        return torch.stack(tokens, dim=1)

