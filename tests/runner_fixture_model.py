"""A tiny random Mamba MLLM for the runner tests, loadable by name as ``runner_fixture_model:load_tiny`` (also in
the processes torchrun starts, with ``tests`` on PYTHONPATH). Its answers are garbage, deterministically.

* tokenizer: byte-level, one token per byte (no merges, nothing trained): ``<|endoftext|>`` = 0, then the 256
  byte symbols, so every SynthVQA question is tokenizable and the model's vocabulary is exactly 257;
* vision: a random 2-block CLIP tower, 56 px, 14 px patches -> 4 x 4 = 16 visual tokens;
* language model: a random 8-layer Mamba LM of width 32, weights drawn from a seeded generator, the EOS
  embedding scaled up so that answers end at different lengths (1 to 6 new tokens, EOS included);
  ``runner_fixture_model:load_tiny_mamba2`` is the same model with Mamba-2 layers.
"""
from __future__ import annotations

import functools
import math

import torch

from mambaprune.models.mamba_lm import MambaConfig, MambaLM
from mambaprune.models.projector import MLPProjector
from mambaprune.models.vision import ViTTower, random_vit_model
from mambaprune.models.vlm import MambaVLM, VLMSpec

N_LAYER = 8
IMAGE_SIZE, PATCH = 56, 14
NUM_VISUAL = (IMAGE_SIZE // PATCH) ** 2
SPEC = VLMSpec(name="runner-tiny", prompt_template="Q: {question} A:", max_new_tokens=6)


@functools.lru_cache(maxsize=None)
def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights far from degenerate (as tests/conftest.randomize_), drawn from ``gen``."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 4 + 0.5))
            elif name.endswith("dt_proj.bias"):
                p.copy_(noise * 0.5 - 1)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(noise * 0.1)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]) * (3.0 if "out_proj" in name else 1.0))


def _tiny_vlm(seed: int, **lm_fields) -> MambaVLM:
    tok = byte_tokenizer()
    clip = random_vit_model("clip", seed=seed, image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = MambaLM(MambaConfig(d_model=32, n_layer=N_LAYER, vocab_size=len(tok), d_state=8, eos_token_id=0,
                                 pad_token_id=0, **lm_fields))
        projector = MLPProjector(32, 32)
    gen = torch.Generator().manual_seed(seed + 1)
    _randomize(lm, gen)
    _randomize(projector, gen)
    with torch.no_grad():                  # a louder EOS (tied head): some answers stop early, some run out
        lm.backbone.embedding.weight[0] *= 3
    return MambaVLM(ViTTower("clip", clip, resize="resize-naive"), projector, lm, tok, SPEC).eval()


def load_tiny(seed: int = 0) -> MambaVLM:
    return _tiny_vlm(seed)


#: The Mamba-2 LM of :func:`load_tiny_mamba2`: 4 heads of 16 channels in 2 groups, chunks of 8 tokens (a prompt
#: spans several chunks), Δ clamped to mamba_ssm's (0, inf) default.
MAMBA2_FIELDS = dict(layer="Mamba2", headdim=16, ngroups=2, chunk_size=8)


def load_tiny_mamba2(seed: int = 0) -> MambaVLM:
    """The same multimodal model with Mamba-2 layers (``MAMBA2_FIELDS``), random weights drawn the same way."""
    return _tiny_vlm(seed, **MAMBA2_FIELDS)


def describe_tiny(seed: int = 0) -> dict:
    return {"n_layer": N_LAYER, "num_visual": NUM_VISUAL}


load_tiny.describe = describe_tiny
load_tiny_mamba2.describe = describe_tiny


def load_tiny_undescribed(seed: int = 0) -> MambaVLM:
    """The same model through a loader without ``describe`` (layer checks happen after loading)."""
    return load_tiny(seed)


def load_forbidden(**kwargs):
    """A loader that must never run: for the checks that have to fail before any model is loaded."""
    raise RuntimeError("load_forbidden was called: the model was loaded before the configuration was checked")


load_forbidden.describe = describe_tiny
