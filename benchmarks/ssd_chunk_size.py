"""The SSD chunk a Mamba-2 prefill runs on a CPU: a mamba2-130m-size model (24 layers, d_model 768, headdim 64,
d_state 128, random weights) prefilling 760 tokens with each chunk size forced on its layers, interleaved, the
minimum over the repeats, and the largest logit difference to the released chunk (256). It is how
``mambaprune.ssm.ssd.CPU_CHUNK_SIZE`` (64) was chosen.

    python benchmarks/ssd_chunk_size.py [--threads 1] [--repeats 2] [--chunks 256 128 64 32]
"""
from __future__ import annotations

import argparse
import time

import torch

from mambaprune.models.mamba_lm import MambaConfig, MambaLM
from mambaprune.models.mamba2 import Mamba2Mixer
from mambaprune.ssm import ssd


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 128, 64, 32])
    p.add_argument("--tokens", type=int, default=760)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(layer="Mamba2", d_model=768, n_layer=24, vocab_size=50280, d_state=128, headdim=64,
                             pad_vocab_size_multiple=16)).eval()
    ids = torch.randint(0, 50280, (1, args.tokens))
    saved = ssd.CPU_CHUNK_SIZE
    times, logits = {c: [] for c in args.chunks}, {}
    try:
        with torch.no_grad():
            for _ in range(args.repeats):
                for c in args.chunks:
                    ssd.CPU_CHUNK_SIZE = c                    # the cap prefill_chunk_size applies on a CPU
                    for m in lm.modules():
                        if isinstance(m, Mamba2Mixer):
                            m.chunk_size = c
                    t = time.perf_counter()
                    logits[c] = lm(ids).logits
                    times[c].append(time.perf_counter() - t)
    finally:
        ssd.CPU_CHUNK_SIZE = saved
    ref = logits[max(args.chunks)]
    head = f"prefill s ({args.threads} thread(s), min of {args.repeats})"
    print(f"| chunk | {head} | max logit diff to {max(args.chunks)} |")
    print("|---|---|---|")
    for c in args.chunks:
        print(f"| {c} | {min(times[c]):.2f} | {float((logits[c] - ref).abs().max()):.1e} |")


if __name__ == "__main__":
    main()
