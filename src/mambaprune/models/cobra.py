"""Cobra (Zhao et al., 2024; code ``h-zhao1997/cobra``, weights ``han1997/cobra``), model ``cobra+3b``, as released.

What the released code does, and what this builder reproduces:

* **Run folder** ``<run_dir>/config.json`` and ``<run_dir>/checkpoints/latest-checkpoint.pt``. ``config.json`` is
  the training config as draccus dumps it; Cobra's ``load()`` reads its ``"model"`` section: ``model_id``
  (``cobra+3b``), ``vision_backbone_id`` (``dinosiglip-vit-so-384px``), ``llm_backbone_id``
  (``mamba-2.8b-zephyr``), ``arch_specifier`` (``no-align+fused-gelu-mlp``), ``image_resize_strategy``
  (``resize-naive``). The ``.pt`` file is ``torch.save({"model": {"projector": ..., "llm_backbone": ...}})``.
  The training strategy strips one module prefix, and both modules wrap another, so the projector keys are
  ``projector.{0,2,4}.{weight,bias}`` (``FusedMLPProjector.projector`` is the ``nn.Sequential``; bare
  ``0.weight`` ... keys are accepted too) and the LLM keys are ``llm.`` + mamba_ssm names
  (``llm.backbone.embedding.weight``, ``llm.backbone.layers.{i}.{norm,mixer.*}``, ``llm.backbone.norm_f.weight``,
  ``llm.lm_head.weight``). Other parts of ``"model"`` are ignored, as Cobra's own loader ignores them. The
  LLM's shape is read from the tensors (mamba-2.8b-zephyr: 2560 wide, 64 layers, vocabulary 50280).
* **Vision** is not in the run folder: timm's ``vit_large_patch14_reg4_dinov2.lvd142m`` and
  ``vit_so400m_patch14_siglip_384``, both created at 384 px (DINOv2's 37 x 37 positions resampled to 27 x 27),
  features from the second-to-last block without prefix tokens, concatenated: 729 tokens x 2176. Here they are
  transformers' ``Dinov2WithRegistersModel`` / ``SiglipVisionModel`` (see :mod:`~mambaprune.models.vision`).
  timm's SigLIP MLP uses the exact GELU while transformers' SigLIP config says ``gelu_pytorch_tanh``, so SigLIP
  is loaded with ``hidden_act="gelu"`` to compute what Cobra computed.
* **Images**: ``resize-naive``, bicubic to 384 x 384 (aspect ratio not kept), each tower with its own mean/std
  (DINOv2: ImageNet; SigLIP: 0.5).
* **Prompt** (vlm-evaluation's VQA prompt through Cobra's ``ZephyrChatPromptBuilder``): the message
  ``"\\n{question}\\nAnswer the question using a single word or phrase."`` with ``<image>`` removed and
  stripped, wrapped as ``"<|user|>\\n{message}<|endoftext|>\\n<|assistant|>\\n"``; no BOS.
* **Decoding** (vlm-evaluation's defaults): greedy, at most 128 new tokens, stop at ``<|endoftext|>``.
* **Precision** (vlm-evaluation's ``load_precision="bf16"``): the whole model, ``A_log`` and ``D`` included, is
  converted to bf16 (``vlm.to(device, dtype)``; ``load_cobra(dtype=torch.bfloat16)``); ``generate`` runs under
  ``torch.autocast("cuda", bf16)`` (cobra/models/vlms/cobra.py l.501-502, 564-565), here the vision tower and the
  projector (``COBRA_SPEC.vision_autocast``), while the language model, whose weights are bf16 already and whose
  layers are mamba_ssm's kernels, rounds as :class:`~mambaprune.models.mamba_lm.MambaMixer` says; decoding uses
  mamba_ssm's CUDA-graph cache (``use_cache=True``; cobra/models/mamba/modeling_mamba.py l.102-113), states in
  bf16 (:attr:`~mambaprune.models.mamba_lm.MambaLM.state_dtype`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Collection, Sequence

import torch

from .checkpoints import (CheckpointError, build_from_state, mamba_config_from_state, read_json,
                          split_prefixed, to_internal_keys)
from .mamba_lm import MambaLM
from .projector import MLPProjector, projector_from_state
from .registry import register_model
from .vision import (RESIZE_STRATEGIES, FusedViTTower, ViTTower, load_vit_model, random_vit_model,
                     save_vit_model)
from .vlm import MambaVLM, VLMSpec, load_tokenizer

#: image size of each supported ``vision_backbone_id``
COBRA_VISION_BACKBONES = {"dinosiglip-vit-so-384px": 384}
COBRA_LLM_BACKBONE = "mamba-2.8b-zephyr"
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."

#: ``config.json`` of the released ``cobra+3b`` run as Cobra's ``scripts/pretrain.py`` writes it (the
#: ``Cobra_3B`` model config and the ``llava-lvis4v-lrv`` dataset config of ``cobra/conf``).
COBRA_RUN_CONFIG = {
    "model": {
        "type": "cobra+3b", "model_id": "cobra+3b", "arch_specifier": "no-align+fused-gelu-mlp",
        "vision_backbone_id": "dinosiglip-vit-so-384px", "llm_backbone_id": "mamba-2.8b-zephyr",
        "image_resize_strategy": "resize-naive", "llm_max_length": 2048,
        "align_epochs": 1, "align_max_steps": None, "align_global_batch_size": 256,
        "align_per_device_batch_size": 16, "align_learning_rate": 0.001, "align_weight_decay": 0.0,
        "align_max_grad_norm": 1.0, "align_lr_scheduler_type": "linear-warmup+cosine-decay",
        "align_warmup_ratio": 0.03, "align_train_strategy": "fsdp-shard-grad-op",
        "finetune_epochs": 2, "finetune_max_steps": None, "finetune_global_batch_size": 128,
        "finetune_per_device_batch_size": 16, "finetune_learning_rate": 2e-05, "finetune_weight_decay": 0.1,
        "finetune_max_grad_norm": 1.0, "finetune_lr_scheduler_type": "linear-warmup+cosine-decay",
        "finetune_warmup_ratio": 0.03, "finetune_train_strategy": "fsdp-full-shard",
        "enable_gradient_checkpointing": True, "enable_mixed_precision_training": True,
        "reduce_in_full_precision": False,
    },
    "dataset": {
        "type": "llava-lvis4v-lrv", "dataset_id": "llava-lvis4v-lrv",
        "align_stage_components": ["download/llava-laion-cc-sbu-558k/chat.json",
                                   "download/llava-laion-cc-sbu-558k"],
        "finetune_stage_components": ["download/llava-v1.5-instruct/llava_v1_5_lvis4v_lrv_mix1231k.json",
                                      "download/llava-v1.5-instruct"],
        "dataset_root_dir": "data",
    },
    "stage": "finetune", "pretrained_checkpoint": None, "run_id": "llava-lvis4v-lrv+cobra+3b+stage-finetune+x7",
    "run_root_dir": "runs", "seed": 7, "hf_token": ".hf_token", "trackers": ["jsonl", "wandb"],
    "wandb_project": "cobra", "wandb_entity": None,
}


def zephyr_prompt(message: str) -> str:
    """One user turn of Cobra's ``ZephyrChatPromptBuilder``: ``<image>`` removed, stripped, then
    ``<|user|>\\n{message}<|endoftext|>\\n<|assistant|>\\n``."""
    message = message.replace("<image>", "").strip()
    return f"<|user|>\n{message}<|endoftext|>\n<|assistant|>\n"


def cobra_vqa_prompt(question: str) -> str:
    """Cobra's short-answer VQA prompt, byte for byte (vlm-evaluation's ``get_vqa_chat_prompt_fn``)."""
    return zephyr_prompt(f"\n{question}{VQA_SUFFIX}")


COBRA_SPEC = VLMSpec(
    name="cobra", prompt_template=cobra_vqa_prompt, max_new_tokens=128, eos_token="<|endoftext|>",
    chat_template=zephyr_prompt, protocol="cobra", vision_autocast=True,
    notes="Prompt: Cobra's ZephyrChatPromptBuilder with vlm-evaluation's VQA message. Decoding: vlm-evaluation "
          "PrismaticVLM defaults (do_sample=False, max_new_tokens=128, temperature=1.0), EOS <|endoftext|>. "
          "Vision tower and projector under torch.autocast in the model's half dtype (cobra/models/vlms/cobra.py "
          "l.501-502, 564-565).")


def dinosiglip_tower(dino: ViTTower, siglip: ViTTower) -> FusedViTTower:
    """Cobra's ``dinosiglip`` tower from its two halves (DINOv2 channels first, then SigLIP's)."""
    return FusedViTTower({"dino": dino, "siglip": siglip})


def random_dinosiglip(*, image_size: int = 384, patch_size: int = 14, dino: dict | None = None,
                      siglip: dict | None = None, seed: int = 0) -> FusedViTTower:
    """Cobra's fused tower with random weights (for tests); ``dino`` / ``siglip`` are transformers config fields
    (small by default), SigLIP with the exact GELU as Cobra ran it."""
    dino_cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=4)
    siglip_cfg = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    dino_cfg.update(dino or {})
    siglip_cfg.update(siglip or {})
    dino_model = random_vit_model("dinov2", seed=seed, image_size=image_size, patch_size=patch_size, **dino_cfg)
    siglip_model = random_vit_model("siglip", seed=seed + 1, image_size=image_size, patch_size=patch_size,
                                    hidden_act="gelu", **siglip_cfg)
    return dinosiglip_tower(ViTTower("dinov2", dino_model), ViTTower("siglip", siglip_model))


def load_dinosiglip(dino_dir, siglip_dir, *, image_size: int, resize: str) -> FusedViTTower:
    """Cobra's fused tower from the two public tower folders (local paths), both created at ``image_size``;
    SigLIP with the exact GELU of the timm model Cobra ran."""
    dino = ViTTower("dinov2", load_vit_model("dinov2", dino_dir, image_size=image_size), resize=resize)
    siglip = ViTTower("siglip", load_vit_model("siglip", siglip_dir, image_size=image_size, hidden_act="gelu"),
                      resize=resize)
    return dinosiglip_tower(dino, siglip)


def save_dinosiglip(vision: FusedViTTower, *, dino_dir=None, siglip_dir=None) -> None:
    """Write the towers of ``vision`` as their public transformers folders (SigLIP's config with the hub's
    ``gelu_pytorch_tanh``); a folder left None is not written."""
    towers = vision.towers
    if dino_dir is not None:
        save_vit_model("dinov2", towers["dino"].model, dino_dir)
    if siglip_dir is not None:
        save_vit_model("siglip", towers["siglip"].model, siglip_dir, hidden_act="gelu_pytorch_tanh")


def build_cobra(dino: ViTTower, siglip: ViTTower, projector: MLPProjector, lm: MambaLM, tokenizer) -> MambaVLM:
    """A Cobra :class:`MambaVLM` from its parts (DINOv2 channels first, then SigLIP's)."""
    return MambaVLM(dinosiglip_tower(dino, siglip), projector, lm, tokenizer, COBRA_SPEC)


def random_cobra(lm: MambaLM, tokenizer, *, image_size: int = 384, patch_size: int = 14, dino: dict | None = None,
                 siglip: dict | None = None, seed: int = 0) -> MambaVLM:
    """Cobra's architecture with random towers and projector around ``lm`` (for tests).

    ``dino`` / ``siglip`` are transformers config fields for the towers (small by default); the projector is
    the fused GELU MLP from their summed width to ``lm``'s width.
    """
    vision = random_dinosiglip(image_size=image_size, patch_size=patch_size, dino=dino, siglip=siglip, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = MLPProjector(vision.dim, lm.config.d_model)
    return MambaVLM(vision, projector, lm.eval(), tokenizer, COBRA_SPEC).eval()


def save_cobra(model: MambaVLM, run_dir, *, dino_dir=None, siglip_dir=None, tokenizer_dir=None) -> None:
    """Write ``model`` in the released layouts: the run folder (``config.json`` +
    ``checkpoints/latest-checkpoint.pt``), and optionally the towers as their public transformers folders
    (SigLIP's with the hub's ``gelu_pytorch_tanh`` in its config) and the tokenizer."""
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "config.json", "w") as f:
        json.dump(COBRA_RUN_CONFIG, f, indent=2)
    parts = {"projector": {f"projector.{k}": v.detach().cpu() for k, v in model.projector.state_dict().items()},
             "llm_backbone": {f"llm.{k}": v.detach().cpu() for k, v in model.lm.state_dict().items()}}
    torch.save({"model": parts}, run_dir / "checkpoints" / "latest-checkpoint.pt")
    save_dinosiglip(model.vision, dino_dir=dino_dir, siglip_dir=siglip_dir)
    if tokenizer_dir is not None:
        model.tokenizer.save_pretrained(str(tokenizer_dir))


def read_run_checkpoint(path, parts: Sequence[str], model: str = "Cobra") -> list[dict]:
    """The named ``parts`` of ``{"model": {part: state dict}}`` in a ``latest-checkpoint.pt`` as the Prismatic-style
    training strategies save it (Cobra's and ML-Mamba's), read with ``weights_only``; ``model`` names the file's
    model in errors. A missing part, or an entry that is not a named tensor, is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{model} checkpoint not found: {path}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted, or holding arbitrary pickled objects
        raise CheckpointError(f"cannot read the {model} checkpoint {path}: it is truncated, corrupted or not a "
                              f"weights file ({type(e).__name__}: {str(e)[:200]})") from e
    held = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(held, dict):
        layout = ", ".join(f"{name!r}: ..." for name in parts)
        raise CheckpointError(f"{path} does not hold {{'model': {{{layout}}}}}")
    states = []
    for name in parts:
        part = held.get(name)
        if not isinstance(part, dict):
            raise CheckpointError(f"{path}: missing part {name!r} under 'model' (found {sorted(held)})")
        bad = [repr(k) for k, v in part.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: part {name!r} holds entries that are not named tensors: {bad[:20]}")
        states.append(part)
    return states


def read_cobra_checkpoint(path) -> tuple[dict, dict]:
    """``(projector state, llm_backbone state)`` of a ``latest-checkpoint.pt`` (read with ``weights_only``)."""
    projector, llm = read_run_checkpoint(path, ("projector", "llm_backbone"), "Cobra")
    return projector, llm


def check_run_config(model: dict, source, llm_backbone_ids: Collection[str] | None) -> dict:
    """``model`` (the ``"model"`` section of a run's ``config.json``) checked for what the builders support: the
    ``dinosiglip`` tower, a fused GELU MLP, a known resize strategy and, unless None, one of ``llm_backbone_ids``;
    anything else is a :class:`CheckpointError` naming the field (``source``: where the section was read)."""
    checks = [("vision_backbone_id", model.get("vision_backbone_id") in COBRA_VISION_BACKBONES,
               sorted(COBRA_VISION_BACKBONES)),
              ("arch_specifier", str(model.get("arch_specifier", "")).endswith("fused-gelu-mlp"),
               ["...fused-gelu-mlp"]),
              ("image_resize_strategy", model.get("image_resize_strategy") in RESIZE_STRATEGIES,
               list(RESIZE_STRATEGIES))]
    if llm_backbone_ids is not None:
        checks.insert(1, ("llm_backbone_id", model.get("llm_backbone_id") in llm_backbone_ids,
                          sorted(llm_backbone_ids)))
    for key, ok, supported in checks:
        if not ok:
            raise CheckpointError(f"{source}: model.{key} = {model.get(key)!r} is not supported (supported: "
                                  f"{supported})")
    return model


def read_run_config(run_dir: Path, model: str = "Cobra",
                    llm_backbone_ids: Collection[str] | None = (COBRA_LLM_BACKBONE,)) -> dict:
    """The checked ``"model"`` section of ``<run_dir>/config.json`` (:func:`check_run_config`)."""
    path = run_dir / "config.json"
    cfg = read_json(path, f"the {model} run folder")
    section = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(section, dict):
        raise CheckpointError(f"{path} has no 'model' section")
    return check_run_config(section, path, llm_backbone_ids)


def fused_projector_from_state(state: dict[str, torch.Tensor], source: str) -> MLPProjector:
    """The fused GELU MLP from a saved ``FusedMLPProjector`` state: keys ``projector.{0,2,4}.*`` (the module wraps
    its ``nn.Sequential`` as ``projector``), or the bare ``{0,2,4}.*``."""
    if state and all(k.startswith("projector.") for k in state):
        state = {k[len("projector."):]: v for k, v in state.items()}
    return projector_from_state(state, source)


def resolve_dinosiglip_folders(model: str, folders: dict, dino_dir, siglip_dir, tokenizer_dir) -> tuple:
    """``(dino_dir, siglip_dir, tokenizer_dir)`` as local paths (each a path or a Hugging Face repo id,
    :func:`~mambaprune.models.hub.resolve_argument`; ``folders`` as :data:`COBRA_FOLDERS`)."""
    from .hub import TOKENIZER_FILES, WEIGHT_FOLDER, resolve_argument

    dino_dir, siglip_dir = (resolve_argument(model, arg, value, folders, allow_patterns=WEIGHT_FOLDER, weights=True)
                            for arg, value in (("dino_dir", dino_dir), ("siglip_dir", siglip_dir)))
    tokenizer_dir = resolve_argument(model, "tokenizer_dir", tokenizer_dir, folders, allow_patterns=TOKENIZER_FILES)
    return dino_dir, siglip_dir, tokenizer_dir


#: The folder arguments of :func:`load_cobra`: what each is, the public weights it holds and, where it is not simply
#: the repo's id, how to name them (for error messages: :func:`~mambaprune.models.hub.check_given`).
COBRA_FOLDERS = {
    "run_dir": ("Cobra run folder", "the cobra+3b/ folder of han1997/cobra, with config.json and "
                                    "checkpoints/latest-checkpoint.pt",
                "a local copy, or the Hugging Face repo id han1997/cobra/cobra+3b"),
    "dino_dir": ("DINOv2 tower folder", "facebook/dinov2-with-registers-large or "
                                        "timm/vit_large_patch14_reg4_dinov2.lvd142m"),
    "siglip_dir": ("SigLIP tower folder", "google/siglip-so400m-patch14-384"),
    "tokenizer_dir": ("tokenizer folder", "the tokenizer of xiuyul/mamba-2.8b-zephyr"),
}


@register_model("cobra")
def load_cobra(run_dir=None, *, dino_dir=None, siglip_dir=None, tokenizer_dir=None, dtype: torch.dtype | None = None,
               device=None) -> MambaVLM:
    """Cobra from a released run folder and the tower and tokenizer folders.

    Every folder is a local path or a Hugging Face repo id resolved through the local cache
    (:func:`~mambaprune.models.hub.resolve_folder`; an existing path always wins); only the files read are
    downloaded, and nothing is downloaded with ``HF_HUB_OFFLINE=1``.

    Args:
        run_dir: the ``cobra+3b`` folder of ``han1997/cobra`` (``config.json``, ``checkpoints/``); as a repo id
            ``han1997/cobra/cobra+3b``.
        dino_dir: DINOv2 ViT-L/14 with 4 registers: transformers ``facebook/dinov2-with-registers-large``, or
            timm ``timm/vit_large_patch14_reg4_dinov2.lvd142m``.
        siglip_dir: SigLIP so400m/14 at 384 px: transformers ``google/siglip-so400m-patch14-384``, or
            weights with the names of timm's ``vit_so400m_patch14_siglip_384`` state dict.
        tokenizer_dir: the GPT-NeoX tokenizer Cobra loads with its LLM (``xiuyul/mamba-2.8b-zephyr``).
        dtype, device: where to put the model (e.g. ``torch.bfloat16``, ``"cuda"``); default fp32 on the CPU.
            Every tensor is converted, ``A_log`` and ``D`` included, as Cobra's evaluation converts the loaded
            model (h-zhao1997/vlm-evaluation ``vlm_eval/models/cobra.py`` l.59-60).

    A folder left out or not found is a :class:`CheckpointError` naming it and the public weights it takes.
    """
    from .hub import check_given, resolve_argument

    check_given("cobra", COBRA_FOLDERS, dict(run_dir=run_dir, dino_dir=dino_dir, siglip_dir=siglip_dir,
                                             tokenizer_dir=tokenizer_dir))
    run_dir = resolve_argument("cobra", "run_dir", run_dir, COBRA_FOLDERS,
                               allow_patterns=["config.json", "checkpoints/latest-checkpoint.pt",
                                               "*/config.json"])     # the hint below: run folders one level down
    dino_dir, siglip_dir, tokenizer_dir = resolve_dinosiglip_folders("cobra", COBRA_FOLDERS, dino_dir, siglip_dir,
                                                                     tokenizer_dir)
    if not (run_dir / "config.json").is_file():
        runs = sorted(p.parent.name for p in run_dir.glob("*/config.json")) if run_dir.is_dir() else []
        hint = f"; the run folders inside it: {', '.join(runs)} (give one of them)" if runs else ""
        raise CheckpointError(f"{run_dir} is not a Cobra run folder: no config.json{hint} (expected: "
                              f"{COBRA_FOLDERS['run_dir'][1]}; {COBRA_FOLDERS['run_dir'][2]})")
    model_cfg = read_run_config(run_dir)
    ckpt = run_dir / "checkpoints" / "latest-checkpoint.pt"
    projector_state, llm_state = read_cobra_checkpoint(ckpt)
    projector = fused_projector_from_state(projector_state, f"{ckpt} (model.projector)")
    source = f"{ckpt} (model.llm_backbone)"
    llm_state = to_internal_keys(split_prefixed(llm_state, ["llm."], source)["llm."])
    lm = build_from_state(MambaLM, mamba_config_from_state(llm_state, source), llm_state, source)
    vision = load_dinosiglip(dino_dir, siglip_dir, image_size=COBRA_VISION_BACKBONES[model_cfg["vision_backbone_id"]],
                             resize=model_cfg["image_resize_strategy"])
    model = MambaVLM(vision, projector, lm, load_tokenizer(tokenizer_dir), COBRA_SPEC)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
