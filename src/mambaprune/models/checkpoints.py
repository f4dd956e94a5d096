"""Reading and writing Mamba LM checkpoints in the released layouts.

Two folder layouts are read:

* transformers ``MambaForCausalLM``: ``config.json`` with ``hidden_size, num_hidden_layers, state_size,
  expand, conv_kernel, time_step_rank, vocab_size, layer_norm_epsilon`` and weights in ``model.safetensors``
  (or sharded ``model-*.safetensors`` with ``model.safetensors.index.json``) or ``pytorch_model.bin``;
  keys ``backbone.embeddings.weight``, ``backbone.layers.{i}.*``, ``backbone.norm_f.weight``, ``lm_head.weight``
  (absent when tied).
* mamba_ssm (``state-spaces/mamba-*``): ``config.json`` with ``d_model, n_layer, vocab_size, ssm_cfg,
  rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple`` and ``pytorch_model.bin`` with keys
  ``backbone.embedding.weight`` ... and the padded vocabulary.

The API: :func:`load_mamba_lm` (a folder of either layout), :func:`from_transformers_model` (an in-memory
transformers model) and :func:`save_mamba_lm` (transformers' layout). This module depends on
:mod:`mambaprune.models.mamba_lm`, never the reverse.

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
def config_from_transformers(cfg: dict) -> MambaConfig:
    """MambaConfig from a transformers ``MambaConfig`` dict. transformers does not pad the vocabulary
    (``vocab_size`` is the embedding size) unless the folder was written by :func:`save_mamba_lm`."""
    ours = cfg.get("mambaprune") or {}
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


def config_to_transformers(config: MambaConfig) -> dict:
    """A transformers ``MambaConfig`` dict; ``vocab_size`` is the embedding size, as transformers reads it."""
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
    """MambaConfig from a mamba_ssm ``config.json`` (``ssm_cfg`` may override d_state, d_conv, expand, dt_rank)."""
    ssm = cfg.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise CheckpointError(f"only Mamba (v1) layers are supported, the config asks for {ssm['layer']}")
    if cfg.get("attn_layer_idx") or cfg.get("d_intermediate", 0):
        raise CheckpointError("hybrid checkpoints (attention layers or MLPs) are not supported")
    if not cfg.get("rms_norm", True):
        raise CheckpointError("checkpoints with LayerNorm (rms_norm: false) are not supported")
    return MambaConfig(
        d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=cfg["vocab_size"],
        d_state=ssm.get("d_state", 16), d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
        dt_rank=ssm.get("dt_rank", "auto"), pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
        rms_norm_eps=cfg.get("norm_epsilon", 1e-5), tie_embeddings=cfg.get("tie_embeddings", True),
        residual_in_fp32=cfg.get("residual_in_fp32", True), conv_bias=ssm.get("conv_bias", True),
        bias=ssm.get("bias", False),
    )


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


def save_mamba_lm(model: MambaLM, folder) -> None:
    """Write ``model`` to ``folder`` in transformers' ``MambaForCausalLM`` layout, which transformers' own
    ``from_pretrained`` and :func:`load_mamba_lm` read: ``config.json`` (transformers keys, plus
    ``pad_vocab_size_multiple`` and the tokenizer vocab) and ``model.safetensors`` (transformers key names;
    ``lm_head.weight`` left out when tied)."""
    from safetensors.torch import save_file

    folder = Path(folder)
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


def mamba_config_from_state(state: dict[str, torch.Tensor], source: str) -> MambaConfig:
    """The :class:`MambaConfig` of a Mamba LM state dict (mamba_ssm names, ``backbone.embedding``), read from
    the tensor shapes: width, depth, d_state, d_conv, expand, dt_rank, biases, the (padded) vocabulary, and
    whether ``lm_head`` is tied (absent or equal to the embedding). The RMSNorm epsilon is mamba_ssm's 1e-5."""
    def need(key):
        if key not in state:
            raise CheckpointError(f"cannot read the language model's shape from {source}: missing key {key!r}")
        return state[key]

    emb = need("backbone.embedding.weight")
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"backbone\.layers\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: the layers found are {layers[:10]}..., expected 0..n-1")
    mixer = "backbone.layers.0.mixer."
    rows, d_model = emb.shape
    d_inner = need(mixer + "in_proj.weight").shape[0] // 2
    if d_inner % d_model:
        raise CheckpointError(f"{source}: d_inner {d_inner} is not a multiple of d_model {d_model}")
    head = state.get("lm_head.weight")
    return MambaConfig(d_model=d_model, n_layer=len(layers), vocab_size=rows,
                       d_state=need(mixer + "A_log").shape[1], d_conv=need(mixer + "conv1d.weight").shape[-1],
                       expand=d_inner // d_model, dt_rank=need(mixer + "dt_proj.weight").shape[1],
                       pad_vocab_size_multiple=8 if rows % 8 == 0 else 1,
                       tie_embeddings=head is None or torch.equal(head, emb),
                       conv_bias=mixer + "conv1d.bias" in state, bias=mixer + "in_proj.bias" in state)


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
