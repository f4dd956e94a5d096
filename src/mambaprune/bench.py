"""Engine benchmark: this package's Mamba prefill and scan against transformers and the reference scan.

Everything is measured side by side in one process, interleaved (engine A, engine B, A, B, ...), and the
minimum over the repeats of each is reported together with the ratio, because this class of machine is
noisy. The fp32 matrix-multiply rate is measured in the same run so that the engine's achieved GFLOP/s can
be read against it.

A second model, Mamba-2 (``mamba2_*`` settings; mamba2-130m's shape by default: d_model 768, 24 layers, headdim 64,
d_state 128, ngroups 1), is measured the same way against transformers' ``Mamba2ForCausalLM`` (its PyTorch path,
the fallback without kernels on a CPU) on the same weights; ``mamba2=False`` skips it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from .flops import lm_macs
from .models.checkpoints import from_transformers_model
from .models.mamba_lm import MambaConfig, MambaLM
from .ssm import selective_scan


@dataclass
class BenchSettings:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50280
    seq_len: int = 760
    threads: int = 2
    repeats: int = 3
    scan_d_inner: int = 1536
    scan_d_state: int = 16
    scan_len: int = 760
    with_transformers: bool = True
    seed: int = 0
    mamba2: bool = True
    mamba2_headdim: int = 64
    mamba2_d_state: int = 128
    mamba2_ngroups: int = 1


@dataclass
class BenchResult:
    settings: dict
    matmul_gflops: float = 0.0
    prefill_s: float = 0.0
    prefill_gflops: float = 0.0
    transformers_prefill_s: float | None = None
    prefill_speedup: float | None = None
    max_logit_diff: float | None = None
    decode_ms_per_token: float = 0.0
    scan_chunked_ms: float = 0.0
    scan_reference_ms: float = 0.0
    scan_speedup: float = 0.0
    times: dict = field(default_factory=dict)
    mamba2: dict | None = None


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_rate(m: int, k: int, n: int, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of an (m, k) @ (k, n) product, the shape of the largest projection."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * m * k * n / best / 1e9


def _models(s: BenchSettings):
    """Our model and (optionally) transformers' MambaForCausalLM with the same random weights."""
    torch.manual_seed(s.seed)
    if not s.with_transformers:
        return MambaLM(MambaConfig(d_model=s.d_model, n_layer=s.n_layer, vocab_size=s.vocab_size,
                                   pad_vocab_size_multiple=1)).eval(), None
    from transformers import MambaConfig as HFConfig, MambaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    hf = MambaForCausalLM(HFConfig(hidden_size=s.d_model, num_hidden_layers=s.n_layer,
                                   vocab_size=s.vocab_size)).eval()
    return from_transformers_model(hf), hf


def run_engine_benchmark(s: BenchSettings, progress=None) -> BenchResult:
    """Measure (see module docstring). ``progress`` is an optional callable taking a status string."""
    say = progress or (lambda msg: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        res = _run(s, say)
        if s.mamba2:
            res.mamba2 = run_mamba2_prefill(s, say)
        return res
    finally:
        torch.set_num_threads(previous_threads)


def _prefill_side_by_side(ours, hf, ids, repeats: int, say, label: str = ""):
    """Prefill ``ids`` with this engine and (when given) transformers' model, interleaved, after one warm-up each:
    (our times, transformers' times, the largest absolute difference of the last position's logits or None)."""
    ours_t, hf_t, diff = [], [], None
    with torch.no_grad():
        logits = ours(ids).logits                                                  # warm-up
        if hf is not None:
            ref = hf(ids, use_cache=False, logits_to_keep=1).logits[:, -1]
            diff = float((logits - ref).abs().max())
        for r in range(repeats):
            say(f"{label}prefill repeat {r + 1}/{repeats}")
            ours_t.append(_timed(lambda: ours(ids)))
            if hf is not None:
                hf_t.append(_timed(lambda: hf(ids, use_cache=False, logits_to_keep=1)))
    return ours_t, hf_t, diff


def _run(s: BenchSettings, say) -> BenchResult:
    res = BenchResult(settings=asdict(s))
    say("matmul rate")
    res.matmul_gflops = matmul_rate(s.seq_len, s.d_model, 2 * 2 * s.d_model)
    say("building models")
    ours, hf = _models(s)
    ids = torch.randint(0, s.vocab_size, (1, s.seq_len), generator=torch.Generator().manual_seed(s.seed))
    ours_t, hf_t, res.max_logit_diff = _prefill_side_by_side(ours, hf, ids, s.repeats, say)
    with torch.no_grad():
        say("decode")
        gen_tokens = 16
        prefill = ours(ids, use_cache=True)
        token = prefill.logits.argmax(-1)
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            token = ours.step(token, prefill.cache).argmax(-1)
        res.decode_ms_per_token = (time.perf_counter() - t0) / gen_tokens * 1e3
    res.prefill_s = min(ours_t)
    macs = lm_macs(ours.config, [s.seq_len] * s.n_layer)
    res.prefill_gflops = 2 * macs / res.prefill_s / 1e9
    if hf_t:
        res.transformers_prefill_s = min(hf_t)
        res.prefill_speedup = res.transformers_prefill_s / res.prefill_s
    res.times = {"ours_prefill_s": ours_t, "transformers_prefill_s": hf_t}

    say("scan")
    g = torch.Generator().manual_seed(s.seed)
    d, n, L = s.scan_d_inner, s.scan_d_state, s.scan_len
    args = (torch.randn(1, d, L, generator=g), torch.randn(1, d, L, generator=g),
            -torch.rand(d, n, generator=g) * 4, torch.randn(1, n, L, generator=g), torch.randn(1, n, L, generator=g))
    kw = dict(D=torch.randn(d, generator=g), delta_softplus=True)
    with torch.no_grad():
        selective_scan(*args, method="chunked", **kw)
        fast_t, ref_t = [], []
        for _ in range(s.repeats):
            fast_t.append(_timed(lambda: selective_scan(*args, method="chunked", **kw)))
            ref_t.append(_timed(lambda: selective_scan(*args, method="reference", **kw)))
    res.scan_chunked_ms, res.scan_reference_ms = min(fast_t) * 1e3, min(ref_t) * 1e3
    res.scan_speedup = res.scan_reference_ms / res.scan_chunked_ms
    res.times.update(scan_chunked_s=fast_t, scan_reference_s=ref_t)
    return res


def _mamba2_models(s: BenchSettings):
    """Our Mamba-2 LM and (optionally) transformers' Mamba2ForCausalLM with the same random weights."""
    torch.manual_seed(s.seed)
    if not s.with_transformers:
        return MambaLM(MambaConfig(layer="Mamba2", d_model=s.d_model, n_layer=s.n_layer, vocab_size=s.vocab_size,
                                   d_state=s.mamba2_d_state, headdim=s.mamba2_headdim, ngroups=s.mamba2_ngroups,
                                   pad_vocab_size_multiple=1)).eval(), None
    from transformers import Mamba2Config, Mamba2ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = Mamba2Config(hidden_size=s.d_model, num_hidden_layers=s.n_layer, vocab_size=s.vocab_size,
                       num_heads=2 * s.d_model // s.mamba2_headdim, head_dim=s.mamba2_headdim,
                       state_size=s.mamba2_d_state, n_groups=s.mamba2_ngroups, tie_word_embeddings=True)
    hf = Mamba2ForCausalLM(cfg).eval()
    return from_transformers_model(hf), hf


def run_mamba2_prefill(s: BenchSettings, say) -> dict:
    """The Mamba-2 prefill of ``seq_len`` tokens, this engine against transformers, interleaved; the minimum of
    ``repeats`` each, their ratio, the achieved rate (:func:`mambaprune.flops.lm_macs`, Mamba-2 count) and the
    largest absolute difference of the last position's logits."""
    say("Mamba-2: building models")
    ours, hf = _mamba2_models(s)
    ids = torch.randint(0, s.vocab_size, (1, s.seq_len), generator=torch.Generator().manual_seed(s.seed))
    out = {"prefill_s": None, "transformers_prefill_s": None, "prefill_speedup": None}
    ours_t, hf_t, out["max_logit_diff"] = _prefill_side_by_side(ours, hf, ids, s.repeats, say, "Mamba-2 ")
    out["prefill_s"] = min(ours_t)
    out["prefill_gflops"] = 2 * lm_macs(ours.config, [s.seq_len] * s.n_layer) / out["prefill_s"] / 1e9
    if hf_t:
        out["transformers_prefill_s"] = min(hf_t)
        out["prefill_speedup"] = out["transformers_prefill_s"] / out["prefill_s"]
    out["times"] = {"ours_prefill_s": ours_t, "transformers_prefill_s": hf_t}
    return out


def format_table(res: BenchResult) -> str:
    """Markdown table of a :class:`BenchResult`."""
    s = res.settings
    rows = [("fp32 matmul rate (same run)", f"{res.matmul_gflops:.1f} GFLOP/s")]
    model = f"d_model {s['d_model']}, {s['n_layer']} layers, vocab {s['vocab_size']}, {s['seq_len']} tokens"
    rows.append((f"prefill, this engine ({model})", f"{res.prefill_s:.3f} s"))
    rows.append(("achieved rate / matmul rate",
                 f"{res.prefill_gflops:.1f} GFLOP/s = {res.prefill_gflops / res.matmul_gflops:.0%}"))
    if res.transformers_prefill_s is not None:
        rows.append(("prefill, transformers MambaForCausalLM (PyTorch path)", f"{res.transformers_prefill_s:.3f} s"))
        rows.append(("**prefill speed-up**", f"**{res.prefill_speedup:.2f}x**"))
        rows.append(("max abs logit difference", f"{res.max_logit_diff:.2e}"))
    rows.append(("decode, this engine", f"{res.decode_ms_per_token:.2f} ms/token"))
    scan = f"d_inner {s['scan_d_inner']}, d_state {s['scan_d_state']}, L {s['scan_len']}"
    rows.append((f"scan, chunked ({scan})", f"{res.scan_chunked_ms:.1f} ms"))
    rows.append(("scan, sequential reference", f"{res.scan_reference_ms:.1f} ms"))
    rows.append(("**scan speed-up**", f"**{res.scan_speedup:.1f}x**"))
    m2 = res.mamba2
    if m2 is not None:
        shape = (f"headdim {s['mamba2_headdim']}, d_state {s['mamba2_d_state']}, ngroups {s['mamba2_ngroups']}, "
                 f"same width, depth, vocab and tokens")
        rows.append((f"Mamba-2 prefill, this engine ({shape})",
                     f"{m2['prefill_s']:.3f} s ({m2['prefill_gflops']:.1f} GFLOP/s)"))
        if m2["transformers_prefill_s"] is not None:
            rows.append(("Mamba-2 prefill, transformers Mamba2ForCausalLM (PyTorch path)",
                         f"{m2['transformers_prefill_s']:.3f} s"))
            rows.append(("**Mamba-2 prefill speed-up**", f"**{m2['prefill_speedup']:.2f}x**"))
            rows.append(("Mamba-2 max abs logit difference", f"{m2['max_logit_diff']:.2e}"))
    head = f"Engine benchmark: {s['threads']} threads, fp32, batch 1, min of {s['repeats']} interleaved repeats\n\n"
    lines = ["| measurement | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return head + "\n".join(lines)


def save_json(res, path) -> None:
    """Write a benchmark result (a dataclass or a dict) as JSON."""
    with open(path, "w") as f:
        json.dump(res if isinstance(res, dict) else asdict(res), f, indent=2)
