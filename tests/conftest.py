"""Shared helpers: small random Mamba models, ours and transformers' with the same weights."""
import math
import os

# The Triton kernels (mambaprune.ssm.triton_scan) are tested on CPU tensors through Triton's interpreter, which
# Triton only offers when the variable is set before triton is first imported (transformers imports it). On a GPU
# machine "auto" then takes the "parallel" scan (interpreted kernels are never auto-selected); the compiled
# kernels on a GPU are checked by benchmarks/gpu_check.py.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mambaprune.models.checkpoints import from_transformers_model  # noqa: E402
from mambaprune.models.mamba_lm import MambaConfig as LMConfig, MambaLM  # noqa: E402

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")    # a repo id in a test never downloads (mambaprune.models.hub)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
    end-to-end runs on tiny models are several times slower with two threads on a busy 2-core machine, and the
    processes torchrun starts run with one thread, so in-process reference runs do the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every weight so that a random model is far from degenerate (varied greedy generations)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 4 + 0.5))
            elif name.endswith("dt_proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 - 1)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                scale = 3.0 if "out_proj" in name else 1.0
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) * scale)


def hf_pair(seed=0, **hf_kwargs):
    """(transformers MambaForCausalLM, our MambaLM) holding the same random weights, both in eval mode."""
    from transformers import MambaConfig, MambaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = dict(hidden_size=48, num_hidden_layers=3, vocab_size=64, state_size=8, conv_kernel=4, expand=2,
               time_step_rank=4, tie_word_embeddings=False)
    cfg.update(hf_kwargs)
    hf = MambaForCausalLM(MambaConfig(**cfg)).eval()
    randomize_(hf, seed)
    return hf, from_transformers_model(hf)


def mamba2_lm(seed=0, **fields):
    """Our Mamba-2 LM alone (several groups, chunks of 4 tokens), random but far from degenerate."""
    cfg = dict(layer="Mamba2", d_model=32, n_layer=3, vocab_size=64, d_state=8, headdim=8, ngroups=2, chunk_size=4,
               pad_vocab_size_multiple=16, tie_embeddings=False)
    lm = MambaLM(LMConfig(**dict(cfg, **fields))).eval()
    randomize_(lm, seed)
    return lm


@pytest.fixture
def small_lm():
    """Our model alone (6 layers), random but far from degenerate."""
    return hf_pair(seed=1, num_hidden_layers=6)[1]
