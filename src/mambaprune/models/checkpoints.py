"""Reading and writing Mamba LM checkpoints in the released layouts.

Two folder layouts are read, each with Mamba (v1) or Mamba-2 layers:

* transformers ``MambaForCausalLM``: ``config.json`` with ``hidden_size, num_hidden_layers, state_size,
  expand, conv_kernel, time_step_rank, vocab_size, layer_norm_epsilon`` and weights in ``model.safetensors``
  (or sharded ``model-*.safetensors`` with ``model.safetensors.index.json``) or ``pytorch_model.bin``;
  keys ``backbone.embeddings.weight``, ``backbone.layers.{i}.*``, ``backbone.norm_f.weight``, ``lm_head.weight``
  (absent when tied). ``Mamba2ForCausalLM`` (``model_type`` "mamba2"): the same files, with ``num_heads,
  head_dim, n_groups, chunk_size, time_step_limit``; it is read as transformers runs it (gate before the norm,
  D per head, the SSM on all channels), whatever other keys older configs hold.
* mamba_ssm (``state-spaces/mamba-*``, ``state-spaces/mamba2-*``): ``config.json`` with ``d_model, n_layer,
  vocab_size, ssm_cfg, rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple`` and
  ``pytorch_model.bin`` with keys ``backbone.embedding.weight`` ... and the padded vocabulary. ``ssm_cfg["layer"]``
  picks the layer kind ("Mamba1" by default, or "Mamba2", whose arguments, ``headdim, ngroups, ...``, are read
  from ``ssm_cfg`` with mamba_ssm's defaults, ``d_state`` 128 included).

Other layer kinds, attention layers and MLPs (``d_intermediate > 0``) are a :class:`CheckpointError`.

The API: :func:`load_mamba_lm` (a folder of either layout), :func:`from_transformers_model` (an in-memory
transformers model) and :func:`save_mamba_lm` (transformers' layout, or mamba_ssm's for a Mamba-2 model with
options transformers lacks). This module depends on :mod:`mambaprune.models.mamba_lm`, never the reverse.

Pickled files are read with ``torch.load(weights_only=True)`` only. Every key is checked: a missing,
unexpected or mis-shaped tensor raises :class:`CheckpointError` naming it.

**Dtypes.** Loaded in a reduced precision (``dtype=torch.bfloat16``), each layout is put in the dtypes its own
loader gives (state-spaces/mamba and the released VLM code):

* mamba_ssm folders, as ``MambaLMHeadModel.from_pretrained(folder, dtype=...)``: every tensor in ``dtype``
  except ``A_log`` and ``D``, which stay fp32 with the file's values. ``Mamba.__init__`` creates them in fp32
  whatever the model's dtype (``modules/mamba_simple.py`` l.104-115) and ``load_state_dict_hf`` returns the
  file's tensors unconverted (``utils/hf.py`` l.18: the conversion after that ``return`` never runs), so
  ``load_state_dict`` copies the fp32 values into fp32 parameters.
* transformers folders, as ``MambaForCausalLM.from_pretrained(folder, torch_dtype=...)``: every tensor in
  ``dtype``, ``A_log`` and ``D`` included (transformers' Mamba keeps no module in fp32).
* Cobra and RoboMamba convert their whole model, ``A_log`` and ``D`` included, with one ``.to(device, dtype)``
  after loading (Cobra's evaluation: h-zhao1997/vlm-evaluation ``vlm_eval/models/cobra.py`` l.59-60,
  ``load_precision="bf16"``; RoboMamba: ``src/test.py`` l.409); so do ``load_cobra`` and ``load_robomamba``
  given a ``dtype``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Collection

import torch
import torch.nn as nn

from .errors import CheckpointError
from .mamba_lm import MambaConfig, MambaLM


# ---------------------------------------------------------------------------- files
def read_state_file(path) -> dict[str, torch.Tensor]:
    """Tensors of one ``.safetensors`` or pickled ``.bin``/``.pt`` file, with a clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # truncated, corrupted, or holding arbitrary pickled objects
        raise CheckpointError(f"cannot read checkpoint file {path}: it is truncated, corrupted or not a "
                              f"weights file ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a dict of tensors (got {type(state).__name__})")
    bad = [repr(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} holds entries that are not named tensors: {bad[:20]}")
    return state


def read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: single or sharded safetensors, else single or sharded .bin."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / single).is_file():
            return read_state_file(folder / single)
        if (folder / index_name).is_file():
            index = read_json(folder / index_name)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{folder / index_name} has no valid weight_map")
            shards = sorted(set(weight_map.values()))
            state = {}
            for shard in shards:
                part = read_state_file(folder / shard)
                twice = sorted(set(part) & set(state))
                if twice:
                    raise CheckpointError(f"{folder / shard} repeats keys of another shard: {twice[:20]}")
                state.update(part)
            return state
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or a "
                          f"sharded index")


def read_json(path: Path, folder_kind: str = "") -> dict:
    """A JSON file of a checkpoint folder; a missing or invalid one is a :class:`CheckpointError` naming it
    (``folder_kind``, e.g. "the Cobra run folder", says which folder it was missing from)."""
    path = Path(path)
    if not path.is_file():
        where = f"{folder_kind} {path.parent}" if folder_kind else str(path.parent)
        raise CheckpointError(f"missing {path.name} in {where}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


# ---------------------------------------------------------------------------- configs
#: transformers' ``model_type`` of each layer kind.
TRANSFORMERS_MODEL_TYPES = {"mamba": "Mamba1", "mamba2": "Mamba2"}
NO_DT_LIMIT = (0.0, float("inf"))
LAYOUTS = ("transformers", "mamba_ssm")


def _json_float(value) -> float:
    """A float of a config.json: a number, ``Infinity`` (Python's json) or transformers 5's
    ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: {value!r} is not a number") from e


def config_from_transformers(cfg: dict) -> MambaConfig:
    """MambaConfig from a transformers ``MambaConfig`` or ``Mamba2Config`` dict. transformers does not pad the
    vocabulary (``vocab_size`` is the embedding size) unless the folder was written by :func:`save_mamba_lm`."""
    kind = cfg.get("model_type") or "mamba"
    if kind not in TRANSFORMERS_MODEL_TYPES:
        raise CheckpointError(f"config.json has model_type {kind!r}; this loader reads "
                              f"{' and '.join(map(repr, TRANSFORMERS_MODEL_TYPES))}")
    ours = cfg.get("mambaprune") or {}
    if kind == "mamba2":
        return _mamba2_config_from_transformers(cfg, ours)
    return MambaConfig(
        d_model=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"],
        vocab_size=ours.get("vocab_size", cfg["vocab_size"]),
        d_state=cfg.get("state_size", 16), d_conv=cfg.get("conv_kernel", 4), expand=cfg.get("expand", 2),
        dt_rank=cfg.get("time_step_rank", "auto"),
        pad_vocab_size_multiple=ours.get("pad_vocab_size_multiple", 1),
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        residual_in_fp32=cfg.get("residual_in_fp32", True), conv_bias=cfg.get("use_conv_bias", True),
        bias=cfg.get("use_bias", False), eos_token_id=cfg.get("eos_token_id", 0),
        pad_token_id=cfg.get("pad_token_id", 0),
    )


def _mamba2_config_from_transformers(cfg: dict, ours: dict) -> MambaConfig:
    """A Mamba-2 MambaConfig from a transformers ``Mamba2Config`` dict; keys left out take that class's defaults
    (``transformers/models/mamba2/configuration_mamba2.py``: n_groups 8, state_size 128, untied embeddings,
    eos 2, pad 1)."""
    hidden, expand = cfg["hidden_size"], cfg.get("expand", 2)
    heads, head_dim = cfg.get("num_heads", 128), cfg.get("head_dim", 64)
    if heads * head_dim != expand * hidden:
        raise CheckpointError(f"config.json: num_heads * head_dim = {heads} * {head_dim} must equal expand * "
                              f"hidden_size = {expand} * {hidden}")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (Mamba-2 uses silu)")
    return MambaConfig(
        layer="Mamba2", d_model=hidden, n_layer=cfg["num_hidden_layers"],
        vocab_size=ours.get("vocab_size", cfg["vocab_size"]), d_state=cfg.get("state_size", 128),
        d_conv=cfg.get("conv_kernel", 4), expand=expand, headdim=head_dim, ngroups=cfg.get("n_groups", 8),
        chunk_size=cfg.get("chunk_size", 256),
        dt_limit=tuple(_json_float(v) for v in cfg.get("time_step_limit", NO_DT_LIMIT)),
        pad_vocab_size_multiple=ours.get("pad_vocab_size_multiple", 1),
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-5), tie_embeddings=cfg.get("tie_word_embeddings", False),
        residual_in_fp32=cfg.get("residual_in_fp32", True), conv_bias=cfg.get("use_conv_bias", True),
        bias=cfg.get("use_bias", False), eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id", 1),
    )


def beyond_transformers(config: MambaConfig) -> list[str]:
    """The options of a Mamba-2 config that transformers' ``Mamba2ForCausalLM`` cannot run (empty for Mamba-1)."""
    if config.layer != "Mamba2":
        return []
    extra = {"norm_before_gate=True": config.norm_before_gate, "D_has_hdim=True": config.D_has_hdim,
             "rmsnorm=False": not config.rmsnorm,
             f"d_ssm={config.d_ssm}": config.d_ssm not in (None, config.d_inner)}
    return [name for name, used in extra.items() if used]


def config_to_transformers(config: MambaConfig) -> dict:
    """A transformers ``MambaConfig`` (or ``Mamba2Config``) dict; ``vocab_size`` is the embedding size, as
    transformers reads it."""
    if config.layer == "Mamba2":
        cfg = {
            "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
            "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
            "vocab_size": config.padded_vocab_size, "num_heads": config.d_inner // config.headdim,
            "head_dim": config.headdim, "n_groups": config.ngroups, "state_size": config.d_state,
            "expand": config.expand, "conv_kernel": config.d_conv, "chunk_size": config.chunk_size,
            "hidden_act": "silu", "layer_norm_epsilon": config.rms_norm_eps,
            "tie_word_embeddings": config.tie_embeddings, "residual_in_fp32": config.residual_in_fp32,
            "use_conv_bias": config.conv_bias, "use_bias": config.bias,
            "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
            "bos_token_id": config.eos_token_id,
        }
        if tuple(config.dt_limit) != NO_DT_LIMIT:
            cfg["time_step_limit"] = list(config.dt_limit)
        return cfg
    return {
        "architectures": ["MambaForCausalLM"], "model_type": "mamba",
        "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size, "state_size": config.d_state,
        "conv_kernel": config.d_conv, "expand": config.expand, "time_step_rank": config.dt_rank,
        "intermediate_size": config.d_inner, "layer_norm_epsilon": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "residual_in_fp32": config.residual_in_fp32,
        "use_conv_bias": config.conv_bias, "use_bias": config.bias,
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "bos_token_id": config.eos_token_id,
    }


def config_from_mamba_ssm(cfg: dict) -> MambaConfig:
    """MambaConfig from a mamba_ssm ``config.json``. ``ssm_cfg`` holds the layer's arguments: for Mamba (v1)
    d_state (16), d_conv, expand, dt_rank; for ``"layer": "Mamba2"`` those of ``Mamba2.__init__`` with its
    defaults (``modules/mamba2.py``, lines 38-56: d_state 128, headdim 64, ngroups 1, chunk_size 256, ...).
    Initialisation-only arguments (dt_min, A_init_range, ...) are ignored."""
    ssm = cfg.get("ssm_cfg") or {}
    layer = ssm.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise CheckpointError(f"ssm_cfg asks for {layer!r} layers; supported: 'Mamba1' and 'Mamba2'")
    if cfg.get("attn_layer_idx") or cfg.get("d_intermediate", 0):
        raise CheckpointError("hybrid checkpoints (attention layers or MLPs) are not supported")
    if not cfg.get("rms_norm", True):
        raise CheckpointError("checkpoints with LayerNorm (rms_norm: false) are not supported")
    common = dict(
        d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=cfg["vocab_size"],
        d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
        pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
        rms_norm_eps=cfg.get("norm_epsilon", 1e-5), tie_embeddings=cfg.get("tie_embeddings", True),
        residual_in_fp32=cfg.get("residual_in_fp32", True), conv_bias=ssm.get("conv_bias", True),
        bias=ssm.get("bias", False),
    )
    if layer == "Mamba1":
        return MambaConfig(d_state=ssm.get("d_state", 16), dt_rank=ssm.get("dt_rank", "auto"), **common)
    return MambaConfig(
        layer="Mamba2", d_state=ssm.get("d_state", 128), headdim=ssm.get("headdim", 64),
        ngroups=ssm.get("ngroups", 1), chunk_size=ssm.get("chunk_size", 256),
        dt_limit=tuple(_json_float(v) for v in ssm.get("dt_limit", NO_DT_LIMIT)),
        norm_before_gate=ssm.get("norm_before_gate", False), D_has_hdim=ssm.get("D_has_hdim", False),
        rmsnorm=ssm.get("rmsnorm", True), d_ssm=ssm.get("d_ssm"), **common)


def config_to_mamba_ssm(config: MambaConfig) -> dict:
    """A mamba_ssm ``config.json`` dict (``MambaConfig`` of ``models/config_mamba.py``, which takes no other key,
    so the token ids are not kept and the norms' epsilon must be mamba_ssm's 1e-5)."""
    if config.rms_norm_eps != 1e-5:
        raise ValueError(f"mamba_ssm's layout has no norm epsilon (it is 1e-5); this model has {config.rms_norm_eps}")
    ssm = {"d_state": config.d_state, "d_conv": config.d_conv, "expand": config.expand,
           "conv_bias": config.conv_bias, "bias": config.bias}
    if config.layer == "Mamba1":
        ssm["dt_rank"] = config.dt_rank
    else:
        ssm = {"layer": "Mamba2", **ssm, "headdim": config.headdim, "ngroups": config.ngroups,
               "chunk_size": config.chunk_size, "norm_before_gate": config.norm_before_gate,
               "D_has_hdim": config.D_has_hdim, "rmsnorm": config.rmsnorm}
        if config.d_ssm is not None:
            ssm["d_ssm"] = config.d_ssm
        if tuple(config.dt_limit) != NO_DT_LIMIT:
            ssm["dt_limit"] = list(config.dt_limit)
    return {"d_model": config.d_model, "d_intermediate": 0, "n_layer": config.n_layer,
            "vocab_size": config.vocab_size, "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {},
            "rms_norm": True, "residual_in_fp32": config.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": config.pad_vocab_size_multiple, "tie_embeddings": config.tie_embeddings}


def detect_layout(cfg: dict) -> str:
    if "hidden_size" in cfg and "num_hidden_layers" in cfg:
        return "transformers"
    if "d_model" in cfg and "n_layer" in cfg:
        return "mamba_ssm"
    raise CheckpointError("config.json is neither a transformers MambaConfig (hidden_size, num_hidden_layers) "
                          "nor a mamba_ssm config (d_model, n_layer)")


# ---------------------------------------------------------------------------- state dicts
def to_internal_keys(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Strip ``prefix`` and rename transformers' ``backbone.embeddings`` to mamba_ssm's ``backbone.embedding``."""
    out = {}
    for k, v in state.items():
        if prefix:
            if not k.startswith(prefix):
                out[k] = v  # reported as unexpected by load_state_checked
                continue
            k = k[len(prefix):]
        k = k.replace("backbone.embeddings.", "backbone.embedding.", 1)
        if k in out:
            raise CheckpointError(f"the checkpoint gives {k} twice (as backbone.embedding. and backbone.embeddings.)")
        out[k] = v
    return out


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                       optional: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``model``; every parameter must be given once with its exact shape.

    Keys in ``optional`` may be missing (tied ``lm_head.weight``; it is then the embedding).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:20]}" + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:20]}"
                        + (f" (+{len(unexpected) - 20} more)" if len(unexpected) > 20 else ""))
    if wrong:
        problems.append(f"mis-shaped tensors {wrong[:20]}")
    if problems:
        raise CheckpointError(f"cannot load {source}: " + "; ".join(problems))
    tied = getattr(model, "config", None) is not None and getattr(model.config, "tie_embeddings", False)
    if tied and "lm_head.weight" in state and "backbone.embedding.weight" in state:
        if not torch.equal(state["lm_head.weight"], state["backbone.embedding.weight"]):
            raise CheckpointError(f"cannot load {source}: the config ties the embeddings but lm_head.weight "
                                  f"differs from the embedding")
    with torch.no_grad():
        for k, p in expected.items():
            if k in state:
                p.copy_(state[k])


def build_from_state(cls, config: MambaConfig, state: dict[str, torch.Tensor], source: str):
    """``cls(config)`` loaded from a state dict with transformers or mamba_ssm key names, every key checked
    (``lm_head.weight`` may be absent when the embeddings are tied)."""
    model = cls(config)
    load_state_checked(model, to_internal_keys(state), source,
                       optional=("lm_head.weight",) if config.tie_embeddings else ())
    return model


def from_transformers_model(hf_model) -> MambaLM:
    """A :class:`MambaLM` holding the weights of an in-memory transformers ``MambaForCausalLM``, in eval mode."""
    config = config_from_transformers(hf_model.config.to_dict())
    return build_from_state(MambaLM, config, hf_model.state_dict(), "transformers model").eval()


#: the parameters mamba_ssm's ``Mamba`` creates in fp32 whatever the model's dtype (modules/mamba_simple.py l.104-115)
MAMBA_SSM_FP32_PARAMETERS = ("A_log", "D")


def cast_parameters(model: nn.Module, dtype: torch.dtype | None = None, device=None,
                    keep_fp32: Collection[str] = ()) -> nn.Module:
    """``model.to(device=device, dtype=dtype)``, except that the parameters named (last name component) in
    ``keep_fp32`` become fp32 with their exact values. Returns ``model``."""
    model.to(device=device)
    if dtype is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.is_floating_point():
                    p.data = p.data.to(torch.float32 if name.rsplit(".", 1)[-1] in keep_fp32 else dtype)
            for b in model.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(dtype)
    return model


def load_mamba_lm(folder, dtype: torch.dtype | None = None, device=None) -> MambaLM:
    """A :class:`MambaLM` from a transformers ``MambaForCausalLM`` folder or a mamba_ssm folder (see the module
    docstring), in eval mode; ``dtype`` and ``device`` where to put it (default: fp32, on the CPU); a mamba_ssm
    folder keeps ``A_log`` and ``D`` in fp32 as mamba_ssm does (module docstring, "Dtypes"). ``folder`` may be a
    Hugging Face repo id (``state-spaces/mamba-2.8b-hf``; :func:`~mambaprune.models.hub.resolve_folder`)."""
    from .hub import WEIGHT_FOLDER, resolve_folder

    folder = resolve_folder(folder, allow_patterns=WEIGHT_FOLDER, weights=True)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    raw = read_json(folder / "config.json")
    layout = detect_layout(raw)
    config = config_from_transformers(raw) if layout == "transformers" else config_from_mamba_ssm(raw)
    model = build_from_state(MambaLM, config, read_folder_weights(folder), str(folder))
    keep = MAMBA_SSM_FP32_PARAMETERS if layout == "mamba_ssm" else ()
    return cast_parameters(model, dtype, device, keep_fp32=keep).eval()


def save_mamba_lm(model: MambaLM, folder, layout: str | None = None) -> None:
    """Write ``model`` to ``folder`` in a layout that :func:`load_mamba_lm` and the upstream loader both read.

    ``layout="transformers"`` (the default): transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM``
    layout, ``config.json`` (transformers keys, plus ``pad_vocab_size_multiple`` and the tokenizer vocab) and
    ``model.safetensors`` (transformers key names; ``lm_head.weight`` left out when tied).
    ``layout="mamba_ssm"``: ``config.json`` + ``pytorch_model.bin`` as mamba_ssm's ``save_pretrained`` writes
    them. A Mamba-2 model with options transformers lacks (:func:`beyond_transformers`) is written in
    mamba_ssm's layout by default, and asking for transformers' layout is then a ValueError. Writing mamba_ssm's
    layout removes a ``model.safetensors`` (and its index) left in the folder, which loaders would read first.
    """
    folder = Path(folder)
    lacking = beyond_transformers(model.config)
    layout = layout or ("mamba_ssm" if lacking else "transformers")
    if layout not in LAYOUTS:
        raise ValueError(f"save_mamba_lm: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "transformers" and lacking:
        raise ValueError(f"save_mamba_lm: transformers' Mamba2ForCausalLM has no {', '.join(lacking)}; "
                         f"save with layout='mamba_ssm'")
    if layout == "mamba_ssm":
        cfg = config_to_mamba_ssm(model.config)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "pytorch_model.bin.tmp"
        torch.save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, folder / "pytorch_model.bin")
        for stale in ("model.safetensors", "model.safetensors.index.json"):   # loaders prefer them to the .bin
            (folder / stale).unlink(missing_ok=True)
        with open(folder / "config.json", "w") as f:
            json.dump(cfg, f, indent=2)
        return
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = config_to_transformers(model.config)
    cfg["mambaprune"] = {"vocab_size": model.config.vocab_size,
                         "pad_vocab_size_multiple": model.config.pad_vocab_size_multiple}
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_embeddings:
            continue
        state[k.replace("backbone.embedding.", "backbone.embeddings.", 1)] = v.detach().contiguous().cpu()
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)


def split_prefixed(state: dict[str, torch.Tensor], prefixes: Collection[str],
                   source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{prefix: {rest: tensor}}`` for each prefix; a key under none of them raises :class:`CheckpointError`."""
    parts = {p: {} for p in prefixes}
    stray = []
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            stray.append(key)
        else:
            parts[prefix][key[len(prefix):]] = value
    if stray:
        raise CheckpointError(f"unexpected keys in {source} (expected only keys under {list(prefixes)}): "
                              f"{sorted(stray)[:20]}")
    return parts


def _needer(state: dict[str, torch.Tensor], source: str, what: str):
    def need(key):
        if key not in state:
            raise CheckpointError(f"cannot read {what}'s shape from {source}: missing key {key!r}")
        return state[key]

    return need


def layer_count(state: dict[str, torch.Tensor], prefix: str, source: str) -> int:
    """The number of layers ``{prefix}{i}.*`` in ``state``, which must be numbered 0..n-1 (at least one)."""
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: the layers found are {layers[:10]}..., expected 0..n-1")
    return len(layers)


def mamba_config_from_state(state: dict[str, torch.Tensor], source: str, *, ngroups: int = 1) -> MambaConfig:
    """The :class:`MambaConfig` of a Mamba LM state dict (mamba_ssm names, ``backbone.embedding``), read from
    the tensor shapes: width, depth, the layer kind, d_state, d_conv, expand, biases, the (padded) vocabulary, and
    whether ``lm_head`` is tied (absent or equal to the embedding). The RMSNorm epsilon is mamba_ssm's 1e-5.
    Mamba (v1) layers: dt_rank too; Mamba-2 layers (a mixer with ``dt_bias``): see
    :func:`mamba2_config_from_mixer` (``ngroups`` is passed to it)."""
    need = _needer(state, source, "the language model")
    emb = need("backbone.embedding.weight")
    n_layer = layer_count(state, "backbone.layers.", source)
    mixer = "backbone.layers.0.mixer."
    rows, d_model = emb.shape
    head = state.get("lm_head.weight")
    common = dict(n_layer=n_layer, vocab_size=rows, pad_vocab_size_multiple=8 if rows % 8 == 0 else 1,
                  tie_embeddings=head is None or torch.equal(head, emb))
    if mixer + "dt_bias" in state:
        return mamba2_config_from_mixer(state, mixer, source, ngroups=ngroups, **common)
    d_inner = need(mixer + "in_proj.weight").shape[0] // 2
    if d_inner % d_model:
        raise CheckpointError(f"{source}: d_inner {d_inner} is not a multiple of d_model {d_model}")
    return MambaConfig(d_model=d_model, d_state=need(mixer + "A_log").shape[1],
                       d_conv=need(mixer + "conv1d.weight").shape[-1], expand=d_inner // d_model,
                       dt_rank=need(mixer + "dt_proj.weight").shape[1],
                       conv_bias=mixer + "conv1d.bias" in state, bias=mixer + "in_proj.bias" in state, **common)


def mamba2_config_from_mixer(state: dict[str, torch.Tensor], mixer: str, source: str, *, ngroups: int = 1,
                             **fields) -> MambaConfig:
    """A Mamba-2 :class:`MambaConfig` read from the tensors of one mixer (keys ``{mixer}in_proj.weight`` ...),
    with ``fields`` (depth, vocabulary, ...) added.

    ``in_proj`` gives ``2 d_inner + 2 ngroups d_state + nheads`` channels and the conv ``d_ssm + 2 ngroups
    d_state`` (``mamba_ssm/modules/mamba2.py``, lines 95-104), so the width, d_inner (``out_proj``), the heads
    (``A_log``), d_ssm, headdim, d_conv, the biases, whether D is per channel and whether the gated norm is there
    all show. ``ngroups`` (B and C groups) cannot be told apart from d_state (only their product shows), so it is
    given (1 in every ``state-spaces/mamba2-*`` model and in ML-Mamba); ``chunk_size``, ``dt_limit`` and
    ``norm_before_gate`` stay mamba_ssm's defaults (256, none, False)."""
    need = _needer(state, source, "the Mamba-2 mixer")
    d_model = need(mixer + "in_proj.weight").shape[1]
    nheads = need(mixer + "A_log").shape[0]
    d_inner = need(mixer + "out_proj.weight").shape[1]
    conv_dim, _, d_conv = need(mixer + "conv1d.weight").shape
    d_ssm = conv_dim + nheads + 2 * d_inner - need(mixer + "in_proj.weight").shape[0]
    groups_state = conv_dim - d_ssm
    if (d_inner % d_model or not 0 < d_ssm <= d_inner or d_ssm % nheads or groups_state <= 0
            or groups_state % (2 * ngroups)):
        raise CheckpointError(f"{source}: the Mamba-2 mixer's shapes do not fit together (d_model {d_model}, "
                              f"out_proj input {d_inner}, {nheads} heads, conv channels {conv_dim}, "
                              f"ngroups {ngroups})")
    try:
        return MambaConfig(layer="Mamba2", d_model=d_model, d_state=groups_state // (2 * ngroups), d_conv=d_conv,
                           expand=d_inner // d_model, headdim=d_ssm // nheads, ngroups=ngroups,
                           D_has_hdim=need(mixer + "D").shape[0] != nheads, rmsnorm=mixer + "norm.weight" in state,
                           d_ssm=None if d_ssm == d_inner else d_ssm, conv_bias=mixer + "conv1d.bias" in state,
                           bias=mixer + "in_proj.bias" in state, **fields)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def overlay_state_(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` over some of ``module``'s tensors (what a ``strict=False`` load of a partial checkpoint
    does). Every key must name a tensor of the module with the same shape, and two keys naming one tied tensor
    must agree; otherwise :class:`CheckpointError` names them."""
    expected = module.state_dict()
    unexpected = sorted(k for k in state if k not in expected)
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if unexpected or wrong:
        raise CheckpointError(f"cannot load {source}: " + "; ".join(
            f"{what} {items[:20]}" for what, items in (("unexpected keys", unexpected), ("mis-shaped tensors", wrong))
            if items))
    owner = {}
    for key, value in state.items():
        ptr = expected[key].data_ptr()
        if ptr in owner and not torch.equal(value, state[owner[ptr]]):
            raise CheckpointError(f"cannot load {source}: {key} and {owner[ptr]} are one tied tensor in the model "
                                  f"but differ in the checkpoint")
        owner.setdefault(ptr, key)
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)
