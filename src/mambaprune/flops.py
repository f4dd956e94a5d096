"""Theoretical cost of a Mamba LM, counted from per-layer token counts, under one stated convention.

Convention: multiply-adds ("MACs"). The DTP paper prints these multiply-adds under the name "FLOPs" (2.01 for
Cobra), and so do this project's tables and ``summary.json`` (``flops``); multiply by 2 for FLOPs in the strict
sense (one multiply + one add each, DOP's convention). A lone multiply (a decay, a gate) counts as one.

**Mamba-1 layer**, per token:

* in_proj ``2*d_model*d_inner``, depthwise conv ``d_conv*d_inner``, x_proj ``d_inner*(dt_rank + 2*d_state)``,
  dt_proj ``dt_rank*d_inner``, out_proj ``d_inner*d_model``;
* the selective scan as the VMamba counter counts it, ``9*d_inner*d_state``, plus ``d_inner`` each for the
  D skip and the silu(z) gate.

**Mamba-2 layer** (mamba_ssm ``modules/mamba2.py``; ``nheads = d_ssm / headdim``, ``d_ssm = d_inner`` unless
set), per token:

* in_proj ``d_model*(2*d_inner + 2*ngroups*d_state + nheads)`` (the width of lines 95-96: ``z``, ``x`` (with the
  gated-MLP halves ``z0, x0`` when ``d_ssm < d_inner``), ``B``, ``C`` and one Δ per head);
* depthwise conv ``d_conv*conv_dim`` over ``conv_dim = d_ssm + 2*ngroups*d_state`` (line 104);
* the SSD scan counted in its recurrent form, one token at a time (``Mamba2.step``, lines 311-319), per head:
  the decay ``exp(Δ A)`` (1), ``Δ x`` (headdim), the state update ``h <- exp(Δ A) h + (Δ x) B^T`` (headdim*d_state
  for the decay's scaling, headdim*d_state multiply-adds for the input term) and
  the output ``y = h C`` (headdim*d_state): ``3*d_ssm*d_state + d_ssm + nheads`` in all. This is what the
  recurrence costs; the chunked algorithm a prefill runs (:func:`mambaprune.ssm.ssd.ssd_scan`) does more work
  inside each chunk (a quadratic intra-chunk term) to use matrix products, an implementation detail that, like
  the kernel choice of Mamba-1's scan, is not counted. VMamba's ``9*d_inner*d_state`` is a Mamba-1 count
  (a decay and an input term per channel *and state*); Mamba-2's decay is one scalar per head, hence the
  smaller constant.
* the D skip ``d_ssm``, the gates ``d_inner`` (silu(z) on the d_ssm SSM channels, silu(z0) on the gated-MLP
  channels), out_proj ``d_inner*d_model``.

**Both**: norms (for Mamba-2's gated RMSNorm: the normalisation and its weight; its gate is counted above),
activations, softplus, the Δ bias and the embedding lookup are not counted; the LM head is counted for the
positions whose logits are computed (``d_model * vocab`` each; one position in a prefill).
:func:`layer_macs_breakdown` picks the counting function by the config's ``layer`` kind
(:data:`LAYER_MACS`).

The vision tower and projector of a multimodal model are not part of this count (the DTP paper's
convention: its "FLOPs" of Cobra, 2.01 T for ~750 tokens, are these multiply-adds of the LLM alone); they
are reported separately with :func:`module_macs`, which counts them with ``torch.utils.flop_counter``.
A pruning method changes only the per-layer token counts, so its cost is :func:`lm_macs` of the counts its
run reports (``MambaOutput.tokens_per_layer``), or, before running, of ``pruner.expected_tokens(...)``.
"""
from __future__ import annotations

from typing import Sequence

import torch


def mamba1_layer_macs(config) -> dict[str, int]:
    """Multiply-adds of one Mamba-1 layer for one token, per component (see module docstring)."""
    d, di, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv
    return {"in_proj": 2 * d * di, "conv": k * di, "x_proj": di * (r + 2 * n), "dt_proj": r * di,
            "scan": 9 * di * n, "skip_and_gate": 2 * di, "out_proj": di * d}


def mamba2_layer_macs(config) -> dict[str, int]:
    """Multiply-adds of one Mamba-2 layer for one token, per component (see module docstring)."""
    d, di, n, k, g = config.d_model, config.d_inner, config.d_state, config.d_conv, config.ngroups
    d_ssm = di if config.d_ssm is None else config.d_ssm
    nheads = d_ssm // config.headdim
    return {"in_proj": d * (2 * di + 2 * g * n + nheads), "conv": k * (d_ssm + 2 * g * n),
            "scan": 3 * d_ssm * n + d_ssm + nheads, "skip_and_gate": d_ssm + di, "out_proj": di * d}


#: The counting function of each layer kind (``MambaConfig.layer``).
LAYER_MACS = {"Mamba1": mamba1_layer_macs, "Mamba2": mamba2_layer_macs}


def layer_macs_breakdown(config) -> dict[str, int]:
    """Multiply-adds of one layer for one token, per component, for the config's layer kind (``config.layer``,
    Mamba-1 when the config has none; see module docstring)."""
    kind = getattr(config, "layer", "Mamba1")
    if kind not in LAYER_MACS:
        raise ValueError(f"no FLOPs count for layer kind {kind!r}; known: {', '.join(LAYER_MACS)}")
    return LAYER_MACS[kind](config)


def layer_macs_per_token(config) -> int:
    """Multiply-adds of one layer for one token (the sum of :func:`layer_macs_breakdown`)."""
    return sum(layer_macs_breakdown(config).values())


def head_macs(config, positions: int = 1) -> int:
    """The LM head for ``positions`` positions (the padded vocabulary, as the weight has it)."""
    return positions * config.d_model * config.padded_vocab_size


def lm_macs(config, tokens_per_layer: Sequence[int], head_positions: int = 1) -> int:
    """Multiply-adds of a prefill in which layer ``l`` processed ``tokens_per_layer[l]`` tokens."""
    if len(tokens_per_layer) != config.n_layer:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries, the model has "
                         f"{config.n_layer} layers")
    if any(int(t) < 0 for t in tokens_per_layer):
        raise ValueError("tokens_per_layer must not hold negative counts")
    return layer_macs_per_token(config) * int(sum(tokens_per_layer)) + head_macs(config, head_positions)


def flops_ratio(config, tokens_per_layer: Sequence[int], baseline_tokens_per_layer: Sequence[int],
                head_positions: int = 1) -> float:
    """``lm_macs(run) / lm_macs(unpruned run)``."""
    return lm_macs(config, tokens_per_layer, head_positions) / lm_macs(config, baseline_tokens_per_layer,
                                                                       head_positions)


def module_macs(module: torch.nn.Module, *args, **kwargs) -> int:
    """Multiply-adds of one forward call of ``module`` (e.g. a vision tower or projector), as
    ``torch.utils.flop_counter`` counts them (matrix products and convolutions, attention included) / 2."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    return counter.get_total_flops() // 2


def expected_macs(pruner, config, n_visual: int, n_text: int) -> int:
    """LM multiply-adds a pruner will cost on one sample with ``n_visual`` + ``n_text`` tokens."""
    return lm_macs(config, pruner.expected_tokens(config.n_layer, n_visual, n_text))


def match_flops(method: str, target_ratio: float, config, n_visual: int, n_text: int, param: str | None = None,
                **fixed) -> tuple[float | int, float]:
    """The value of one parameter of ``method`` whose FLOPs ratio comes closest to ``target_ratio``.

    ``param`` defaults to ``keep_ratio`` when the method has one (every achievable kept count ``c/n_visual`` is
    tried) and to ``layer`` otherwise (every layer is tried); other parameters are held at ``fixed`` (or their
    defaults). Ties go to the larger value (the milder pruning). Returns ``(value, achieved_ratio)``, so methods
    can be compared at matched cost as in the DTP paper's Table 1 (about 70% and about 50%).
    """
    from .pruning import build, method_params

    if not 0.0 < target_ratio <= 1.0:
        raise ValueError(f"target_ratio must be in (0, 1], got {target_ratio}")
    known = method_params(method)
    if param is None:
        param = "keep_ratio" if "keep_ratio" in known else "layer"
    if param not in known:
        raise ValueError(f"method {method!r} has no parameter {param!r}")
    if param == "keep_ratio":
        if n_visual < 1:
            raise ValueError("matching a keep_ratio needs n_visual >= 1")
        values = [c / n_visual for c in range(n_visual + 1)]
    else:
        values = list(range(config.n_layer + 1))
    base = lm_macs(config, [n_visual + n_text] * config.n_layer)
    best = None
    for v in values:
        try:
            pruner = build(method, **{**fixed, param: v})
            pruner.start(config)                                     # the layer checks a run makes
            ratio = expected_macs(pruner, config, n_visual, n_text) / base
        except ValueError:
            continue                                                 # a value this method does not admit
        key = (abs(ratio - target_ratio), -v)
        if best is None or key < best[0]:
            best = (key, v, ratio)
    if best is None:
        raise ValueError(f"no admissible value of {param!r} for method {method!r}")
    return best[1], best[2]
