"""The Mamba-2 mixer (Dao & Gu 2024), with mamba_ssm's arithmetic and weight names, for the engine's layer loop.

Transcribed from ``mamba_ssm/modules/mamba2.py`` (class ``Mamba2``). Per token, ``in_proj`` gives
``[z0, x0, z, xBC, dt]`` (lines 210-215; ``z0, x0`` only when ``d_ssm < d_inner``, a gated MLP ``silu(z0) * x0``
beside the SSM, line 272); ``xBC`` goes through the depthwise causal conv and SiLU (lines 236-242) and is split
into ``x`` (nheads heads of headdim), ``B`` and ``C`` (ngroups groups of d_state, line 243); the SSD scan
(:func:`mambaprune.ssm.ssd.ssd_scan`) runs with ``A = -exp(A_log)`` per head, Δ = ``softplus(dt + dt_bias)``
clamped to ``dt_limit``, and the skip ``D`` (per head, or per channel with ``D_has_hdim``); then the gated RMSNorm
per group of channels (:class:`RMSNormGated`) and ``out_proj``.

Weight names (the same in mamba_ssm and transformers' ``Mamba2ForCausalLM``): ``in_proj``, ``conv1d``,
``dt_bias``, ``A_log``, ``D``, ``norm.weight``, ``out_proj``.

Where transformers' ``Mamba2Mixer`` (5.x, ``torch_forward`` path) differs, this module follows mamba_ssm: the gated
norm multiplies by its weight in fp32 before the one cast (transformers casts first), and ``norm_before_gate``,
``D_has_hdim``, ``d_ssm < d_inner`` and ``rmsnorm=False`` are supported (transformers has none of them; it always
gates before the norm). The gated norm's epsilon is the model's ``rms_norm_eps`` (1e-5, mamba_ssm's fixed value,
in every released checkpoint; transformers uses its ``layer_norm_epsilon``, the same number).

This module does not import :mod:`mambaprune.models.mamba_lm` (which imports it): the config is read by
attribute, and a prefill stores its states with ``cache.set_layer``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssm.conv import causal_conv1d, causal_conv1d_final_state, causal_conv1d_update
from ..ssm.ssd import prefill_chunk_size, ssd_scan, ssd_state_update, time_step


class RMSNormGated(nn.Module):
    """mamba_ssm's gated RMSNorm (``ops/triton/layernorm_gated.py``, ``rms_norm_ref`` and the forward kernel).

    With a gate z: ``norm(x * silu(z))`` when ``norm_before_gate`` is False (Mamba-2's default), else
    ``norm(x) * silu(z)``. The RMS is taken over groups of ``group_size`` channels (``d_ssm / ngroups`` in
    Mamba-2), all in fp32, times the weight in fp32; the result is cast once to x's dtype.
    """

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False):
        super().__init__()
        self.eps = eps
        self.group_size = d if group_size is None else group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        if z is not None and not self.norm_before_gate:
            xf = xf * F.silu(z.float())
        groups = xf.unflatten(-1, (-1, self.group_size))
        out = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        out = out * self.weight.float()
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(dtype)


@dataclass
class SSDInputs:
    """What a Mamba-2 layer computes from its input before the scan (:meth:`Mamba2Mixer.ssd_inputs`).

    Shapes for an input (batch, L, d_model); ``nheads = d_ssm / headdim``, each group of
    ``nheads / ngroups`` consecutive heads shares one B and one C.

    * ``z0, x0``: (batch, L, d_inner - d_ssm) the gated-MLP halves (empty when d_ssm = d_inner);
    * ``z``: (batch, L, d_ssm) the gate of the norm;
    * ``xBC``: (batch, L, conv_dim) the conv input (``conv_dim = d_ssm + 2 ngroups d_state``), zero at padding;
    * ``x``: (batch, L, nheads, headdim) fp32, the SSM input after conv and SiLU (zero at padding);
    * ``delta``: (batch, L, nheads) fp32, Δ = clamp(softplus(dt + dt_bias), *dt_limit) per head (0 at padding);
    * ``A``: (nheads,) fp32, ``-exp(A_log)``, the decay rate of each head (``exp(Δ A)`` per step);
    * ``B``, ``C``: (batch, L, ngroups, d_state) fp32.
    """

    z0: torch.Tensor
    x0: torch.Tensor
    z: torch.Tensor
    xBC: torch.Tensor
    x: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block's mixer, with :class:`~mambaprune.models.mamba_lm.MambaMixer`'s interface."""

    def __init__(self, config):
        super().__init__()
        d, di = config.d_model, config.d_inner
        self.d_ssm = di if config.d_ssm is None else config.d_ssm
        self.d_mlp = di - self.d_ssm
        self.headdim, self.ngroups = config.headdim, config.ngroups
        self.d_state, self.d_conv = config.d_state, config.d_conv
        self.nheads = self.d_ssm // self.headdim
        self.chunk_size, self.dt_limit = config.chunk_size, tuple(config.dt_limit)
        self.D_has_hdim, self.rmsnorm = config.D_has_hdim, config.rmsnorm
        self.conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        # in_proj order [z0, x0, z, xBC, dt] (mamba2.py, lines 95-96 and 210-215)
        self.in_proj = nn.Linear(d, 2 * di + 2 * self.ngroups * self.d_state + self.nheads, bias=config.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=config.d_conv, groups=self.conv_dim,
                                padding=config.d_conv - 1, bias=config.conv_bias)
        # deterministic defaults in mamba_ssm's ranges: Δ from 1e-3 to 1e-1 (inverse softplus), A from 1 to nheads
        dt = torch.logspace(-3, -1, self.nheads)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.nheads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.d_ssm if self.D_has_hdim else self.nheads))
        if self.rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=config.rms_norm_eps, group_size=self.d_ssm // self.ngroups,
                                     norm_before_gate=config.norm_before_gate)
        self.out_proj = nn.Linear(di, d, bias=config.bias)

    # ------------------------------------------------------------------ pieces shared by prefill and decoding
    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    def _skip(self) -> torch.Tensor:
        """D as (nheads, headdim) or (nheads,), as mamba2.py passes it to the scan (line 251)."""
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _output(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """fp32 SSD output y (..., d_ssm) -> out_proj(...). Without the norm, the gate is applied in fp32 before
        the cast, as the scan kernel does with its ``z``; with it, y is first rounded to the model's dtype (the
        dtype the scan writes, mamba2.py line 244) and the gated norm follows (line 270). The gated MLP part is
        concatenated in front (line 272)."""
        if self.rmsnorm:
            y = self.norm(y.to(z.dtype), z)
        else:
            y = (y * F.silu(z.float())).to(z.dtype)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    # ------------------------------------------------------------------ prefill
    def ssd_inputs(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> SSDInputs:
        """The scan's inputs for a normalised layer input x (batch, L, d_model); see :class:`SSDInputs`.

        The forward pass and the analyses read them from here. Padding (``mask`` False) gets a zero conv input,
        a zero SSM input and Δ = 0, so it leaves the conv and SSM states untouched.
        """
        b, L, _ = x.shape
        z0, x0, z, xBC, dt = self._split(self.in_proj(x))
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        conv = causal_conv1d(xBC, self.conv1d.weight[:, 0, :], self.conv1d.bias, activation="silu")
        xs, B, C = torch.split(conv, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        delta = time_step(dt, self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)      # (b, L, nheads) fp32
        xs = xs.float().view(b, L, self.nheads, self.headdim)
        if mask is not None:
            delta = delta * mask[..., None]
            xs = xs * mask[..., None, None]
        return SSDInputs(z0=z0, x0=x0, z=z, xBC=xBC, x=xs, delta=delta, A=-torch.exp(self.A_log.float()),
                         B=B.float().view(b, L, self.ngroups, self.d_state),
                         C=C.float().view(b, L, self.ngroups, self.d_state))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, want_signals: bool = False,
                cache=None, layer_idx: int = 0):
        """x (batch, L, d_model) normalised input -> (output (batch, L, d_model), signals dict).

        Signals (see TokenSequence.signals), from tensors this pass computes anyway: ``delta`` = Δ averaged over
        heads (every head has headdim channels, so this is the mean over the d_ssm channels, DTP Eq. 6), ``B`` /
        ``C`` averaged over groups and d_state, ``y`` = the mean over channels of the SSD output plus ``D x``,
        before the gated norm. ``cache`` (a ``MambaCache``) receives the conv state (batch, conv_dim, d_conv) and
        the SSM state (batch, nheads, headdim, d_state) in ``cache.state_dtype``. The scan's chunk is
        :func:`~mambaprune.ssm.ssd.prefill_chunk_size` of the config's.
        """
        inp = self.ssd_inputs(x, mask)
        chunk = prefill_chunk_size(self.chunk_size, inp.x.device)
        y, last_state = ssd_scan(inp.x, inp.delta, inp.A, inp.B, inp.C, chunk, D=self._skip(),
                                 return_final_states=True)                       # (b, L, nheads, headdim) fp32
        signals = {}
        if want_signals:
            signals = {"delta": inp.delta.mean(-1), "B": inp.B.mean((-2, -1)), "C": inp.C.mean((-2, -1)),
                       "y": y.mean((-2, -1))}
        if cache is not None:
            cache.set_layer(layer_idx, causal_conv1d_final_state(inp.xBC, self.d_conv),
                            last_state.to(cache.state_dtype or inp.xBC.dtype))
        return self._output(y.flatten(-2), inp.z, inp.z0, inp.x0), signals

    # ------------------------------------------------------------------ decoding
    def step(self, x: torch.Tensor, state) -> torch.Tensor:
        """One decoding step: x (batch, d_model) -> (batch, d_model); ``state`` (a ``LayerCache``) is updated in
        place (mamba2.py ``step``, lines 278-343, with the same Δ as the prefill, ``dt_limit`` included)."""
        b = x.shape[0]
        z0, x0, z, xBC, dt = self._split(self.in_proj(x))
        xBC = causal_conv1d_update(xBC, state.conv_state, self.conv1d.weight[:, 0, :], self.conv1d.bias,
                                   activation="silu")
        xs, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = ssd_state_update(state.ssm_state, xs.view(b, self.nheads, self.headdim), dt,
                             -torch.exp(self.A_log.float()), B.view(b, self.ngroups, self.d_state),
                             C.view(b, self.ngroups, self.d_state), D=self._skip(), dt_bias=self.dt_bias,
                             dt_softplus=True, dt_limit=self.dt_limit)
        return self._output(y.flatten(-2), z, z0, x0)
