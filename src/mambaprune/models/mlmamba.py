"""ML-Mamba (Huang et al., 2024; code ``WenjunHuang94/ML-Mamba``, weights ``huangwenjun1994/ML-Mamba``), model
``mlmamba+3b``, as released.

ML-Mamba is Cobra's code base (``cobra/`` renamed ``mlmamba/``) with a Mamba-2 LLM and a bidirectional Mamba-2
connector. What the released code does, and what this builder reproduces:

* **Checkpoint**: ``torch.save({"model": {"llm_backbone", "mlp", "bidirectional_mamba", "projector"}})``
  (``mlmamba/training/strategies/fsdp.py``, ``save_checkpoint``, lines 117-139: each part is the VLM's state
  dict with the module's prefix removed, ``llm_backbone.llm.`` for the LLM). So the LLM keys are bare mamba_ssm
  names (``backbone.embedding.weight``, ``backbone.layers.{i}.{norm,mixer.*}``, ``backbone.norm_f.weight``,
  ``lm_head.weight``; keys with Cobra's ``llm.`` prefix are accepted too), ``mlp`` holds ``0.{weight,bias}``,
  ``bidirectional_mamba`` the fork's ``Bidirectional_Mamba`` names (:mod:`~mambaprune.models.bimamba2`) and
  ``projector`` ``projector.{0,2,4}.{weight,bias}``. ``MLMambaVLM.from_pretrained`` loads all four strictly
  (``mlmamba/models/vlms/mlmamba.py``, lines 182-185).
* **Where it is** (``mlmamba/models/load.py``, lines 60-80): ``mlmamba.load("mlmamba+3b")`` downloads
  ``latest-checkpoint.pt`` from the root of the hub repo ``huangwenjun1994/ML-Mamba`` and reads the run config
  from the code's own ``mlmamba/conf/config.json`` (:data:`MLMAMBA_RUN_CONFIG`); a local run folder has
  ``config.json`` and ``checkpoints/latest-checkpoint.pt``. In both cases ``load()`` then overrides
  ``llm_backbone_id`` with ``"mamba2-2.7b"``, so that field is not read here.
* **LLM**: mamba_ssm's ``MambaLMHeadModel`` built from ``state-spaces/mamba2-2.7b``'s config (64 Mamba-2 layers
  2560 wide, ``ssm_cfg={"layer": "Mamba2"}``: headdim 64, d_state 128, ngroups 1, expand 2; vocabulary 50277
  padded to a multiple of 16, 50288; tied ``lm_head``), its weights all from the checkpoint. Here its shape is
  read from the tensors (ngroups, which the shapes do not show, is the released 1).
* **Connector** (``mlmamba/models/vlms/mlmamba.py``, lines 85-105 and 416-418): ``mlp`` = ``Linear(2176, 2560)
  + GELU``, then ``bidirectional_mamba`` (two bidirectional Mamba-2 blocks and a LayerNorm, built from the same
  mamba2-2.7b config), then ``projector``, Cobra's ``FusedMLPProjector`` built as ``(2560, 2560)``: 2560 ->
  10240 -> 2560 -> 2560. Here :class:`MambaScanConnector` (the paper's name), in the :class:`MambaVLM`'s
  projector slot.
* **Vision, images, prompt, decoding**: Cobra's, unchanged: the same ``dinosiglip-vit-so-384px`` tower, 729
  tokens x 2176, ``resize-naive``; the LLM id starts with "mamba", so the prompt builder is Cobra's
  ``ZephyrChatPromptBuilder`` (``backbones/llm/mamba.py``, line 103); the tokenizer is
  ``xiuyul/mamba-2.8b-zephyr``'s (``base_llm.py``, line 165); the evaluation fork ``WenjunHuang94/vlm-evaluation``
  is Cobra's ``h-zhao1997/vlm-evaluation`` with the model renamed (same prompts and scorers, greedy, at most 128
  new tokens), so the default protocol is ``cobra``. See :mod:`~mambaprune.models.cobra`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from .bimamba2 import BidirectionalMamba2, bidirectional_mamba2_from_state, bimamba2_config
from .checkpoints import CheckpointError, build_from_state, load_state_checked, mamba_config_from_state
from .cobra import (COBRA_FOLDERS, COBRA_RUN_CONFIG, COBRA_SPEC, COBRA_VISION_BACKBONES, check_run_config,
                    fused_projector_from_state, load_dinosiglip, random_dinosiglip, read_run_checkpoint,
                    read_run_config, resolve_dinosiglip_folders, save_dinosiglip)
from .mamba_lm import MambaLM
from .projector import MLPProjector
from .registry import register_model
from .vision import FusedViTTower
from .vlm import MambaVLM, load_tokenizer

CHECKPOINT_NAME = "latest-checkpoint.pt"
#: the parts of the released checkpoint, in the order ``save_checkpoint`` writes them
MLMAMBA_PARTS = ("llm_backbone", "mlp", "bidirectional_mamba", "projector")

#: ``mlmamba/conf/config.json`` of the released code: the config ``load()`` uses for the hub checkpoint (Cobra's
#: run config with the ML-Mamba model id, the mamba2-2.7b LLM, one finetune epoch, 8 samples per device).
MLMAMBA_RUN_CONFIG = {
    **COBRA_RUN_CONFIG,
    "model": {**COBRA_RUN_CONFIG["model"], "type": "mlmamba+3b", "model_id": "mlmamba+3b",
              "llm_backbone_id": "mamba2-2.7b", "finetune_epochs": 1, "finetune_per_device_batch_size": 8},
    "run_id": "llava-lvis4v-lrv+mlmamba+3b+stage-finetune+x7", "wandb_project": "mlmamba",
}

MLMAMBA_SPEC = replace(
    COBRA_SPEC, name="mlmamba",
    notes="Cobra's prompt and decoding: ML-Mamba keeps Cobra's ZephyrChatPromptBuilder and evaluates with a copy of "
          "Cobra's vlm-evaluation fork (WenjunHuang94/vlm-evaluation): greedy, max_new_tokens=128, EOS <|endoftext|>.")


class MambaScanConnector(nn.Module):
    """ML-Mamba's visual connector: ``projector(bidirectional_mamba(mlp(features)))``.

    ``mlp`` is ``nn.Sequential(Linear(vision dim, d), GELU)``, ``bidirectional_mamba`` a
    :class:`~mambaprune.models.bimamba2.BidirectionalMamba2` of width ``d`` and ``projector`` the fused GELU MLP
    ``d -> 4d -> d_model -> d_model``; the attribute names are the checkpoint's part names.
    """

    def __init__(self, mlp: nn.Sequential, bidirectional_mamba: BidirectionalMamba2, projector: MLPProjector):
        super().__init__()
        width = mlp[0].out_features
        if bidirectional_mamba.config.d_model != width or projector.in_dim != width:
            raise ValueError(f"MambaScanConnector: the mlp gives {width} channels, the bidirectional Mamba-2 takes "
                             f"{bidirectional_mamba.config.d_model} and the projector {projector.in_dim}")
        self.mlp = mlp
        self.bidirectional_mamba = bidirectional_mamba
        self.projector = projector

    @property
    def in_dim(self) -> int:
        return self.mlp[0].in_features

    @property
    def out_dim(self) -> int:
        return self.projector.out_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(self.bidirectional_mamba(self.mlp(features)))


def gelu_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """ML-Mamba's ``mlp``: ``Linear(in_dim, out_dim)`` then the exact GELU; weights ``0.weight``, ``0.bias``."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU())


def connector_from_state(mlp: dict, bidirectional_mamba: dict, projector: dict, source: str) -> MambaScanConnector:
    """The connector from the checkpoint's three parts (sizes read from the shapes), every key checked."""
    weight = mlp.get("0.weight")
    if weight is None or weight.dim() != 2:
        raise CheckpointError(f"cannot load {source} (model.mlp): missing key '0.weight' or not a matrix "
                              f"(found {sorted(mlp)[:10]})")
    mlp_module = gelu_mlp(weight.shape[1], weight.shape[0])
    load_state_checked(mlp_module, mlp, f"{source} (model.mlp)")
    stack = bidirectional_mamba2_from_state(bidirectional_mamba, f"{source} (model.bidirectional_mamba)")
    head = fused_projector_from_state(projector, f"{source} (model.projector)")
    try:
        return MambaScanConnector(mlp_module, stack, head)
    except ValueError as e:           # parts of different widths
        raise CheckpointError(f"cannot load {source}: {e}") from e


def build_mlmamba(vision: FusedViTTower, connector: MambaScanConnector, lm: MambaLM, tokenizer) -> MambaVLM:
    """An ML-Mamba :class:`MambaVLM` from its parts."""
    return MambaVLM(vision, connector, lm, tokenizer, MLMAMBA_SPEC)


def random_mlmamba(lm: MambaLM, tokenizer, *, image_size: int = 384, patch_size: int = 14, dino: dict | None = None,
                   siglip: dict | None = None, bimamba: dict | None = None, seed: int = 0) -> MambaVLM:
    """ML-Mamba's architecture with random towers and connector around ``lm`` (for tests): towers as
    :func:`~mambaprune.models.cobra.random_dinosiglip`, the connector ``lm``'s width, ``bimamba`` fields of its
    config (:func:`~mambaprune.models.bimamba2.bimamba2_config`; small by default). The backward direction's
    SSM parameters are drawn apart from the forward one's, in the ranges Mamba-2 initialises them in."""
    vision = random_dinosiglip(image_size=image_size, patch_size=patch_size, dino=dino, siglip=siglip, seed=seed)
    d = lm.config.d_model
    config = bimamba2_config(**{"d_model": d, "d_state": 8, "headdim": 8, "chunk_size": 64, **(bimamba or {})})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stack = BidirectionalMamba2(config)
        with torch.no_grad():
            for layer in stack.layers:
                mixer = layer.mixer
                mixer.A_log_b.uniform_(1, 16).log_()
                dt = torch.empty_like(mixer.dt_bias_b).uniform_(-6.9, -2.3).exp()    # Δ in [1e-3, 0.1]
                mixer.dt_bias_b.copy_(dt + torch.log(-torch.expm1(-dt)))
                mixer.D_b.uniform_(0.5, 1.5)
                mixer.conv1d_b.reset_parameters()
        connector = MambaScanConnector(gelu_mlp(vision.dim, d), stack, MLPProjector(d, d))
    return build_mlmamba(vision, connector, lm.eval(), tokenizer).eval()


def mlmamba_checkpoint(model: MambaVLM, llm_prefix: str = "") -> dict:
    """``{"model": {...}}`` as ML-Mamba's training strategy saves it (see the module docstring); ``llm_prefix``
    (e.g. ``"llm."``) is put in front of the LLM keys."""
    def part(module, prefix=""):
        return {f"{prefix}{k}": v.detach().cpu() for k, v in module.state_dict().items()}

    connector = model.projector
    return {"model": {"llm_backbone": part(model.lm, llm_prefix), "mlp": part(connector.mlp),
                      "bidirectional_mamba": part(connector.bidirectional_mamba),
                      "projector": part(connector.projector, "projector.")}}


def save_mlmamba(model: MambaVLM, folder, *, run_folder: bool = False, dino_dir=None, siglip_dir=None,
                 tokenizer_dir=None) -> None:
    """Write ``model`` in the released layouts: ``folder/latest-checkpoint.pt`` as on the hub, or with
    ``run_folder`` a training run folder (``config.json`` + ``checkpoints/latest-checkpoint.pt``); and optionally
    the towers as their public transformers folders and the tokenizer."""
    import json

    folder = Path(folder)
    target = folder / "checkpoints" if run_folder else folder
    target.mkdir(parents=True, exist_ok=True)
    if run_folder:
        with open(folder / "config.json", "w") as f:
            json.dump(MLMAMBA_RUN_CONFIG, f, indent=2)
    torch.save(mlmamba_checkpoint(model), target / CHECKPOINT_NAME)
    save_dinosiglip(model.vision, dino_dir=dino_dir, siglip_dir=siglip_dir)
    if tokenizer_dir is not None:
        model.tokenizer.save_pretrained(str(tokenizer_dir))


def find_checkpoint(path: Path) -> tuple[Path, dict]:
    """``(checkpoint file, run config's "model" section)`` for a ``latest-checkpoint.pt`` file, a folder holding
    one at its root (the hub repo; config: :data:`MLMAMBA_RUN_CONFIG`, as ``load()`` takes it) or a run folder
    (``config.json`` + ``checkpoints/latest-checkpoint.pt``)."""
    if path.is_file():
        return path, check_run_config(dict(MLMAMBA_RUN_CONFIG["model"]), "ML-Mamba's conf/config.json", None)
    if (path / "checkpoints" / CHECKPOINT_NAME).is_file():
        return path / "checkpoints" / CHECKPOINT_NAME, read_run_config(path, "ML-Mamba", None)
    if (path / CHECKPOINT_NAME).is_file():
        return path / CHECKPOINT_NAME, check_run_config(dict(MLMAMBA_RUN_CONFIG["model"]),
                                                        "ML-Mamba's conf/config.json", None)
    raise CheckpointError(f"{path} holds no ML-Mamba checkpoint: neither {CHECKPOINT_NAME} nor "
                          f"checkpoints/{CHECKPOINT_NAME} (expected: {MLMAMBA_FOLDERS['checkpoint'][1]})")


#: The path arguments of :func:`load_mlmamba` (see :data:`~mambaprune.models.cobra.COBRA_FOLDERS`).
MLMAMBA_FOLDERS = {
    "checkpoint": ("ML-Mamba checkpoint", "latest-checkpoint.pt of huangwenjun1994/ML-Mamba (or a run folder with "
                                          "config.json and checkpoints/latest-checkpoint.pt)",
                   "a local file or folder, or the Hugging Face repo id huangwenjun1994/ML-Mamba"),
    **{arg: COBRA_FOLDERS[arg] for arg in ("dino_dir", "siglip_dir", "tokenizer_dir")},
}


@register_model("mlmamba")
def load_mlmamba(checkpoint=None, *, dino_dir=None, siglip_dir=None, tokenizer_dir=None,
                 dtype: torch.dtype | None = None, device=None) -> MambaVLM:
    """ML-Mamba from its released checkpoint and Cobra's tower and tokenizer folders.

    Every path is a local one or a Hugging Face repo id resolved through the local cache
    (:func:`~mambaprune.models.hub.resolve_folder`); only the files read are downloaded.

    Args:
        checkpoint: ``latest-checkpoint.pt`` of ``huangwenjun1994/ML-Mamba`` (the file, a folder holding it, or that
            repo id), or a training run folder (``config.json``, ``checkpoints/latest-checkpoint.pt``).
        dino_dir, siglip_dir, tokenizer_dir: as for Cobra (:func:`~mambaprune.models.cobra.load_cobra`):
            ``facebook/dinov2-with-registers-large``, ``google/siglip-so400m-patch14-384``, and the tokenizer of
            ``xiuyul/mamba-2.8b-zephyr``.
        dtype, device: where to put the model; default fp32 on the CPU.

    A path left out or not found is a :class:`CheckpointError` naming it and the public weights it takes; a
    missing, unexpected or mis-shaped tensor is one naming it.
    """
    from .hub import check_given, resolve_argument

    check_given("mlmamba", MLMAMBA_FOLDERS, dict(checkpoint=checkpoint, dino_dir=dino_dir, siglip_dir=siglip_dir,
                                                 tokenizer_dir=tokenizer_dir))
    path = resolve_argument("mlmamba", "checkpoint", checkpoint, MLMAMBA_FOLDERS,
                            allow_patterns=[CHECKPOINT_NAME, "config.json", f"checkpoints/{CHECKPOINT_NAME}"])
    dino_dir, siglip_dir, tokenizer_dir = resolve_dinosiglip_folders("mlmamba", MLMAMBA_FOLDERS, dino_dir, siglip_dir,
                                                                     tokenizer_dir)
    ckpt, model_cfg = find_checkpoint(path)
    llm_state, mlp, bimamba, projector = read_run_checkpoint(ckpt, MLMAMBA_PARTS, "ML-Mamba")
    connector = connector_from_state(mlp, bimamba, projector, str(ckpt))
    if llm_state and all(k.startswith("llm.") for k in llm_state):
        llm_state = {k[len("llm."):]: v for k, v in llm_state.items()}
    source = f"{ckpt} (model.llm_backbone)"
    lm = build_from_state(MambaLM, mamba_config_from_state(llm_state, source), llm_state, source)
    vision = load_dinosiglip(dino_dir, siglip_dir, image_size=COBRA_VISION_BACKBONES[model_cfg["vision_backbone_id"]],
                             resize=model_cfg["image_resize_strategy"])
    model = build_mlmamba(vision, connector, lm, load_tokenizer(tokenizer_dir))
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
