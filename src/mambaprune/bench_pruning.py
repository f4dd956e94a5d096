"""Pruning benchmark: FLOPs ratio against measured prefill-time ratio, and the time a method itself takes.

One model (the 130M-sized engine configuration by default: d_model 768, 24 layers, vocab 50280, random
weights), one multimodal-shaped prompt (729 visual + 30 text tokens, the visual tokens first), every method
timed side by side in one process, interleaved (none, dtp, fastv, ..., none, dtp, ...), the minimum over the
repeats reported, because this class of machine is noisy. ``method_ms`` is the time spent inside the pruner
(scoring, selection, re-layout: ``Pruner.method_seconds``), and it is part of the prefill time.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .flops import lm_macs
from .models.mamba_lm import MambaConfig, MambaLM
from .pruning import build


@dataclass
class PruningBenchSettings:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50280
    n_visual: int = 729
    n_text: int = 30
    threads: int = 2
    repeats: int = 5
    seed: int = 0
    methods: list = field(default_factory=lambda: [
        ("none", {}),
        ("dtp", {"keep_ratio": 0.5, "early_layer": 0.25, "late_layer": 0.7}),
        ("fastv", {"keep_ratio": 0.5, "layer": 2}),
        ("vtw", {"layer": 0.5}),
        ("dart", {"keep_ratio": 0.5, "layer": 2}),
        ("mtr", {"keep_ratio": 0.5, "layer": 2}),
        ("random_pre", {"keep_ratio": 0.5}),
        ("divprune", {"keep_ratio": 0.5}),
    ])


def run_pruning_benchmark(s: PruningBenchSettings, progress=lambda msg: None) -> dict:
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    cfg = MambaConfig(d_model=s.d_model, n_layer=s.n_layer, vocab_size=s.vocab_size, pad_vocab_size_multiple=1)
    lm = MambaLM(cfg).eval()
    g = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(0, s.vocab_size, (1, s.n_text), generator=g)
    with torch.no_grad():
        embeds = torch.cat([torch.randn(1, s.n_visual, s.d_model, generator=g),
                            lm.backbone.embedding(ids)], dim=1)
    is_visual = torch.zeros(1, s.n_visual + s.n_text, dtype=torch.bool)
    is_visual[:, :s.n_visual] = True
    pruners = [(f"{name}({', '.join(f'{k}={v}' for k, v in p.items())})", build(name, **p)) for name, p in s.methods]
    best = {label: float("inf") for label, _ in pruners}
    method = {label: float("inf") for label, _ in pruners}
    tokens = {}
    with torch.no_grad():
        for label, pr in pruners:                                    # warm-up, and the token counts
            tokens[label] = lm(inputs_embeds=embeds, is_visual=is_visual, hook=pr).tokens_per_layer
        for r in range(s.repeats):
            for label, pr in pruners:
                progress(f"repeat {r + 1}/{s.repeats}: {label}")
                t0 = time.perf_counter()
                lm(inputs_embeds=embeds, is_visual=is_visual, hook=pr)
                best[label] = min(best[label], time.perf_counter() - t0)
                method[label] = min(method[label], pr.method_seconds)
    base_label = pruners[0][0]
    base_macs = lm_macs(cfg, tokens[base_label])
    rows = []
    for label, _ in pruners:
        fr = lm_macs(cfg, tokens[label]) / base_macs
        tr = best[label] / best[base_label]
        rows.append(dict(method=label, flops_ratio=fr, prefill_ms=best[label] * 1e3, time_ratio=tr,
                         time_over_flops=tr / fr, method_ms=method[label] * 1e3,
                         method_share_of_unpruned_prefill=method[label] / best[base_label]))
    return dict(settings={k: v for k, v in asdict(s).items() if k != "methods"}, rows=rows)


def format_pruning_table(res: dict) -> str:
    st = res["settings"]
    lines = [f"Pruning benchmark: d_model {st['d_model']}, {st['n_layer']} layers, {st['n_visual']} visual + "
             f"{st['n_text']} text tokens, {st['threads']} threads, min of {st['repeats']} interleaved repeats",
             "",
             "| method | FLOPs ratio | prefill ms | time ratio | time / FLOPs ratio | method ms | method % of prefill |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['flops_ratio']:.3f} | {r['prefill_ms']:.1f} | {r['time_ratio']:.3f} | "
                     f"{r['time_over_flops']:.3f} | {r['method_ms']:.2f} | "
                     f"{100 * r['method_share_of_unpruned_prefill']:.2f}% |")
    return "\n".join(lines)
