"""The bidirectional Mamba-2 stack of ML-Mamba's connector, as the released ``mamba_ssm`` fork runs it.

ML-Mamba (Huang et al., 2024; code ``WenjunHuang94/ML-Mamba``) puts ``Bidirectional_Mamba`` of its mamba_ssm fork
(``WenjunHuang94/mamba``) between the visual features and the LLM (the paper's "Mamba-2 Scan Connector"). What
the fork computes, and what is reproduced here:

* **Stack** (``mamba_ssm/models/mixer_seq_simple.py``, ``Bidirectional_Mamba``, lines 232-316): built from the
  LLM's mamba_ssm config (``state-spaces/mamba2-2.7b``: d_model 2560, ``ssm_cfg={"layer": "Mamba2"}``,
  ``d_intermediate=0``) but with two layers (line 242), each a block with ``bimamba_type="v2"``, then
  ``norm_f = nn.LayerNorm(d_model)`` (line 288: default eps 1e-5, with a bias). The residual stream of the LLM's
  blocks is not used: each block returns its new hidden state.
* **Block** (``mamba_ssm/modules/block.py``, ``Block`` with ``bimamba_type="v2"`` and ``d_intermediate=0``,
  lines 61-64 and 92-96): ``h = h + mixer(h)`` with *no* norm in front of the mixer, then
  ``h = h + mlp(norm(h))`` where ``norm`` is an ``nn.LayerNorm(d_model)`` (it replaces the RMSNorm the block
  first builds) and ``mlp`` the SwiGLU ``w3(silu(w1 h) * w2 h)`` (three ``Linear(d_model, d_model)`` with biases;
  its optional inner LayerNorm is off). Drop-path is 0 for both layers (``torch.linspace(0, 0.1, 2)`` shifted by
  one entry, line 254), and off at inference anyway.
* **Mixer** (``mamba_ssm/modules/mamba2.py``, ``Mamba2`` with ``bimamba_type="v2"``, lines 139-157 and 202-245,
  the path taken without an inference cache, ``use_mem_eff_path``): one ``in_proj`` gives ``[z, xBC, dt]``
  (Mamba-2 defaults: d_state 128, d_conv 4, expand 2, headdim 64, ngroups 1, no ``in_proj``/``out_proj`` bias,
  conv bias). The forward direction is Mamba-2's SSD (Dao & Gu 2024, Eq. (1) with a scalar ``A`` per head):
  conv ``conv1d`` + SiLU, scan with ``dt_bias``, ``A_log``, ``D``, then the gated RMSNorm ``norm(y * silu(z))``
  (``norm_before_gate=False``, groups of ``d_inner / ngroups``, eps 1e-5). The backward direction runs the same
  on the whole ``in_proj`` output flipped in time (line 224), with its own ``conv1d_b``, ``dt_bias_b``,
  ``A_log_b`` and ``D_b`` but the *shared* gated norm, and is flipped back. Both directions are averaged,
  ``out_proj((y_fwd + y_bwd) / 2)`` (line 243), always: the ``if_devide_out`` flag the block passes is stored by
  ``Mamba2`` and never read.

Weight names are the fork's (``layers.{i}.norm``, ``layers.{i}.mixer.{in_proj, conv1d, conv1d_b, dt_bias,
dt_bias_b, A_log, A_log_b, D, D_b, norm, out_proj}``, ``layers.{i}.mlp.{w1, w2, w3}``, ``norm_f``), so a saved
``bidirectional_mamba`` state dict loads as it is (:func:`bidirectional_mamba2_from_state`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssm.conv import causal_conv1d
from ..ssm.ssd import prefill_chunk_size, ssd_scan
from .checkpoints import CheckpointError, layer_count, load_state_checked, mamba2_config_from_mixer
from .mamba2 import Mamba2Mixer
from .mamba_lm import MambaConfig


def bimamba2_config(d_model: int = 2560, **fields) -> MambaConfig:
    """The config ``Bidirectional_Mamba`` is built from: the LLM's mamba_ssm config (``state-spaces/mamba2-2.7b``:
    ``ssm_cfg={"layer": "Mamba2"}``, so ``Mamba2``'s defaults d_state 128, d_conv 4, expand 2, headdim 64,
    ngroups 1, chunk 256; vocabulary 50277 padded to 16, unused here) with two layers; ``fields`` override."""
    return MambaConfig(**{"layer": "Mamba2", "d_model": d_model, "n_layer": 2, "d_state": 128, "vocab_size": 50277,
                          "pad_vocab_size_multiple": 16, **fields})


class BiMamba2Mixer(Mamba2Mixer):
    """``Mamba2(bimamba_type="v2")``: a forward and a time-reversed SSD scan sharing ``in_proj``, the gated norm and
    ``out_proj``, averaged (see the module docstring). The forward direction's tensors and the shared ones are
    :class:`~mambaprune.models.mamba2.Mamba2Mixer`'s; ``conv1d_b``, ``dt_bias_b``, ``A_log_b``, ``D_b`` are the
    backward direction's, initialised as copies (as the fork does)."""

    def __init__(self, config: MambaConfig):
        super().__init__(config)
        if self.d_mlp or not self.rmsnorm:
            raise ValueError("the bidirectional Mamba-2 mixer is built with its SSM on all channels (d_ssm = d_inner) "
                             "and the gated RMSNorm, as the released model")
        self.conv1d_b = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=config.d_conv, groups=self.conv_dim,
                                  padding=config.d_conv - 1, bias=config.conv_bias)
        with torch.no_grad():
            self.conv1d_b.load_state_dict(self.conv1d.state_dict())
        self.dt_bias_b = nn.Parameter(self.dt_bias.detach().clone())
        self.A_log_b = nn.Parameter(self.A_log.detach().clone())
        self.D_b = nn.Parameter(self.D.detach().clone())

    def direction(self, z: torch.Tensor, xBC: torch.Tensor, dt: torch.Tensor, backward: bool) -> torch.Tensor:
        """One direction, in its own time order: conv + SiLU, the SSD scan with Δ = softplus(dt + dt_bias) clamped
        to dt_limit and the skip D, then the shared gated norm; (batch, L, d_inner) in the input's dtype (the scan
        output is rounded to it first, as the fused kernel writes it)."""
        suffix = "_b" if backward else ""
        conv = getattr(self, "conv1d" + suffix)
        xBC = causal_conv1d(xBC, conv.weight[:, 0, :], conv.bias, activation="silu")
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        D = getattr(self, "D" + suffix)
        A = -torch.exp(getattr(self, "A_log" + suffix).float())
        y = ssd_scan(x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
                     B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
                     prefill_chunk_size(self.chunk_size, x.device),
                     D=D.view(self.nheads, self.headdim) if self.D_has_hdim else D,
                     dt_bias=getattr(self, "dt_bias" + suffix), dt_softplus=True, dt_limit=self.dt_limit)
        return self.norm(y.flatten(-2).to(z.dtype), z)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model): ``out_proj((fwd + flip(bwd(flip(in_proj u)))) / 2)``."""
        _, _, z, xBC, dt = self._split(self.in_proj(u))
        forward = self.direction(z, xBC, dt, backward=False)
        backward = self.direction(z.flip(1), xBC.flip(1), dt.flip(1), backward=True).flip(1)
        return self.out_proj((forward + backward) / 2)

    def step(self, x, state):
        raise NotImplementedError("the bidirectional Mamba-2 mixer reads the whole sequence; it has no one-token step")


class SwiGLU(nn.Module):
    """The block MLP of ``bimamba_type="v2"``: ``w3(silu(w1 x) * w2 x)``, all three ``Linear(d, d)`` with bias."""

    def __init__(self, d: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class BiMamba2Block(nn.Module):
    """``h + mixer(h)`` (no norm before the mixer), then ``+ mlp(norm(h))`` with a LayerNorm."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model)
        self.mixer = BiMamba2Mixer(config)
        self.mlp = SwiGLU(config.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.mixer(hidden)
        return hidden + self.mlp(self.norm(hidden))


class BidirectionalMamba2(nn.Module):
    """``Bidirectional_Mamba``: ``config.n_layer`` (2) bidirectional blocks, then a LayerNorm;
    (batch, L, d_model) -> (batch, L, d_model)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        if config.layer != "Mamba2":
            raise ValueError(f"BidirectionalMamba2 is built from a Mamba-2 config, got layer={config.layer!r}")
        self.config = config
        self.layers = nn.ModuleList(BiMamba2Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return self.norm_f(hidden)


def bidirectional_mamba2_from_state(state: dict[str, torch.Tensor], source: str, *,
                                    ngroups: int = 1) -> BidirectionalMamba2:
    """A :class:`BidirectionalMamba2` holding ``state`` (the fork's names), its shape read from the tensors
    (:func:`~mambaprune.models.checkpoints.mamba2_config_from_mixer` on layer 0's mixer; ``ngroups``: the
    released 1); a missing, unexpected or mis-shaped key raises :class:`CheckpointError` naming it."""
    config = mamba2_config_from_mixer(state, "layers.0.mixer.", source, ngroups=ngroups,
                                      n_layer=layer_count(state, "layers.", source))
    try:
        module = BidirectionalMamba2(config)
    except ValueError as e:
        raise CheckpointError(f"cannot load {source}: {e}") from e
    load_state_checked(module, state, source)
    return module
