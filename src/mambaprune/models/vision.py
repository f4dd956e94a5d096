"""Vision towers: transformers' ViTs turned into the patch features a Mamba MLLM feeds its projector.

Every tower follows one small protocol (:class:`VisionTower`):

* ``preprocess(images)`` -> pixels: PIL images or image paths (one, or a list) are loaded as RGB, resized and
  normalised with the tower's own mean/std; an already prepared pixel tensor (or, for a fused tower, a dict of
  them) is checked and passed through;
* ``forward(pixels)`` -> ``(batch, num_tokens, dim)`` patch features, row-major over ``grid``;
* ``grid`` (rows, cols) of patches, ``num_tokens`` = rows * cols, ``dim``, ``image_size``;
* ``display(pixels)`` -> ``(batch, 3, image_size, image_size)`` in [0, 1], the picture the tower saw (for plots).

Two towers exist:

* :class:`ViTTower`, one transformers vision model: ``Dinov2WithRegistersModel`` (kind ``"dinov2"``),
  ``SiglipVisionModel`` (``"siglip"``) or ``CLIPVisionModel`` (``"clip"``). The features are the hidden states of
  one block (by default the second-to-last, ``feature_layer=-2``, as both released MLLMs take them through timm's
  ``get_intermediate_layers(n={depth - 2})``) with the prefix tokens dropped (CLS and registers for DINOv2, CLS
  for CLIP, none for SigLIP). RoboMamba uses one CLIP tower.
* :class:`FusedViTTower`, several towers on the same grid whose features are concatenated on channels: Cobra's
  "dinosiglip" tower, DINOv2 (1024) + SigLIP (1152) = 2176 channels, 27 x 27 = 729 tokens at 384 px.

Images are resized as the released code does through torchvision on PIL images (bicubic):
``"resize-naive"`` (Cobra: straight to ``image_size x image_size``, aspect ratio not kept) or ``"resize-crop"``
(timm's default eval transform, used by RoboMamba: shorter side to ``image_size``, then a centre crop), then
divided by 255 and normalised.

Weights are read from local folders only (:func:`load_vit_model`): a transformers folder (``config.json`` +
weights, e.g. ``facebook/dinov2-with-registers-large``; a full SigLIP/CLIP dual-encoder folder is fine, its
text half is skipped), or timm-layout weights (a timm folder whose ``config.json`` has ``"architecture"``, or a
bare ``.safetensors``/``.pth`` file) mapped to transformers names by :func:`timm_to_transformers`. The timm
mapping targets the parameter names of transformers >= 5 (checked with 5.23).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .checkpoints import CheckpointError, load_state_checked, read_folder_weights, read_json, read_state_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Image resize strategies, named as Cobra's ``image_resize_strategy``.
RESIZE_STRATEGIES = ("resize-naive", "resize-crop")

#: Keys of the text half of a dual-encoder (SigLIP / CLIP) checkpoint; a vision tower skips them.
_TEXT_SIDE_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


@dataclass(frozen=True)
class TowerKind:
    """What differs between the supported ViT families: transformers classes, normalisation, and the
    LayerNorm epsilon and MLP activation of the timm models the released MLLMs ran."""

    model_class: str
    config_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    timm_eps: float
    timm_act: str


TOWER_KINDS = {
    "dinov2": TowerKind("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", IMAGENET_MEAN, IMAGENET_STD,
                        1e-6, "gelu"),
    "siglip": TowerKind("SiglipVisionModel", "SiglipVisionConfig", SIGLIP_MEAN, SIGLIP_STD, 1e-6, "gelu"),
    "clip": TowerKind("CLIPVisionModel", "CLIPVisionConfig", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 1e-5,
                      "quick_gelu"),
}


def tower_kind(kind: str) -> TowerKind:
    if kind not in TOWER_KINDS:
        raise ValueError(f"unknown vision tower kind {kind!r}; known: {sorted(TOWER_KINDS)}")
    return TOWER_KINDS[kind]


def _transformers_class(name: str):
    import transformers

    return getattr(transformers, name)


def num_prefix_tokens(kind: str, config) -> int:
    """Tokens before the patches in the tower's hidden states: CLS + registers (DINOv2), CLS (CLIP), none (SigLIP)."""
    tower_kind(kind)
    if kind == "dinov2":
        return 1 + config.num_register_tokens
    return 1 if kind == "clip" else 0


# ------------------------------------------------------------------------------------------------ images
def load_image(image) -> Image.Image:
    """A PIL image in RGB from a PIL image or a path."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except OSError as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"cannot read image {path}: {e}") from e
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    raise ValueError(f"an image must be a PIL image, a path, or a prepared pixel tensor; got {type(image).__name__}")


def resize_image(image: Image.Image, size: int, strategy: str) -> Image.Image:
    """``size x size`` bicubic resize as torchvision does on PIL images.

    ``"resize-naive"``: ``Resize((size, size))``. ``"resize-crop"``: ``Resize(size)`` (shorter side to ``size``,
    longer side ``int(size * long / short)``) then ``CenterCrop(size)`` (offsets ``int(round((extent - size) / 2))``).
    """
    if strategy not in RESIZE_STRATEGIES:
        raise ValueError(f"unknown resize strategy {strategy!r}; known: {RESIZE_STRATEGIES}")
    bicubic = Image.Resampling.BICUBIC
    if strategy == "resize-naive":
        return image.resize((size, size), bicubic)
    w, h = image.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((new_w, new_h), bicubic)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], as torchvision's ``ToTensor``."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def as_image_list(images) -> list:
    """One image (PIL image or path) or a non-empty list/tuple of them, as a list."""
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, (list, tuple)) and len(images) > 0:
        return list(images)
    raise ValueError(f"images must be a PIL image, a path, a prepared pixel tensor, or a non-empty list of "
                     f"images; got {type(images).__name__}")


def pixel_batch_size(pixels) -> int:
    """Batch size of prepared pixels (a tensor, or a dict of tensors for a fused tower)."""
    if isinstance(pixels, dict):
        return next(iter(pixels.values())).shape[0]
    return pixels.shape[0]


# ------------------------------------------------------------------------------------------------ towers
class VisionTower(Protocol):
    """What :class:`~mambaprune.models.vlm.MambaVLM` needs from a vision tower (see the module docstring)."""

    image_size: int
    grid: tuple[int, int]
    num_tokens: int
    dim: int

    def preprocess(self, images): ...

    def __call__(self, pixels) -> torch.Tensor: ...

    def display(self, pixels) -> torch.Tensor: ...


class PixelTower(nn.Module):
    """Pixel handling and the patch grid shared by the towers: subclasses give ``image_size``, ``patch_size``,
    ``resize`` (a strategy of :data:`RESIZE_STRATEGIES`), ``pixel_stats`` (per-channel mean and std) and
    ``pixel_owner`` (for messages)."""

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size  # a patch convolution drops a remainder (384 px / 14 -> 27)
        return side, side

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def _stats(self):
        mean, std = self.pixel_stats
        return (torch.tensor(mean, dtype=torch.float32)[:, None, None],
                torch.tensor(std, dtype=torch.float32)[:, None, None])

    def prepare_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(batch, 3, s, s) normalised pixels from RGB PIL images."""
        mean, std = self._stats()
        return torch.stack([(image_to_tensor(resize_image(im, self.image_size, self.resize)) - mean) / std
                            for im in images])

    def check_pixels(self, pixels) -> torch.Tensor:
        """A prepared (3, s, s) or (batch, 3, s, s) float tensor, as (batch, 3, s, s)."""
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise ValueError(f"prepared pixels for {self.pixel_owner} must be a float tensor, got "
                             f"{type(pixels).__name__}")
        if pixels.dim() == 3:
            pixels = pixels[None]
        s = self.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s) or pixels.shape[0] == 0:
            raise ValueError(f"prepared pixels for {self.pixel_owner} must be (batch, 3, {s}, {s}), "
                             f"got {tuple(pixels.shape)}")
        return pixels

    def preprocess(self, images) -> torch.Tensor:
        """(batch, 3, s, s) normalised pixels from image(s) or paths; a prepared tensor is checked and returned."""
        if isinstance(images, torch.Tensor):
            return self.check_pixels(images)
        return self.prepare_images([load_image(im) for im in as_image_list(images)])

    def display(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels back to (batch, 3, s, s) in [0, 1]."""
        mean, std = self._stats()
        pixels = self.check_pixels(pixels).detach().float().cpu()
        return (pixels * std + mean).clamp(0, 1)


class ViTTower(PixelTower):
    """One transformers ViT giving the hidden states of block ``feature_layer`` without the prefix tokens.

    Args:
        kind: ``"dinov2"``, ``"siglip"`` or ``"clip"`` (sets the normalisation and the prefix tokens).
        model: the transformers vision model of that kind; its ``config.image_size`` is the input size.
        resize: ``"resize-naive"`` or ``"resize-crop"`` (see :func:`resize_image`).
        feature_layer: index into the model's ``hidden_states`` (embeddings, then each block's output);
            ``-2`` is the output of the second-to-last block.
    """

    def __init__(self, kind: str, model: nn.Module, resize: str = "resize-naive", feature_layer: int = -2):
        super().__init__()
        self.kind = kind
        self.info = tower_kind(kind)
        if resize not in RESIZE_STRATEGIES:
            raise ValueError(f"unknown resize strategy {resize!r}; known: {RESIZE_STRATEGIES}")
        cfg = model.config
        depth = cfg.num_hidden_layers
        if not -(depth + 1) <= feature_layer <= depth:
            raise ValueError(f"feature_layer {feature_layer} is outside the {depth + 1} hidden states of a "
                             f"{depth}-block tower")
        if cfg.image_size < cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is smaller than the patch size {cfg.patch_size}")
        self.model = model
        self.resize = resize
        self.feature_layer = feature_layer

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_prefix_tokens(self) -> int:
        return num_prefix_tokens(self.kind, self.model.config)

    @property
    def pixel_stats(self) -> tuple[Sequence[float], Sequence[float]]:
        return self.info.mean, self.info.std

    @property
    def pixel_owner(self) -> str:
        return f"the {self.kind} tower"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(batch, num_tokens, dim): block ``feature_layer``'s hidden states of the patch tokens (row-major).

        The whole tower runs (transformers returns every block's hidden states); the blocks after
        ``feature_layer`` do not change the result.
        """
        pixels = self.check_pixels(pixels)
        param = next(self.model.parameters())
        out = self.model(pixel_values=pixels.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
        hidden = out.hidden_states[self.feature_layer]
        expected = self.num_prefix_tokens + self.num_tokens
        if hidden.shape[1] != expected:
            raise ValueError(f"the {self.kind} tower gave {hidden.shape[1]} tokens, expected {expected} "
                             f"({self.num_prefix_tokens} prefix + {self.num_tokens} patches)")
        return hidden[:, self.num_prefix_tokens:]


class FusedViTTower(nn.Module):
    """Several :class:`ViTTower` on the same grid; features concatenated on channels in the given order.

    Pixels are a dict ``{name: (batch, 3, s, s)}``, one entry per tower, each with that tower's normalisation.
    """

    def __init__(self, towers: dict[str, ViTTower]):
        super().__init__()
        if not towers:
            raise ValueError("a fused tower needs at least one tower")
        grids = {name: (t.grid, t.image_size) for name, t in towers.items()}
        if len(set(grids.values())) != 1:
            raise ValueError(f"fused towers must share the image size and patch grid, got {grids}")
        self.towers = nn.ModuleDict(towers)

    def _first(self) -> ViTTower:
        return next(iter(self.towers.values()))

    @property
    def image_size(self) -> int:
        return self._first().image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self._first().grid

    @property
    def num_tokens(self) -> int:
        return self._first().num_tokens

    @property
    def dim(self) -> int:
        return sum(t.dim for t in self.towers.values())

    def check_pixels(self, pixels) -> dict[str, torch.Tensor]:
        if not isinstance(pixels, dict):
            raise ValueError(f"prepared pixels for a fused tower must be a dict {{name: tensor}} with keys "
                             f"{list(self.towers)}, got {type(pixels).__name__}")
        if set(pixels) != set(self.towers):
            raise ValueError(f"prepared pixels have keys {sorted(pixels)}, the fused tower needs {list(self.towers)}")
        out = {name: tower.check_pixels(pixels[name]) for name, tower in self.towers.items()}
        if len({v.shape[0] for v in out.values()}) != 1:
            raise ValueError(f"prepared pixels disagree on the batch size: "
                             f"{ {k: v.shape[0] for k, v in out.items()} }")
        return out

    def preprocess(self, images) -> dict[str, torch.Tensor]:
        """``{name: (batch, 3, s, s)}``: each image loaded once, then resized and normalised per tower."""
        if isinstance(images, (torch.Tensor, dict)):
            return self.check_pixels(images)
        loaded = [load_image(im) for im in as_image_list(images)]
        return {name: tower.prepare_images(loaded) for name, tower in self.towers.items()}

    def forward(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = self.check_pixels(pixels)
        return torch.cat([tower(pixels[name]) for name, tower in self.towers.items()], dim=-1)

    def display(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        name, tower = next(iter(self.towers.items()))
        return tower.display(self.check_pixels(pixels)[name])


# ------------------------------------------------------------------------------------------------ weights
def random_vit_model(kind: str, *, seed: int = 0, **config) -> nn.Module:
    """A transformers vision model of ``kind`` built from ``config`` (its config class's fields) with every
    parameter drawn from a seeded generator (so no two tensors share a value pattern), in eval mode."""
    info = tower_kind(kind)
    cfg = _transformers_class(info.config_class)(**config)
    with torch.random.fork_rng(devices=[]):
        model = _transformers_class(info.model_class)(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2 and name.endswith("weight"):
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith(("weight", "lambda1")):  # LayerNorm scales, DINOv2's layer scales
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def resample_dinov2_positions_(model: nn.Module, image_size: int) -> None:
    """Resize a DINOv2 model's patch position embeddings to ``image_size`` in place (config updated).

    Bicubic with antialiasing in fp32, the class position kept: what timm's ``resample_abs_pos_embed`` does
    when Cobra creates the 518-px DINOv2 at 384 px (37 x 37 -> 27 x 27 positions).
    """
    cfg = model.config
    if image_size < cfg.patch_size:
        raise ValueError(f"image_size {image_size} is smaller than the patch size {cfg.patch_size}")
    emb = model.embeddings
    old = emb.position_embeddings.data
    dim, old_side, new_side = old.shape[-1], math.isqrt(old.shape[1] - 1), image_size // cfg.patch_size
    patch = old[:, 1:].float().reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(new_side, new_side), mode="bicubic", antialias=True, align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, new_side * new_side, dim).to(old.dtype)
    emb.position_embeddings = nn.Parameter(torch.cat([old[:, :1], patch], dim=1))
    emb.patch_embeddings.image_size = (image_size, image_size)
    emb.patch_embeddings.num_patches = new_side * new_side
    cfg.image_size = image_size


def _from_transformers_folder(kind: str, folder: Path, overrides: dict) -> nn.Module:
    cls = _transformers_class(tower_kind(kind).model_class)
    try:
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, local_files_only=True,
                                          dtype=torch.float32, **overrides)
    except Exception as e:  # truncated or corrupted weights, mis-shaped tensors, unreadable config
        raise CheckpointError(f"cannot load the {kind} tower from {folder}: {type(e).__name__}: {str(e)[:400]}") from e
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.startswith(_TEXT_SIDE_PREFIXES))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    problems = [f"{what} {keys[:20]}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mismatched)) if keys]
    if problems:
        raise CheckpointError(f"cannot load the {kind} tower from {folder}: " + "; ".join(problems))
    return model


def load_vit_model(kind: str, path, *, image_size: int | None = None, num_heads: int = 16,
                   **config_overrides) -> nn.Module:
    """The transformers vision model of ``kind`` from a local transformers folder or timm-layout weights.

    ``path`` (a local path, or a Hugging Face repo id: :func:`~mambaprune.models.hub.resolve_folder`) is a
    transformers folder (``config.json`` + weights; a SigLIP/CLIP dual-encoder folder loads its
    vision half), a timm folder (``config.json`` with ``"architecture"``, weights in ``model.safetensors`` or
    ``pytorch_model.bin``), or a timm weights file. For timm weights the architecture is read from the tensor
    shapes except the number of heads: ``model_args.num_heads`` of the timm config if given, else ``num_heads``
    (16 for all three released towers). ``config_overrides`` replace config fields (e.g. ``hidden_act``).
    ``image_size`` other than the checkpoint's resamples DINOv2's position embeddings
    (:func:`resample_dinov2_positions_`); the other kinds must be used at their own size.
    Every tensor is checked: a missing, unexpected or mis-shaped one raises :class:`CheckpointError`.
    """
    from .hub import WEIGHT_FOLDER, resolve_folder

    tower_kind(kind)
    path = resolve_folder(path, allow_patterns=WEIGHT_FOLDER, weights=True, what=f"{kind} tower")
    if path.is_file():
        model = model_from_timm(kind, read_state_file(path), num_heads=num_heads, source=str(path),
                                **config_overrides)
    elif path.is_dir():
        cfg = read_json(path / "config.json", f"the {kind} tower folder")
        if isinstance(cfg, dict) and "architecture" in cfg:  # timm's hub config
            heads = (cfg.get("model_args") or {}).get("num_heads", num_heads)
            model = model_from_timm(kind, read_folder_weights(path), num_heads=heads, source=str(path),
                                    **config_overrides)
        else:
            model = _from_transformers_folder(kind, path, config_overrides)
    else:
        raise CheckpointError(f"{kind} tower weights not found: {path}")
    if image_size is not None and image_size != model.config.image_size:
        if kind != "dinov2":
            raise ValueError(f"the {kind} tower at {path} is for {model.config.image_size} px, asked for "
                             f"{image_size} px; only DINOv2 position embeddings are resampled")
        resample_dinov2_positions_(model, image_size)
    return model.eval()


def save_vit_model(kind: str, model: nn.Module, folder, **config_overrides) -> None:
    """Write ``model`` laid out as the public transformers checkpoints are: DINOv2 as a
    ``Dinov2WithRegistersModel`` folder (as ``facebook/dinov2-with-registers-large``); SigLIP and CLIP as a
    dual-encoder folder (``SiglipModel`` / ``CLIPModel``, as ``google/siglip-so400m-patch14-384`` and
    ``openai/clip-vit-large-patch14``) whose text half is small and random. ``config_overrides`` are written
    into the vision config (e.g. the released ``hidden_act``)."""
    tower_kind(kind)
    vision_config = {**model.config.to_dict(), **config_overrides}
    with torch.random.fork_rng(devices=[]):
        if kind == "dinov2":
            out = _transformers_class("Dinov2WithRegistersModel")(
                _transformers_class("Dinov2WithRegistersConfig")(**vision_config))
            target = out
        else:
            prefix = "Siglip" if kind == "siglip" else "CLIP"
            text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=64)
            out = _transformers_class(f"{prefix}Model")(
                _transformers_class(f"{prefix}Config")(vision_config=vision_config, text_config=text))
            target = out.vision_model
    target.load_state_dict(model.state_dict())
    out.save_pretrained(str(folder))


# ------------------------------------------------------------------------------------------------ timm layout
@dataclass(frozen=True)
class _Rule:
    """timm tensors <-> transformers tensors, with the functions converting each way."""

    timm: tuple[str, ...]
    hf: tuple[str, ...]
    to_hf: Callable[..., tuple]
    to_timm: Callable[..., tuple]


def _same(*xs):
    return xs


def _renames(timm_prefix: str, hf_prefix: str, params=("weight", "bias")) -> list[_Rule]:
    return [_Rule((f"{timm_prefix}.{p}",), (f"{hf_prefix}.{p}",), _same, _same) for p in params]


def _qkv_rules(timm_prefix: str, hf_prefixes: tuple[str, str, str]) -> list[_Rule]:
    """timm's fused ``qkv`` (rows q, k, v) <-> three projections."""
    return [_Rule((f"{timm_prefix}.{p}",), tuple(f"{h}.{p}" for h in hf_prefixes),
                  lambda x: tuple(x.chunk(3, dim=0)), lambda q, k, v: (torch.cat([q, k, v], dim=0),))
            for p in ("weight", "bias")]


def _block_rules(kind: str, i: int) -> list[_Rule]:
    t = f"blocks.{i}"
    if kind == "dinov2":
        h = f"encoder.layer.{i}"
        return (_renames(f"{t}.norm1", f"{h}.norm1")
                + _qkv_rules(f"{t}.attn.qkv", (f"{h}.attention.q_proj", f"{h}.attention.k_proj",
                                               f"{h}.attention.v_proj"))
                + _renames(f"{t}.attn.proj", f"{h}.attention.o_proj")
                + [_Rule((f"{t}.ls1.gamma",), (f"{h}.layer_scale1.lambda1",), _same, _same),
                   _Rule((f"{t}.ls2.gamma",), (f"{h}.layer_scale2.lambda1",), _same, _same)]
                + _renames(f"{t}.norm2", f"{h}.norm2")
                + _renames(f"{t}.mlp.fc1", f"{h}.mlp.fc1") + _renames(f"{t}.mlp.fc2", f"{h}.mlp.fc2"))
    h = f"encoder.layers.{i}"
    return (_renames(f"{t}.norm1", f"{h}.layer_norm1")
            + _qkv_rules(f"{t}.attn.qkv", (f"{h}.self_attn.q_proj", f"{h}.self_attn.k_proj",
                                           f"{h}.self_attn.v_proj"))
            + _renames(f"{t}.attn.proj", f"{h}.self_attn.out_proj")
            + _renames(f"{t}.norm2", f"{h}.layer_norm2")
            + _renames(f"{t}.mlp.fc1", f"{h}.mlp.fc1") + _renames(f"{t}.mlp.fc2", f"{h}.mlp.fc2"))


def _dinov2_tokens_to_hf(cls, pos):
    # timm (no_embed_class) folds the class position into cls_token and keeps patch positions only
    zero = torch.zeros_like(cls)
    return cls, torch.cat([zero, pos], dim=1), cls.new_zeros(1, cls.shape[-1])


def _dinov2_tokens_to_timm(cls, pos, _mask_token):
    return cls + pos[:, :1], pos[:, 1:]


def _split_in_proj(x):
    d = x.shape[0] // 3
    return x[:d], x[d:]


def _global_rules(kind: str, with_head: bool) -> list[_Rule]:
    if kind == "dinov2":
        return ([_Rule(("cls_token", "pos_embed"),
                       ("embeddings.cls_token", "embeddings.position_embeddings", "embeddings.mask_token"),
                       _dinov2_tokens_to_hf, _dinov2_tokens_to_timm),
                 _Rule(("reg_token",), ("embeddings.register_tokens",), _same, _same)]
                + _renames("patch_embed.proj", "embeddings.patch_embeddings.projection")
                + _renames("norm", "layernorm"))
    pos = _Rule(("pos_embed",), ("embeddings.position_embedding.weight",), lambda x: (x[0],), lambda x: (x[None],))
    if kind == "clip":
        return ([_Rule(("cls_token",), ("embeddings.class_embedding",), lambda x: (x.reshape(-1),),
                       lambda x: (x.reshape(1, 1, -1),)), pos,
                 _Rule(("patch_embed.proj.weight",), ("embeddings.patch_embedding.weight",), _same, _same)]
                + _renames("norm_pre", "pre_layrnorm") + _renames("norm", "post_layernorm"))
    rules = [pos] + _renames("patch_embed.proj", "embeddings.patch_embedding") + _renames("norm", "post_layernorm")
    if with_head:  # timm's AttentionPoolLatent <-> transformers' SiglipMultiheadAttentionPoolingHead
        rules += ([_Rule(("attn_pool.latent",), ("head.probe",), _same, _same)]
                  + [_Rule((f"attn_pool.q.{p}", f"attn_pool.kv.{p}"), (f"head.attention.in_proj_{p}",),
                           lambda q, kv: (torch.cat([q, kv], dim=0),), _split_in_proj) for p in ("weight", "bias")]
                  + _renames("attn_pool.proj", "head.attention.out_proj")
                  + _renames("attn_pool.norm", "head.layernorm")
                  + _renames("attn_pool.mlp.fc1", "head.mlp.fc1") + _renames("attn_pool.mlp.fc2", "head.mlp.fc2"))
    return rules


#: timm keys with no place in the transformers vision model: CLIP's image-text projection.
_TIMM_SKIPPED = {"clip": ("head.weight", "head.bias")}


def _num_blocks(state, pattern: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def _convert(rules: list[_Rule], state: dict, side: str, skipped: Sequence[str], partial: bool,
             source: str) -> dict[str, torch.Tensor]:
    out, used, missing = {}, set(), []
    for rule in rules:
        names, fn = (rule.timm, rule.to_hf) if side == "timm" else (rule.hf, rule.to_timm)
        present = [n in state for n in names]
        if partial and not any(present):
            continue
        if not all(present):
            missing += [n for n in names if n not in state]
            continue
        targets = rule.hf if side == "timm" else rule.timm
        out.update(zip(targets, fn(*(state[n] for n in names))))
        used.update(names)
    unexpected = sorted(set(state) - used - set(skipped))
    problems = [f"{what} {keys[:20]}" for what, keys in (("missing keys", missing), ("unexpected keys", unexpected))
                if keys]
    if problems:
        raise CheckpointError(f"cannot map {source}: " + "; ".join(problems))
    return out


def timm_to_transformers(kind: str, state: dict[str, torch.Tensor], *, num_blocks: int | None = None,
                         partial: bool = False, source: str = "timm weights") -> dict[str, torch.Tensor]:
    """Rename (and split/reshape) timm ViT weights to the transformers vision model of ``kind``.

    timm names (``vit_large_patch14_reg4_dinov2``, ``vit_so400m_patch14_siglip_384``,
    ``vit_large_patch14_clip_224``): ``cls_token``, ``reg_token``, ``pos_embed``, ``patch_embed.proj``,
    ``norm_pre`` (CLIP), ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}``, ``norm``,
    ``attn_pool.*`` (SigLIP's pooling head). The fused ``qkv`` is split into q/k/v; DINOv2's ``cls_token`` (which
    timm stores with the class position added) gets a zero class position; CLIP's ``head`` (the image-text
    projection) is skipped. ``num_blocks`` defaults to the blocks found; with ``partial`` only the tensors given
    are converted (each one complete), otherwise every tensor must be there. Missing or unknown keys raise
    :class:`CheckpointError` naming them.
    """
    tower_kind(kind)
    n = _num_blocks(state, r"blocks\.(\d+)\.") if num_blocks is None else num_blocks
    rules = _global_rules(kind, with_head="attn_pool.latent" in state)
    for i in range(n):
        rules += _block_rules(kind, i)
    return _convert(rules, state, "timm", _TIMM_SKIPPED.get(kind, ()), partial, source)


def transformers_to_timm(kind: str, state: dict[str, torch.Tensor],
                         source: str = "transformers weights") -> dict[str, torch.Tensor]:
    """The inverse of :func:`timm_to_transformers` (DINOv2's unused ``mask_token`` is dropped)."""
    tower_kind(kind)
    n = _num_blocks(state, r"encoder\.layers?\.(\d+)\.")
    rules = _global_rules(kind, with_head="head.probe" in state)
    for i in range(n):
        rules += _block_rules(kind, i)
    return _convert(rules, state, "hf", (), False, source)


def _need(state, key, source):
    if key not in state:
        raise CheckpointError(f"cannot read the architecture of {source}: missing key {key!r}")
    return state[key]


def config_from_timm(kind: str, state: dict[str, torch.Tensor], *, num_heads: int = 16,
                     source: str = "timm weights", **overrides):
    """The transformers config of ``kind`` matching timm weights: sizes from the tensor shapes, LayerNorm
    epsilon and activation of the timm model family, ``num_heads`` given; ``overrides`` replace fields."""
    info = tower_kind(kind)
    patch = _need(state, "patch_embed.proj.weight", source)
    dim, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads={num_heads!r} does not divide the width {dim} of {source}")
    depth = _num_blocks(state, r"blocks\.(\d+)\.")
    hidden = _need(state, "blocks.0.mlp.fc1.weight", source).shape[0]
    positions = _need(state, "pos_embed", source).shape[1] - (1 if kind == "clip" else 0)
    side = math.isqrt(positions)
    if side * side != positions:
        raise CheckpointError(f"{source}: pos_embed holds {positions} patch positions, not a square grid")
    fields = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=num_heads, num_channels=channels,
                  image_size=side * patch_size, patch_size=patch_size, hidden_act=info.timm_act,
                  layer_norm_eps=info.timm_eps)
    if kind == "dinov2":
        if hidden % dim:
            raise CheckpointError(f"{source}: MLP width {hidden} is not a multiple of the width {dim}")
        fields.update(mlp_ratio=hidden // dim, num_register_tokens=_need(state, "reg_token", source).shape[1],
                      qkv_bias=True, use_swiglu_ffn=False)
    else:
        fields["intermediate_size"] = hidden
    if kind == "siglip":
        fields["vision_use_head"] = "attn_pool.latent" in state
    fields.update(overrides)
    return _transformers_class(info.config_class)(**fields)


def model_from_timm(kind: str, state: dict[str, torch.Tensor], *, num_heads: int = 16,
                    source: str = "timm weights", **overrides) -> nn.Module:
    """The transformers vision model of ``kind`` holding timm-layout weights, every tensor checked."""
    config = config_from_timm(kind, state, num_heads=num_heads, source=source, **overrides)
    with torch.random.fork_rng(devices=[]):
        model = _transformers_class(tower_kind(kind).model_class)(config)
    load_state_checked(model, timm_to_transformers(kind, state, source=source), f"{source} (mapped from timm names)")
    return model.eval()
