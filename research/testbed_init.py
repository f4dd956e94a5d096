"""How strongly a visual token far back reaches the last position at initialisation, per SSM init.

Builds the testbed's language model (16 layers, d_model 128), initialises it with
``train_testbed.init_mamba_`` under a few (A scale, Δ range) settings, runs 300 random input embeddings and
prints the norm of d|logits(last)|^2 / d input at positions 0, 50, 100, 200, 280 and 299 (the last one is the
position's own input). Mamba's default (A scale 1, Δ in [0.001, 0.1]) gives ~1e-6 at 200 positions back; the
testbed's training default (64, [0.01, 0.5]) ~1e-4.

    python research/testbed_init.py
"""
import torch

from mambaprune.models.mamba_lm import MambaConfig, MambaLM
from mambaprune.train_testbed import init_mamba_

POSITIONS = (0, 50, 100, 200, 280, 299)


def reach(a_scale: float, dt_min: float, dt_max: float, length: int = 300) -> list[float]:
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=128, n_layer=16, vocab_size=384))
    init_mamba_(lm, 0, dt_min=dt_min, dt_max=dt_max, a_scale=a_scale)
    x = torch.randn(1, length, 128, requires_grad=True)
    lm(inputs_embeds=x, return_all_logits=True).logits[0, -1].float().pow(2).sum().backward()
    g = x.grad[0].norm(dim=-1)
    return [float(g[i]) for i in POSITIONS]


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("A scale, dt range | grad norm at positions " + ", ".join(map(str, POSITIONS)))
    for a_scale, lo, hi in ((1, 1e-3, 0.1), (16, 1e-3, 0.1), (64, 1e-3, 0.1), (64, 0.01, 0.5)):
        print(f"{a_scale:>3}, [{lo}, {hi}] | " + ", ".join(f"{v:.2e}" for v in reach(a_scale, lo, hi)))
