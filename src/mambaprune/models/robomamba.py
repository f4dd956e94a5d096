"""RoboMamba (Liu et al., 2024; code ``lmzpai/roboMamba``), the released CLIP224 + mamba-2.8b model.

What the released code does (``src/model/{vision,vlm,llm}.py``, ``src/test.py``), and what this builder
reproduces:

* **Vision**: timm ``vit_large_patch14_clip_224.openai`` (QuickGELU), ``get_intermediate_layers(n={depth - 2})``:
  the second-to-last block, CLS dropped, 16 x 16 = 256 tokens x 1024. Here transformers' ``CLIPVisionModel``
  (``openai/clip-vit-large-patch14`` holds the same OpenAI weights).
* **Images**: timm's eval transform at 224 px: bicubic resize of the shorter side to 224, centre crop
  224 x 224 (``resize-crop``), OpenAI CLIP mean/std.
* **Projector** ``Projector.projector`` (an ``nn.Sequential``): Linear 1024 -> 4096, GELU, Linear 4096 -> 2560, GELU,
  Linear 2560 -> 2560.
* **LLM**: ``state-spaces/mamba-2.8b-hf`` (transformers names; ``lm_head`` tied to the embedding). Its tokenizer
  (GPT-NeoX) comes from the same repository.
* **Checkpoint**: one file that ``test.py`` loads with ``model.load_state_dict(torch.load(ckpt), strict=False)``
  into ``LinearVLM``, i.e. a flat dict with ``LinearVLM``'s keys: ``vision.model.<timm CLIP names>``,
  ``llm.mamba.<transformers Mamba names>`` (``backbone.embeddings.weight``, ``backbone.layers.{i}.{norm,mixer.*}``,
  ``backbone.norm_f.weight``, ``lm_head.weight``) and ``projector.projector.{0,2,4}.{weight,bias}``. Because of
  ``strict=False`` the vision and LLM tensors may be absent from the file, the pretrained ones then stay: here
  the pretrained ones come from ``clip_dir`` / ``llm_dir`` and the checkpoint's tensors are laid over them.
  Any other key is an error.
* **Prompt** (``test.py``): ``"<image>Question:{question} Answer:"``. The text ``<image>`` is part of the
  prompt: it is not a token of the GPT-NeoX tokenizer, and ``LinearVLM.encode`` puts the image features in front
  of all the text. No BOS.
* **Decoding**: ``test.py`` asks for ``do_sample=True, temperature=0.4``, but RoboMamba's ``GenerationMixin`` keeps
  ``top_k=1`` (its default), and ``top_k == 1`` short-circuits to argmax: decoding is greedy. The budget is set
  per benchmark (:data:`ROBOMAMBA_TASK_MAX_NEW_TOKENS`). ``test.py`` passes no ``eos_token_id``, so the released
  loop always runs the whole budget and ``batch_decode`` drops the EOS tokens; here decoding stops at
  ``<|endoftext|>`` and the answer is the text before it.
* **Precision** (``test.py``): the whole model, ``A_log`` and ``D`` included, in bf16 (fp16 without bf16
  support), ``model.to(device, dtype)`` (l.409; ``load_robomamba(dtype=torch.bfloat16)``), and generation under
  ``torch.autocast("cuda", dtype)`` (l.370-372), here the vision tower and the projector
  (``ROBOMAMBA_SPEC.vision_autocast``); the language model is mamba_ssm's modules (``src/model/my_mamba``: fused
  add+norm, residual in fp32) and rounds as :class:`~mambaprune.models.mamba_lm.MambaMixer` says; decoding uses
  the CUDA-graph cache (``cg=True``, ``src/model/vlm.py`` l.97), states in the model's dtype.
"""
from __future__ import annotations

import torch

from .checkpoints import (CheckpointError, build_from_state, load_mamba_lm, mamba_config_from_state, overlay_state_,
                          read_state_file, save_mamba_lm, split_prefixed, to_internal_keys)
from .mamba_lm import MambaLM
from .projector import MLPProjector, projector_from_state
from .registry import register_model
from .vision import ViTTower, load_vit_model, model_from_timm, random_vit_model, save_vit_model, \
    timm_to_transformers, transformers_to_timm
from .vlm import MambaVLM, VLMSpec, load_tokenizer

#: ``max_new_tokens`` that ``test.py`` uses per benchmark
ROBOMAMBA_TASK_MAX_NEW_TOKENS = {"pope": 2, "vqav2": 16, "gqa": 256, "vizwiz": 64, "okvqa": 64, "robovqa": 128,
                                 "manip": 32}
VISION_PREFIX, LLM_PREFIX, PROJECTOR_PREFIX = "vision.model.", "llm.mamba.", "projector.projector."

ROBOMAMBA_SPEC = VLMSpec(
    name="robomamba", prompt_template="<image>Question:{question} Answer:", max_new_tokens=128,
    chat_template="<image>Question:{message} Answer:", protocol="robomamba",
    task_max_new_tokens=ROBOMAMBA_TASK_MAX_NEW_TOKENS, eos_token="<|endoftext|>", vision_autocast=True,
    notes="Prompt and budgets: RoboMamba's src/test.py. Greedy: its GenerationMixin keeps top_k=1 although "
          "test.py passes do_sample=True, temperature=0.4. Stops at <|endoftext|> (the released loop does not). "
          "Vision tower and projector under torch.autocast in the model's half dtype (src/test.py l.370-372).")


def build_robomamba(clip: ViTTower, projector: MLPProjector, lm: MambaLM, tokenizer) -> MambaVLM:
    """A RoboMamba :class:`MambaVLM` from its parts."""
    return MambaVLM(clip, projector, lm, tokenizer, ROBOMAMBA_SPEC)


def random_robomamba(lm: MambaLM, tokenizer, *, image_size: int = 224, patch_size: int = 14,
                     clip: dict | None = None, seed: int = 0) -> MambaVLM:
    """RoboMamba's architecture with a random CLIP tower and projector around ``lm`` (for tests)."""
    clip_cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    hidden_act="quick_gelu")
    clip_cfg.update(clip or {})
    clip_model = random_vit_model("clip", seed=seed, image_size=image_size, patch_size=patch_size, **clip_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = MLPProjector(clip_model.config.hidden_size, lm.config.d_model)
    return build_robomamba(ViTTower("clip", clip_model, resize="resize-crop"), projector, lm.eval(),
                           tokenizer).eval()


def robomamba_state_dict(model: MambaVLM, include_vision: bool = True,
                         include_llm: bool = True) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the names of RoboMamba's ``LinearVLM`` (the released checkpoint's keys);
    the vision and LLM parts may be left out, as a ``strict=False`` checkpoint may leave them out."""
    state = {f"{PROJECTOR_PREFIX}{k}": v for k, v in model.projector.state_dict().items()}
    if include_vision:
        timm = transformers_to_timm("clip", model.vision.model.state_dict())
        state.update({f"{VISION_PREFIX}{k}": v for k, v in timm.items()})
    if include_llm:
        state.update({f"{LLM_PREFIX}{k.replace('backbone.embedding.', 'backbone.embeddings.', 1)}": v
                      for k, v in model.lm.state_dict().items()})
    return {k: v.detach().cpu() for k, v in state.items()}


def save_robomamba(model: MambaVLM, checkpoint, *, include_vision: bool = True, include_llm: bool = True,
                   clip_dir=None, llm_dir=None, tokenizer_dir=None) -> None:
    """Write ``model`` in the released layouts: the checkpoint file (:func:`robomamba_state_dict`), and
    optionally CLIP as ``openai/clip-vit-large-patch14`` is laid out, the LLM as a transformers Mamba folder
    (``state-spaces/mamba-2.8b-hf``) and the tokenizer."""
    torch.save(robomamba_state_dict(model, include_vision, include_llm), str(checkpoint))
    if clip_dir is not None:
        save_vit_model("clip", model.vision.model, clip_dir)
    if llm_dir is not None:
        save_mamba_lm(model.lm, llm_dir)
    if tokenizer_dir is not None:
        model.tokenizer.save_pretrained(str(tokenizer_dir))


#: The path arguments of :func:`load_robomamba`: what each is, the public weights it holds and, where it is not
#: simply the repo's id, how to name them (for error messages: :func:`~mambaprune.models.hub.check_given`).
ROBOMAMBA_FOLDERS = {
    "checkpoint": ("RoboMamba checkpoint", "the released .pth file linked from lmzpai/roboMamba's README "
                                           "(CLIP224+Mamba2.8b)",
                   "a local file, or owner/name/<file> for a file in a Hugging Face repo"),
    "clip_dir": ("CLIP tower folder", "openai/clip-vit-large-patch14"),
    "llm_dir": ("language-model folder", "state-spaces/mamba-2.8b-hf"),
    "tokenizer_dir": ("tokenizer folder", "the tokenizer of state-spaces/mamba-2.8b-hf"),
}


@register_model("robomamba")
def load_robomamba(checkpoint=None, *, clip_dir=None, llm_dir=None, tokenizer_dir=None, clip_num_heads: int = 16,
                   dtype: torch.dtype | None = None, device=None) -> MambaVLM:
    """RoboMamba from its released checkpoint file and the pretrained folders.

    Every folder is a local path or a Hugging Face repo id resolved through the local cache
    (:func:`~mambaprune.models.hub.resolve_folder`; an existing path always wins; the checkpoint may be a file in
    a repo, ``owner/name/file.pth``); only the files read are downloaded, nothing with ``HF_HUB_OFFLINE=1``.

    Args:
        checkpoint: the released ``.pth`` file (flat dict, ``LinearVLM`` key names).
        clip_dir: CLIP ViT-L/14 (transformers ``openai/clip-vit-large-patch14``, or timm layout); needed unless
            the checkpoint holds the vision tensors. Tensors in the checkpoint override it.
        llm_dir: ``state-spaces/mamba-2.8b-hf``; needed unless the checkpoint holds the LLM tensors, which
            override it.
        tokenizer_dir: the tokenizer folder; default ``llm_dir`` (the hub repository holds the tokenizer).
        clip_num_heads: attention heads of the CLIP tower when it is built from the checkpoint's tensors alone
            (the tensors do not show it; ViT-L/14 has 16).
        dtype, device: where to put the model; default fp32 on the CPU. Every tensor is converted, ``A_log``
            and ``D`` included, as ``test.py`` converts the loaded model (l.409).

    A path left out or not found is a :class:`CheckpointError` naming it and the public weights it takes.
    """
    from .hub import TOKENIZER_FILES, WEIGHT_FOLDER, check_given, resolve_argument

    check_given("robomamba", {"checkpoint": ROBOMAMBA_FOLDERS["checkpoint"]}, {"checkpoint": checkpoint})
    checkpoint = resolve_argument("robomamba", "checkpoint", checkpoint, ROBOMAMBA_FOLDERS, allow_patterns=())
    if tokenizer_dir is None and llm_dir is None:
        raise ValueError("give tokenizer_dir or llm_dir (RoboMamba's tokenizer is the one of "
                         "state-spaces/mamba-2.8b-hf: a local folder or that Hugging Face repo id)")
    if clip_dir is not None:
        clip_dir = resolve_argument("robomamba", "clip_dir", clip_dir, ROBOMAMBA_FOLDERS,
                                    allow_patterns=WEIGHT_FOLDER, weights=True)
    if llm_dir is not None:
        llm_dir = resolve_argument("robomamba", "llm_dir", llm_dir, ROBOMAMBA_FOLDERS,
                                   allow_patterns=WEIGHT_FOLDER + TOKENIZER_FILES, weights=True)
    if tokenizer_dir is not None:
        tokenizer_dir = resolve_argument("robomamba", "tokenizer_dir", tokenizer_dir, ROBOMAMBA_FOLDERS,
                                         allow_patterns=TOKENIZER_FILES)
    parts = split_prefixed(read_state_file(checkpoint), [VISION_PREFIX, LLM_PREFIX, PROJECTOR_PREFIX],
                           str(checkpoint))
    if not parts[PROJECTOR_PREFIX]:
        raise CheckpointError(f"{checkpoint} holds no projector tensors ({PROJECTOR_PREFIX}*)")
    projector = projector_from_state(parts[PROJECTOR_PREFIX], str(checkpoint))

    vision_state, source = parts[VISION_PREFIX], f"{checkpoint} ({VISION_PREFIX}*)"
    if clip_dir is not None:
        clip_model = load_vit_model("clip", clip_dir)
        if vision_state:
            overlay_state_(clip_model, timm_to_transformers(
                "clip", vision_state, num_blocks=clip_model.config.num_hidden_layers, partial=True, source=source),
                source)
    elif vision_state:
        clip_model = model_from_timm("clip", vision_state, num_heads=clip_num_heads, source=source)
    else:
        raise CheckpointError(f"{checkpoint} holds no CLIP tensors ({VISION_PREFIX}*); give clip_dir "
                              f"({ROBOMAMBA_FOLDERS['clip_dir'][1]}: a local folder or that Hugging Face repo id)")

    llm_state, source = to_internal_keys(parts[LLM_PREFIX]), f"{checkpoint} ({LLM_PREFIX}*)"
    if llm_dir is not None:
        lm = load_mamba_lm(llm_dir)
        if llm_state:
            overlay_state_(lm, llm_state, source)
    elif llm_state:
        lm = build_from_state(MambaLM, mamba_config_from_state(llm_state, source), llm_state, source)
    else:
        raise CheckpointError(f"{checkpoint} holds no language-model tensors ({LLM_PREFIX}*); give llm_dir "
                              f"({ROBOMAMBA_FOLDERS['llm_dir'][1]}: a local folder or that Hugging Face repo id)")

    tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir is not None else llm_dir)
    model = build_robomamba(ViTTower("clip", clip_model, resize="resize-crop"), projector, lm, tokenizer)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
