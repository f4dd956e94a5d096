"""The testbed: a small Cobra-style Mamba MLLM trained on SynthVQA, shipped with the package.

No released checkpoint can be downloaded where this toolkit is developed and tested, so every accuracy figure it
prints on a real model comes from this one: ``load_model("testbed")`` (or :func:`load_testbed`) builds it from
the files in ``mambaprune/assets/testbed`` in well under a second.

Architecture (Cobra's, scaled down; see :class:`TestbedConfig`):

* **vision**: :class:`ConvTower`, a small convolutional encoder with two self-attention blocks on top (160 px,
  one token per 16 px patch, so 10 x 10 = 100 patch tokens of width 128); pixels resized naively to 160 px and
  normalised with mean/std 0.5;
* **projector**: the fused GELU MLP of Cobra (:class:`~mambaprune.models.projector.MLPProjector`, keys
  ``0/2/4``);
* **language model**: a :class:`~mambaprune.models.mamba_lm.MambaLM` with 16 layers of width 128 (d_state 16,
  expand 2), tied embeddings, so DTP's ranges mean something: the early range is layers 0-3, the late one 11-15;
* **tokenizer**: a byte-level BPE trained on the SynthVQA training questions (:func:`build_tokenizer`) in which
  every capital letter and digit is its own token, so a sign's code is spelled one character per token;
* **prompt**: Cobra's Zephyr turn without the VQA suffix, ``<|user|>\\n{question}<|endoftext|>\\n<|assistant|>\\n``;
  greedy decoding, at most 8 new tokens, stopping at ``<|endoftext|>``.

Files of a testbed folder (what :func:`save_testbed` writes): ``config.json`` (the :class:`TestbedConfig`, the
training settings and the measured test accuracy), ``model.safetensors`` (keys ``vision.*`` of :class:`ConvTower`,
``projector.{0,2,4}.*``, ``lm.*`` as :class:`MambaLM` names them), ``tokenizer.json`` and
``tokenizer_config.json``; next to them the training log (``train_log.jsonl``) and curves (``curves.png``).
The training script is :mod:`mambaprune.train_testbed`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoints import CheckpointError, load_state_checked, read_json, read_state_file, split_prefixed
from .cobra import zephyr_prompt
from .mamba_lm import MambaConfig, MambaLM
from .projector import MLPProjector
from .registry import register_model
from .vision import PixelTower
from .vlm import MambaVLM, VLMSpec, load_tokenizer

#: where the shipped testbed lives (inside the installed package)
TESTBED_DIR = Path(__file__).resolve().parent.parent / "assets" / "testbed"
FORMAT = "mambaprune-testbed"
FORMAT_VERSION = 1
SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>")


def testbed_prompt(question: str) -> str:
    """``<|user|>\\n{question}<|endoftext|>\\n<|assistant|>\\n`` (Cobra's Zephyr turn, no VQA suffix)."""
    return zephyr_prompt(question)


TESTBED_SPEC = VLMSpec(
    name="testbed", prompt_template=testbed_prompt, max_new_tokens=8, eos_token="<|endoftext|>",
    notes="Trained on SynthVQA with this prompt; answers are one word, a number or a 3-character code.")


@dataclass
class TestbedConfig:
    """Sizes of the testbed's three parts.

    Attributes:
        image_size, patch_size: the tower's input (grid = image_size // patch_size per side).
        vision_width, vision_layers: the tower's token width and its stride-1 residual conv blocks
            (:class:`ConvTower`).
        vision_attention_layers, vision_heads: the pre-norm self-attention blocks on top of the convolutions
            that let every patch token see the whole image, as the ViT tokens of Cobra's towers do.
        projector_hidden: hidden width of the GELU MLP projector.
        d_model, n_layer, d_state, expand: the Mamba LM's shape; ``vocab_size`` is the tokenizer's.
    """

    image_size: int = 160
    patch_size: int = 16
    vision_width: int = 128
    vision_layers: int = 2
    vision_attention_layers: int = 2
    vision_heads: int = 4
    projector_hidden: int = 512
    d_model: int = 128
    n_layer: int = 16
    d_state: int = 16
    expand: int = 2
    vocab_size: int = 384
    extra: dict = field(default_factory=dict)

    def mamba_config(self, eos_token_id: int = 0) -> MambaConfig:
        return MambaConfig(d_model=self.d_model, n_layer=self.n_layer, d_state=self.d_state, expand=self.expand,
                           vocab_size=self.vocab_size, eos_token_id=eos_token_id, pad_token_id=eos_token_id)

    @classmethod
    def from_dict(cls, d: dict) -> "TestbedConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ConvTower(PixelTower):
    """The testbed's vision encoder: a small convolutional network giving one token per ``patch_size`` patch.

    ``log2(patch_size)`` stride-2 3x3 convolutions (GELU) take the image to a grid of ``width`` channels (160 px:
    10 x 10), then ``depth`` stride-1 3x3 residual blocks widen each token's view, a learned position embedding
    is added, ``attention_layers`` pre-norm transformer blocks (``heads`` heads, MLP 2x ``width``, GELU) mix the
    tokens globally and the tokens are layer-normalised, then standardised with the buffers ``feature_mean``
    (per position) and ``feature_scale`` (per channel), which training sets from the training images so that
    what every image shares (the background) is zero and only the image's content remains. Token ``i`` is
    patch ``(i // g, i % g)`` of the ``g x g`` grid, row-major, as for the ViT towers
    (:class:`~mambaprune.models.vision.ViTTower` protocol: ``preprocess``, ``grid``, ``dim``, ``num_tokens``,
    ``display``). Pixels: resized naively to ``image_size``
    and normalised with mean/std 0.5.
    (A ViT trained from scratch learned the shapes far too slowly for the CPU budget; a convolutional stem is
    the usual remedy. The attention blocks give each token a view of the whole image, as a ViT's tokens have.)
    """

    MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    resize = "resize-naive"

    def __init__(self, image_size: int = 160, patch_size: int = 16, width: int = 128, depth: int = 2,
                 attention_layers: int = 0, heads: int = 4):
        super().__init__()
        n_down = int(math.log2(patch_size))
        if 2 ** n_down != patch_size or image_size % patch_size:
            raise ValueError(f"patch_size must be a power of 2 dividing image_size, got {patch_size} / {image_size}")
        self._image_size, self._patch_size = image_size, patch_size
        chans = [3] + [max(16, width >> (n_down - 1 - k)) for k in range(n_down)]
        self.stem = nn.ModuleList(nn.Conv2d(chans[k], chans[k + 1], 3, stride=2, padding=1) for k in range(n_down))
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        g = image_size // patch_size
        self.position = nn.Parameter(torch.zeros(1, g * g, width))
        self.attention = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(attention_layers))
        self.norm = nn.LayerNorm(width)
        # feature standardisation (identity until set by training: the per-position mean of the training
        # images' features and the per-channel std around it; see train_testbed.standardize_tower)
        self.register_buffer("feature_mean", torch.zeros(1, g * g, width))
        self.register_buffer("feature_scale", torch.ones(1, 1, width))

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def dim(self) -> int:
        return self.norm.normalized_shape[0]

    @property
    def pixel_stats(self):
        return self.MEAN, self.STD

    @property
    def pixel_owner(self) -> str:
        return "the testbed tower"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = self.check_pixels(pixels)
        param = self.position
        x = pixels.to(device=param.device, dtype=param.dtype)
        for conv in self.stem:
            x = F.gelu(conv(x))
        for conv in self.blocks:
            x = x + F.gelu(conv(x))
        x = x.flatten(2).transpose(1, 2) + self.position          # (batch, g*g, width), row-major patches
        for block in self.attention:
            x = block(x)
        return (self.norm(x) - self.feature_mean) / self.feature_scale


def build_tokenizer(texts, vocab_size: int = 384):
    """A transformers fast tokenizer (byte-level BPE) trained on ``texts``.

    Capital letters and digits are split off before BPE, so they never merge: a code such as ``K7M`` is the
    three tokens ``K``, ``7``, ``M`` whatever the corpus. ``<|endoftext|>`` (id 0), ``<|user|>`` and
    ``<|assistant|>`` are special tokens. Decoding gives back the exact text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("[A-Z0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]))


def build_testbed(config: TestbedConfig, tokenizer) -> MambaVLM:
    """A testbed :class:`MambaVLM` with freshly initialised weights (PyTorch's init for the tower and the
    projector, :class:`MambaLM`'s own for the LM; training re-initialises the LM, see
    :func:`mambaprune.train_testbed.init_mamba_`)."""
    vocab = len(tokenizer)
    if vocab > config.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} tokens, the config only {config.vocab_size}")
    vision = ConvTower(config.image_size, config.patch_size, config.vision_width, config.vision_layers,
                       config.vision_attention_layers, config.vision_heads)
    projector = MLPProjector(config.vision_width, config.d_model, hidden_dim=config.projector_hidden)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    lm = MambaLM(config.mamba_config(eos_token_id=eos))
    return MambaVLM(vision, projector, lm, tokenizer, TESTBED_SPEC)


def testbed_state(model: MambaVLM) -> dict[str, torch.Tensor]:
    """The weights as saved: ``vision.*`` (SigLIP vision model names), ``projector.*``, ``lm.*``."""
    parts = {"vision.": model.vision, "projector.": model.projector, "lm.": model.lm}
    return {p + k: v.detach().cpu().contiguous() for p, m in parts.items() for k, v in m.state_dict().items()}


def save_testbed(model: MambaVLM, config: TestbedConfig, folder, info: dict | None = None) -> None:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer into ``folder``. ``info`` (training
    settings, accuracy) is stored in ``config.json`` under ``"info"``. The tied ``lm.lm_head.weight`` is not
    stored (it is the embedding)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = testbed_state(model)
    if model.lm.config.tie_embeddings:
        state.pop("lm.lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    with open(folder / "config.json", "w") as f:
        json.dump({"format": FORMAT, "version": FORMAT_VERSION, "config": asdict(config), "info": info or {}},
                  f, indent=2, sort_keys=True)
    model.tokenizer.save_pretrained(str(folder))


def read_testbed_config(folder) -> tuple[TestbedConfig, dict]:
    """``(config, info)`` of a testbed folder; anything else is a :class:`CheckpointError`."""
    folder = Path(folder)
    raw = read_json(folder / "config.json", "the testbed folder")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a {FORMAT} config")
    if raw.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / 'config.json'}: format version {raw.get('version')} is not supported "
                              f"(this mambaprune reads version {FORMAT_VERSION})")
    return TestbedConfig.from_dict(raw["config"]), raw.get("info") or {}


def testbed_folder(folder=None) -> Path:
    """``folder`` (a local folder or a Hugging Face repo id, :func:`~mambaprune.models.hub.resolve_folder`), or the
    shipped testbed's; a :class:`CheckpointError` saying how to get one if it is missing."""
    from .hub import WEIGHT_FOLDER, resolve_folder

    folder = resolve_folder(folder, allow_patterns=WEIGHT_FOLDER, weights=True, what="testbed folder") \
        if folder is not None else TESTBED_DIR
    if folder == TESTBED_DIR and not (folder / "model.safetensors").is_file():
        raise CheckpointError(
            f"no trained testbed is shipped in {folder} yet; train one with `mambaprune synth --out SYNTH "
            f"--per-family 2000` and `mambaprune train-testbed --data SYNTH --out DIR`, then load it with "
            f"load_model('testbed', DIR) (on the command line: --model-arg folder=DIR)")
    if not folder.is_dir():
        raise CheckpointError(f"testbed folder not found: {folder}")
    return folder


@register_model("testbed")
def load_testbed(folder=None, *, dtype: torch.dtype | None = None, device=None) -> MambaVLM:
    """The trained testbed (default: the copy shipped in the package), in eval mode."""
    folder = testbed_folder(folder)
    config, info = read_testbed_config(folder)
    tokenizer = load_tokenizer(folder)
    model = build_testbed(config, tokenizer)
    state = read_state_file(folder / "model.safetensors")
    source = str(folder / "model.safetensors")
    parts = split_prefixed(state, ("vision.", "projector.", "lm."), source)
    load_state_checked(model.vision, parts["vision."], source)
    load_state_checked(model.projector, parts["projector."], source)
    load_state_checked(model.lm, parts["lm."], source, optional=("lm_head.weight",))
    model.info = info
    model = model.eval()
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def describe_testbed(folder=None, *, dtype: torch.dtype | None = None, device=None) -> dict:
    """What :func:`load_testbed` with the same arguments would build, read from ``config.json`` alone (no
    weights): ``n_layer``, ``d_model`` and ``num_visual`` (``(image_size // patch_size) ** 2``). The evaluation
    runner checks a pruning method's layers against it before loading anything."""
    config, _ = read_testbed_config(testbed_folder(folder))
    return {"n_layer": config.n_layer, "d_model": config.d_model,
            "num_visual": (config.image_size // config.patch_size) ** 2}


load_testbed.describe = describe_testbed
