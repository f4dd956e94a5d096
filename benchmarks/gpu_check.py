"""The prepared device check: every scan path on a GPU, then prefill / decode / memory of a Cobra-size model.

Run it as one script on a machine with one GPU (it finishes well within 5 minutes on an H100):

    python benchmarks/gpu_check.py --json gpu_check.json --md gpu_check.md

1. **Scan paths against the reference.** On random inputs of one Cobra layer (d_inner 5120, d_state 16,
   729 + 30 tokens, batch 1), fp32 and bf16, every path of ``mambaprune.ssm.selective_scan`` is compared
   with the sequential fp32 reference (largest absolute difference of the output and of the last state,
   relative to the reference's largest value) and timed; so are the one-token state updates.
2. **The model.** A random model of Cobra's LM size (64 layers, d_model 2560, vocabulary 50280) in bf16, with
   729 visual tokens then 30 text tokens: prefill ms, decode ms per token and peak memory, for each scan path,
   unpruned and with DTP at keep 0.5 (early layer 15, late layer 45); the prefill time ratio (DTP / unpruned)
   is divided by the FLOPs ratio (1.0 means time falls exactly as FLOPs do; the DTP paper's own is
   0.63 / 0.48 = 1.31). Decoding is replayed from a CUDA graph (``MambaLM.cuda_graph``, the default); one more
   row per path decodes step by step without it, and must give the same tokens.
3. **Mamba-2.** A random model of mamba2-2.7b's size (64 layers, d_model 2560, 80 heads of 64, d_state 128,
   chunk 256) in bf16, 729 + 30 tokens: this engine's prefill (unpruned and DTP 0.5) and decode against
   transformers' ``Mamba2ForCausalLM`` on the same weights (its PyTorch path unless mamba_ssm's kernels are
   installed; the table says which), with the largest logit difference.

``--dry-run`` runs the same code on tiny dimensions on the CPU (Triton under ``TRITON_INTERPRET=1``); CI runs
it. A check that fails (a path off the reference, a required path that does not run, CUDA-graph decoding that
gives other tokens than the step loop) makes the script exit with status 1 after printing everything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

FULL = dict(d_model=2560, n_layer=64, vocab_size=50280, n_visual=729, n_text=30, d_state=16,
            early_layer=15, late_layer=45, decode_tokens=32, repeats=5, mamba2_headdim=64, mamba2_d_state=128,
            mamba2_chunk=256)
DRY = dict(d_model=32, n_layer=8, vocab_size=256, n_visual=24, n_text=7, d_state=5,
           early_layer=2, late_layer=6, decode_tokens=4, repeats=1, mamba2_headdim=8, mamba2_d_state=8,
           mamba2_chunk=16)
#: paths tried, in this order; one that cannot run on the device is reported as such and skipped
PATHS = ("chunked", "parallel", "triton", "mamba_ssm")
#: paths that must run (on the GPU, and on the CPU in the dry run); mamba_ssm is optional
REQUIRED = ("chunked", "parallel", "triton")
#: relative tolerance of a path against the fp32 reference, per input dtype
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@dataclass
class Dims:
    d_model: int
    n_layer: int
    vocab_size: int
    n_visual: int
    n_text: int
    d_state: int
    early_layer: int
    late_layer: int
    decode_tokens: int
    repeats: int
    mamba2_headdim: int
    mamba2_d_state: int
    mamba2_chunk: int


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny dimensions on the CPU (what CI runs)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated scan paths (default {','.join(PATHS)})")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; dry run 1)")
    p.add_argument("--no-mamba2", action="store_true", help="skip part 3 (the mamba2-2.7b-size model)")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    p.add_argument("--md", default=None, help="write the tables to this Markdown file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")        # before triton is imported anywhere
    import torch

    dims = Dims(**(DRY if args.dry_run else FULL))
    if args.repeats is not None:
        dims.repeats = max(1, args.repeats)
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: torch reports no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = sorted(set(paths) - set(PATHS))
    if bad:
        print(f"gpu_check: unknown path(s) {bad}; choose from {list(PATHS)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report = {"device": device_name(device), "dims": dims.__dict__, "torch": torch.__version__}
    failures: list[str] = []
    report["scan"] = check_scan_paths(dims, device, paths, failures)
    report["state_update"] = check_state_updates(dims, device, paths, failures)
    report["model"] = run_model(dims, device, paths, failures)
    if not args.no_mamba2:
        report["mamba2"] = run_mamba2(dims, device, failures)
    report["seconds"] = time.perf_counter() - t0
    report["failures"] = failures
    text = format_report(report)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------- helpers
def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Smallest wall time (s) over ``repeats`` synchronized calls after one warm-up call, and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def relative_error(x, ref) -> float:
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def why_not(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]


# ---------------------------------------------------------------------------------------------------- 1. scans
def scan_inputs(dims: Dims, device, dtype, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    d, n, L = 2 * dims.d_model, dims.d_state, dims.n_visual + dims.n_text

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    inputs = dict(u=rnd(1, d, L), delta=rnd(1, d, L, scale=0.5) - 1.0, A=-torch.exp(rnd(d, n, scale=0.5)),
                  B=rnd(1, n, L), C=rnd(1, n, L), D=rnd(d), z=rnd(1, d, L), delta_bias=rnd(d, scale=0.1))
    for k in ("u", "delta", "B", "C", "z"):
        inputs[k] = inputs[k].to(dtype)
    return inputs


def check_scan_paths(dims: Dims, device, paths, failures) -> list[dict]:
    import torch

    from mambaprune.ssm import selective_scan

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = scan_inputs(dims, device, dtype)
        kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True)
        args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
        with torch.no_grad():
            ref_s, (y_ref, h_ref) = timed(lambda: selective_scan(*args, method="reference", **kw), device, 1)
            rows.append(dict(path="reference", dtype=str(dtype)[6:], ms=ref_s * 1e3, err_y=0.0, err_state=0.0))
            for path in paths:
                name = str(dtype)[6:]
                try:
                    s, (y, h) = timed(lambda: selective_scan(*args, method=path, **kw), device, dims.repeats)
                except Exception as e:                      # an optional path this machine lacks is reported
                    rows.append(dict(path=path, dtype=name, unavailable=why_not(e)))
                    if path in REQUIRED:
                        failures.append(f"scan {path} {name} did not run: {why_not(e)}")
                    continue
                row = dict(path=path, dtype=name, ms=s * 1e3, err_y=relative_error(y, y_ref),
                           err_state=relative_error(h, h_ref), speedup_vs_reference=ref_s / s)
                rows.append(row)
                if max(row["err_y"], row["err_state"]) > TOLERANCE[name]:
                    failures.append(f"scan {path} {name}: relative error y {row['err_y']:.2e}, state "
                                    f"{row['err_state']:.2e} > {TOLERANCE[name]:.0e}")
    return rows


def check_state_updates(dims: Dims, device, paths, failures) -> list[dict]:
    """Ten one-token updates per path against the fp32 reference scan over the same ten tokens."""
    import torch

    from mambaprune.ssm import selective_scan, selective_state_update

    x = scan_inputs(dims, device, torch.float32, seed=1)
    steps = 10
    y_ref, h_ref = selective_scan(x["u"][..., :steps], x["delta"][..., :steps], x["A"], x["B"][..., :steps],
                                  x["C"][..., :steps], D=x["D"], z=x["z"][..., :steps], delta_bias=x["delta_bias"],
                                  delta_softplus=True, return_last_state=True, method="reference")
    rows = []
    for path in ["reference"] + [p for p in paths if p != "chunked"]:
        for state_dtype in (torch.float32, torch.bfloat16):
            state = torch.zeros_like(h_ref, dtype=state_dtype)
            name = str(state_dtype)[6:]

            def run():
                state.zero_()
                return torch.stack([selective_state_update(
                    state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t], D=x["D"],
                    z=x["z"][..., t], delta_bias=x["delta_bias"], delta_softplus=True,
                    method=path) for t in range(steps)], -1)
            try:
                s, y = timed(run, device, dims.repeats)
            except Exception as e:
                rows.append(dict(path=path, state_dtype=name, unavailable=why_not(e)))
                if path in REQUIRED + ("reference",):
                    failures.append(f"state update {path} (state {name}) did not run: {why_not(e)}")
                continue
            row = dict(path=path, state_dtype=name, us_per_step=s / steps * 1e6, err_y=relative_error(y, y_ref),
                       err_state=relative_error(state, h_ref))
            rows.append(row)
            tol = TOLERANCE[name]
            if max(row["err_y"], row["err_state"]) > tol:
                failures.append(f"state update {path} (state {name}): relative error y {row['err_y']:.2e}, "
                                f"state {row['err_state']:.2e} > {tol:.0e}")
    return rows


# ---------------------------------------------------------------------------------------------------- 2. model
def build_model(dims: Dims, device):
    import torch

    from mambaprune.models.mamba_lm import MambaConfig, MambaLM

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=dims.d_model, n_layer=dims.n_layer, vocab_size=dims.vocab_size, d_state=dims.d_state)
    with torch.device(device):
        model = MambaLM(cfg)
    return model.to(torch.bfloat16).eval()


def run_model(dims: Dims, device, paths, failures) -> list[dict]:
    import torch

    from mambaprune.flops import lm_macs
    from mambaprune.pruning.registry import build

    model = build_model(dims, device)
    cfg = model.config
    L = dims.n_visual + dims.n_text
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, dims.vocab_size, (1, L), generator=g).to(device)
    is_visual = torch.zeros(1, L, dtype=torch.bool, device=device)
    is_visual[:, :dims.n_visual] = True
    methods = {"none": build("none"),
               "dtp": build("dtp", keep_ratio=0.5, early_layer=dims.early_layer, late_layer=dims.late_layer)}
    rows, tokens = [], {}
    for path in paths:
        model.scan_method = path
        for name, pruner in methods.items():
            try:
                row = measure(model, ids, is_visual, pruner, dims, device)
            except Exception as e:
                rows.append(dict(path=path, method=name, unavailable=why_not(e)))
                if path in REQUIRED:
                    failures.append(f"model {path} {name} did not run: {why_not(e)}")
                continue
            row.update(path=path, method=name, flops=lm_macs(cfg, row.pop("tokens_per_layer")))
            tokens[(path, name)] = row.pop("tokens")
            rows.append(row)
    # decoding replayed from a CUDA graph (the default on CUDA) against the step-by-step loop: same tokens
    for path in paths:
        if (path, "none") not in tokens:
            continue
        model.scan_method, model.cuda_graph = path, False
        try:
            row = measure(model, ids, is_visual, methods["none"], dims, device)
        finally:
            model.cuda_graph = True
        row.update(path=path, method="none, no CUDA graph", flops=lm_macs(cfg, row.pop("tokens_per_layer")))
        if row.pop("tokens") != tokens[(path, "none")]:
            failures.append(f"model {path}: decoding from the CUDA graph gives other tokens than the step loop")
        rows.append(row)
    for path in paths:
        base = next((r for r in rows if r["path"] == path and r["method"] == "none" and "ms_prefill" in r), None)
        for r in rows:
            if base is not None and r["path"] == path and "ms_prefill" in r:
                r["flops_ratio"] = r["flops"] / base["flops"]
                r["time_ratio"] = r["ms_prefill"] / base["ms_prefill"]
                r["time_over_flops"] = r["time_ratio"] / r["flops_ratio"]
    first = {name: next((tokens[(p, name)] for p in paths if (p, name) in tokens), None) for name in methods}
    for r in rows:        # bf16 paths may round apart, and a random model's logits are near ties: noted, not failed
        if (r["path"], r["method"]) in tokens:
            r["same_tokens_as_first_path"] = tokens[(r["path"], r["method"])] == first[r["method"]]
    return rows


def measure(model, ids, is_visual, pruner, dims: Dims, device) -> dict:
    import torch

    def once():
        timings = {}
        new = model.generate(ids, is_visual=is_visual, hook=pruner, max_new_tokens=dims.decode_tokens,
                             eos_token_id=None, timings=timings)
        return timings, new

    once()                                                    # warm-up: kernels compiled, graphs captured
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode = [], []
    for _ in range(dims.repeats):
        timings, new = once()
        prefill.append(timings["prefill_s"])
        decode.extend(timings["decode_s"])
    decode.sort()
    row = dict(ms_prefill=min(prefill) * 1e3, ms_decode_per_token=decode[len(decode) // 2] * 1e3 if decode else None,
               tokens_per_layer=timings["tokens_per_layer"], tokens=new[0].tolist())
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return row


# ---------------------------------------------------------------------------------------------------- 3. Mamba-2
def run_mamba2(dims: Dims, device, failures) -> dict:
    """This engine against transformers' Mamba2ForCausalLM, same random weights, bf16, on ``device``."""
    import torch
    from transformers import Mamba2Config, Mamba2ForCausalLM
    from transformers.models.mamba2 import modeling_mamba2
    from transformers.utils import logging

    from mambaprune.flops import lm_macs
    from mambaprune.models.checkpoints import from_transformers_model
    from mambaprune.pruning.registry import build

    logging.set_verbosity_error()
    torch.manual_seed(0)
    hf_cfg = Mamba2Config(hidden_size=dims.d_model, num_hidden_layers=dims.n_layer, vocab_size=dims.vocab_size,
                          num_heads=2 * dims.d_model // dims.mamba2_headdim, head_dim=dims.mamba2_headdim,
                          state_size=dims.mamba2_d_state, n_groups=1, chunk_size=dims.mamba2_chunk,
                          tie_word_embeddings=True)
    with torch.device(device):
        hf = Mamba2ForCausalLM(hf_cfg).eval()
        ours = from_transformers_model(hf)
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    L = dims.n_visual + dims.n_text
    ids = torch.randint(0, dims.vocab_size, (1, L), generator=torch.Generator().manual_seed(0)).to(device)
    is_visual = torch.zeros(1, L, dtype=torch.bool, device=device)
    is_visual[:, :dims.n_visual] = True
    with torch.no_grad():
        hf_s, hf_out = timed(lambda: hf(ids, use_cache=False, logits_to_keep=1).logits[:, -1], device, dims.repeats)
        ours_s, ours_out = timed(lambda: ours(ids, is_visual=is_visual).logits, device, dims.repeats)
    report = dict(transformers_path="cuda kernels" if getattr(modeling_mamba2, "is_fast_path_available", False)
                  and device.type == "cuda" else "pytorch",
                  transformers_ms_prefill=hf_s * 1e3, ms_prefill=ours_s * 1e3, speedup=hf_s / ours_s,
                  max_logit_diff=float((hf_out.float() - ours_out.float()).abs().max()),
                  max_logit=float(hf_out.float().abs().max()))
    for name, pruner in (("none", build("none")), ("dtp", build("dtp", keep_ratio=0.5, early_layer=dims.early_layer,
                                                                late_layer=dims.late_layer))):
        try:
            row = measure(ours, ids, is_visual, pruner, dims, device)
        except Exception as e:
            failures.append(f"Mamba-2 {name} did not run: {why_not(e)}")
            continue
        row["flops"] = lm_macs(ours.config, row.pop("tokens_per_layer"))
        row.pop("tokens")
        report[name] = row
    if "none" in report and "dtp" in report:
        report["dtp"]["flops_ratio"] = report["dtp"]["flops"] / report["none"]["flops"]
        report["dtp"]["time_ratio"] = report["dtp"]["ms_prefill"] / report["none"]["ms_prefill"]
    del hf, ours
    return report


# ---------------------------------------------------------------------------------------------------- report
def markdown_table(header: list[str], rows: list[dict], keys: list[str], figures) -> list[str]:
    """Markdown lines of a table: each row's ``keys`` columns, then ``figures(row)`` (a list of cells), or, for a
    row of something that could not run, the reason instead of the figures."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        rest = ([f"not available: {r['unavailable']}"] + [""] * (len(header) - len(keys) - 1)
                if "unavailable" in r else figures(r))
        lines.append("| " + " | ".join([str(r[k]) for k in keys] + rest) + " |")
    return lines


def _model_figures(r: dict) -> list[str]:
    ratios = ([f"{r['flops_ratio']:.3f}", f"{r['time_ratio']:.3f}", f"{r['time_over_flops']:.2f}"]
              if "flops_ratio" in r else ["", "", ""])
    return ([f"{r['ms_prefill']:.1f}", "" if r["ms_decode_per_token"] is None else f"{r['ms_decode_per_token']:.2f}",
             f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"] + ratios
            + [{True: "yes", False: "no"}.get(r.get("same_tokens_as_first_path"), "")])


def format_report(report: dict) -> str:
    d = report["dims"]
    out = [f"# GPU check: {report['device']}, torch {report['torch']}", "",
           f"Scan: d_inner {2 * d['d_model']}, d_state {d['d_state']}, L {d['n_visual'] + d['n_text']}, batch 1; "
           f"error = max |path - fp32 reference| / max |reference|.", ""]
    out += markdown_table(["path", "inputs", "ms", "x reference", "error y", "error state"], report["scan"],
                          ["path", "dtype"], lambda r: [f"{r['ms']:.3f}", f"{r.get('speedup_vs_reference', 1.0):.1f}",
                                                        f"{r['err_y']:.1e}", f"{r['err_state']:.1e}"])
    out += ["", "State update (10 tokens, against the reference scan):", ""]
    out += markdown_table(["path", "state dtype", "us / step", "error y", "error state"], report["state_update"],
                          ["path", "state_dtype"],
                          lambda r: [f"{r['us_per_step']:.1f}", f"{r['err_y']:.1e}", f"{r['err_state']:.1e}"])
    out += ["", f"Model: {d['n_layer']} layers, d_model {d['d_model']}, vocab {d['vocab_size']}, bf16, "
            f"{d['n_visual']} visual + {d['n_text']} text tokens, batch 1, {d['decode_tokens']} new tokens; "
            f"DTP keep 0.5, early {d['early_layer']}, late {d['late_layer']}; min prefill / median decode of "
            f"{d['repeats']} runs.", ""]
    out += markdown_table(["path", "method", "prefill ms", "decode ms/token", "peak MiB", "FLOPs ratio", "time ratio",
                           "time / FLOPs", "tokens as first path"], report["model"], ["path", "method"],
                          _model_figures)
    m2 = report.get("mamba2")
    if m2:
        out += ["", f"Mamba-2: {d['n_layer']} layers, d_model {d['d_model']}, heads of {d['mamba2_headdim']}, "
                f"d_state {d['mamba2_d_state']}, chunk {d['mamba2_chunk']}, bf16, {d['n_visual']} + {d['n_text']} "
                f"tokens; transformers' Mamba2ForCausalLM ran its {m2['transformers_path']} path.", "",
                "| measurement | value |", "|---|---|",
                f"| prefill, transformers | {m2['transformers_ms_prefill']:.1f} ms |",
                f"| prefill, this engine | {m2['ms_prefill']:.1f} ms ({m2['speedup']:.2f}x) |",
                f"| max logit difference (largest logit) | {m2['max_logit_diff']:.3g} ({m2['max_logit']:.3g}) |"]
        for name in ("none", "dtp"):
            if name in m2:
                r = m2[name]
                dec = "" if r["ms_decode_per_token"] is None else f", decode {r['ms_decode_per_token']:.2f} ms/token"
                extra = (f", FLOPs ratio {r['flops_ratio']:.3f}, time ratio {r['time_ratio']:.3f}"
                         if "flops_ratio" in r else "")
                out.append(f"| generate, {name} | prefill {r['ms_prefill']:.1f} ms{dec}{extra} |")
    out += ["", f"{report['seconds']:.0f} s in all; {len(report['failures'])} failed check(s)."]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
