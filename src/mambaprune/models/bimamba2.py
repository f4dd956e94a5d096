"""The bidirectional Mamba-2 stack of ML-Mamba's connector, as the released ``mamba_ssm`` fork runs it.

ML-Mamba (Huang et al., 2024; code ``WenjunHuang94/ML-Mamba``) puts ``Bidirectional_Mamba`` of its mamba_ssm fork
(``WenjunHuang94/mamba``) between the visual features and the LLM (the paper's "Mamba-2 Scan Connector"). What
the fork computes, and what is reproduced here:

* **Stack** (``mamba_ssm/models/mixer_seq_simple.py``, ``Bidirectional_Mamba``): built from the LLM's mamba_ssm
  config (``state-spaces/mamba2-2.7b``: d_model 2560, ``ssm_cfg={"layer": "Mamba2"}``, ``d_intermediate=0``)
  but with two layers, each a block with ``bimamba_type="v2"``, then ``norm_f = nn.LayerNorm(d_model)``
  (default eps 1e-5, with a bias). The residual stream of the LLM's blocks is not used: each block returns its
  new hidden state.
* **Block** (``mamba_ssm/modules/block.py``, ``Block`` with ``bimamba_type="v2"`` and ``d_intermediate=0``):
  ``h = h + mixer(h)`` with *no* norm in front of the mixer, then ``h = h + mlp(norm(h))`` where ``norm`` is an
  ``nn.LayerNorm(d_model)`` (it replaces the RMSNorm the block first builds) and ``mlp`` the SwiGLU
  ``w3(silu(w1 h) * w2 h)`` (three ``Linear(d_model, d_model)`` with biases; its optional inner LayerNorm is off).
  Drop-path is 0 for both layers (``torch.linspace(0, 0.1, 2)`` shifted by one entry), and off at inference anyway.
* **Mixer** (``mamba_ssm/modules/mamba2.py``, ``Mamba2`` with ``bimamba_type="v2"``; the path taken without an
  inference cache, ``use_mem_eff_path``): one ``in_proj`` gives ``[z, xBC, dt]`` (Mamba-2 defaults: d_state 128,
  d_conv 4, expand 2, headdim 64, ngroups 1, no ``in_proj``/``out_proj`` bias, conv bias). The forward direction
  is Mamba-2's SSD (Dao & Gu 2024, Eq. (1) with a scalar ``A`` per head): conv ``conv1d`` + SiLU, scan with
  ``dt_bias``, ``A_log``, ``D``, then the gated RMSNorm ``norm(y * silu(z))`` (``norm_before_gate=False``, groups
  of ``d_inner / ngroups``, eps 1e-5). The backward direction runs the same on the whole ``in_proj`` output
  flipped in time, with its own ``conv1d_b``, ``dt_bias_b``, ``A_log_b`` and ``D_b`` but the *shared* gated norm,
  and is flipped back. Both directions are averaged, ``out_proj((y_fwd + y_bwd) / 2)``, always: the
  ``if_devide_out`` flag the block passes is stored by ``Mamba2`` and never read.

Weight names are the fork's (``layers.{i}.norm``, ``layers.{i}.mixer.{in_proj, conv1d, conv1d_b, dt_bias,
dt_bias_b, A_log, A_log_b, D, D_b, norm, out_proj}``, ``layers.{i}.mlp.{w1, w2, w3}``, ``norm_f``), so a saved
``bidirectional_mamba`` state dict loads as it is (:func:`bidirectional_mamba2_from_state`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssm.conv import causal_conv1d
from ..ssm.ssd import ssd_scan
from .checkpoints import CheckpointError, load_state_checked


@dataclass(frozen=True)
class BiMamba2Config:
    """Shape of a ``Bidirectional_Mamba``: Mamba-2's mixer hyper-parameters (``mamba_ssm.modules.mamba2.Mamba2``'s
    defaults, which ``state-spaces/mamba2-2.7b``'s ``ssm_cfg`` leaves as they are) and two layers."""

    d_model: int = 2560
    n_layer: int = 2
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("d_model", "n_layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BiMamba2Config.{name} must be a positive integer, got {value!r}")
        if self.d_inner % self.headdim:
            raise ValueError(f"BiMamba2Config: d_inner {self.d_inner} is not a multiple of headdim {self.headdim}")
        if self.nheads % self.ngroups:
            raise ValueError(f"BiMamba2Config: {self.nheads} heads do not split into {self.ngroups} groups")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state


class GatedRMSNorm(nn.Module):
    """mamba_ssm's ``layernorm_gated.RMSNorm`` with ``norm_before_gate=False``: ``g = x * silu(z)``, then each group
    of ``group_size`` channels ``g / sqrt(mean(g^2) + eps) * weight``, in fp32, returned in ``x``'s dtype."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if d % group_size:
            raise ValueError(f"GatedRMSNorm: {d} channels do not split into groups of {group_size}")
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = x.float() * F.silu(z.float())
        grouped = g.unflatten(-1, (-1, self.group_size))
        g = (grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (g * self.weight.float()).to(x.dtype)


class BiMamba2Mixer(nn.Module):
    """``Mamba2(bimamba_type="v2")``: a forward and a time-reversed SSD scan sharing ``in_proj``, the gated norm and
    ``out_proj``, averaged (see the module docstring)."""

    def __init__(self, config: BiMamba2Config):
        super().__init__()
        c = config
        self.config = c
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads, bias=c.bias)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(c.conv_dim, c.conv_dim, kernel_size=c.d_conv, groups=c.conv_dim,
                                                       padding=c.d_conv - 1, bias=c.conv_bias))
            self.register_parameter("dt_bias" + suffix, nn.Parameter(torch.zeros(c.nheads)))
            self.register_parameter("A_log" + suffix, nn.Parameter(torch.zeros(c.nheads)))
            self.register_parameter("D" + suffix, nn.Parameter(torch.ones(c.nheads)))
        self.norm = GatedRMSNorm(c.d_inner, c.d_inner // c.ngroups, c.norm_eps)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)

    def direction(self, z, xBC, dt, backward: bool) -> torch.Tensor:
        """One direction in its own time order: conv + SiLU, SSD scan, gated norm; (batch, L, d_inner)."""
        c, suffix = self.config, "_b" if backward else ""
        conv = getattr(self, "conv1d" + suffix)
        xBC = causal_conv1d(xBC, conv.weight[:, 0, :], conv.bias, activation="silu")
        x, B, C = torch.split(xBC, [c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        A = -torch.exp(getattr(self, "A_log" + suffix).float())
        y = ssd_scan(x.unflatten(-1, (c.nheads, c.headdim)), dt, A, B.unflatten(-1, (c.ngroups, c.d_state)),
                     C.unflatten(-1, (c.ngroups, c.d_state)), c.chunk_size, D=getattr(self, "D" + suffix),
                     dt_bias=getattr(self, "dt_bias" + suffix), dt_softplus=True)
        return self.norm(y.flatten(-2).to(x.dtype), z)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        c = self.config
        z, xBC, dt = torch.split(self.in_proj(u), [c.d_inner, c.conv_dim, c.nheads], dim=-1)
        forward = self.direction(z, xBC, dt, backward=False)
        backward = self.direction(z.flip(1), xBC.flip(1), dt.flip(1), backward=True).flip(1)
        return self.out_proj((forward + backward) / 2)


class SwiGLU(nn.Module):
    """The block MLP of ``bimamba_type="v2"``: ``w3(silu(w1 x) * w2 x)``, all three ``Linear(d, d)`` with bias."""

    def __init__(self, d: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class BiMamba2Block(nn.Module):
    """``h + mixer(h)`` (no norm before the mixer), then ``+ mlp(norm(h))`` with a LayerNorm."""

    def __init__(self, config: BiMamba2Config):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model)
        self.mixer = BiMamba2Mixer(config)
        self.mlp = SwiGLU(config.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.mixer(hidden)
        return hidden + self.mlp(self.norm(hidden))


class BidirectionalMamba2(nn.Module):
    """``Bidirectional_Mamba``: ``n_layer`` (2) bidirectional blocks, then a LayerNorm; (b, L, d) -> (b, L, d)."""

    def __init__(self, config: BiMamba2Config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(BiMamba2Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return self.norm_f(hidden)


def bimamba2_config_from_state(state: dict[str, torch.Tensor], source: str, *, ngroups: int = 1,
                               chunk_size: int = 256) -> BiMamba2Config:
    """The :class:`BiMamba2Config` of a saved ``Bidirectional_Mamba`` state, read from the tensor shapes: width,
    depth, heads, head size, d_state, conv width and biases. ``ngroups`` cannot be read from the shapes (only
    ``ngroups * d_state`` can); the released model has Mamba-2's default 1."""
    def need(key):
        if key not in state:
            raise CheckpointError(f"cannot read the bidirectional Mamba-2's shape from {source}: missing key {key!r}")
        return state[key]

    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: the layers found are {layers[:10]}, expected 0..n-1")
    mixer = "layers.0.mixer."
    d_inner, d_model = need(mixer + "out_proj.weight").shape
    nheads = need(mixer + "A_log").shape[0]
    conv_dim, _, d_conv = need(mixer + "conv1d.weight").shape
    if nheads < 1 or d_inner % nheads or d_inner % d_model or (conv_dim - d_inner) % (2 * ngroups):
        raise CheckpointError(f"{source}: inconsistent shapes (out_proj {d_inner} x {d_model}, {nheads} heads, "
                              f"conv channels {conv_dim}, ngroups {ngroups})")
    try:
        return BiMamba2Config(d_model=d_model, n_layer=len(layers), d_state=(conv_dim - d_inner) // (2 * ngroups),
                              d_conv=d_conv, expand=d_inner // d_model, headdim=d_inner // nheads, ngroups=ngroups,
                              chunk_size=chunk_size, conv_bias=mixer + "conv1d.bias" in state,
                              bias=mixer + "in_proj.bias" in state)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def bidirectional_mamba2_from_state(state: dict[str, torch.Tensor], source: str, *,
                                    ngroups: int = 1) -> BidirectionalMamba2:
    """A :class:`BidirectionalMamba2` holding ``state`` (the fork's names), its shape read from the tensors; a
    missing, unexpected or mis-shaped key raises :class:`CheckpointError` naming it."""
    module = BidirectionalMamba2(bimamba2_config_from_state(state, source, ngroups=ngroups))
    load_state_checked(module, state, source)
    return module
