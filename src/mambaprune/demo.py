"""``mambaprune demo``: the DTP paper's experiments, end to end, on the shipped testbed and SynthVQA.

1. writes a SynthVQA folder (``per_family`` test questions per family; the validation split serves calibration);
2. loads the ``testbed`` model and calibrates DTP on ``calib_samples`` validation questions: the Std curve of
   Δ importance (Eq. 7) and the early / late layers Eq. 8-9 choose (Figure 3);
3. evaluates on the test split, under one protocol (:mod:`mambaprune.eval.runner`): the unpruned model, DTP at two
   budgets (about 70% and 50% of the LM FLOPs: the keep ratio is matched with :func:`mambaprune.flops.match_flops`),
   and the baselines FastV, VTW, DART and Random-Pre matched to the same two budgets;
4. prints the Table 1 analogue (accuracy per family, FLOPs, difference to the unpruned model) and the Table 3
   analogue (prefill / decode latency, method time, total time, memory), and saves both as Markdown, CSV, LaTeX;
5. runs DTP's keep-ratio sweep (Figure 11) and draws the analysis figures of one test image (Figures 4, 5 and the
   kept tokens).

Everything lands in ``out`` (runs/<name>/ with samples.jsonl + summary.json, tables/, figures/); a demo
interrupted and started again resumes its runs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .data.readers import load_dataset
from .data.synthvqa import SynthConfig, generate_synthvqa
from .flops import match_flops
from .workflows import analysis_figures, calibrate, spread

BUDGETS = (0.7, 0.5)
#: baselines and the parameters held fixed while their budget parameter is matched
BASELINES = (("fastv", {"layer": 2}), ("vtw", {}), ("dart", {"layer": 2}), ("random_pre", {}))
SWEEP = (1.0, 0.9, 0.7, 0.5, 0.3)


def _synth(root: Path, per_family: int) -> None:
    manifest = root / "manifest.json"
    if manifest.is_file():
        cfg = json.loads(manifest.read_text()).get("config", {})
        if cfg.get("per_family") == per_family and cfg.get("train_multiplier") == 1:
            return
    generate_synthvqa(root, SynthConfig(per_family=per_family, train_multiplier=1))


def plan_runs(model, early: int, late: int, n_text: int, budgets=BUDGETS) -> list[tuple[str, str, dict]]:
    """``[(run name, method, params)]``: unpruned, then per budget DTP and every baseline at matched FLOPs."""
    cfg, n_visual = model.lm.config, model.vision.num_tokens
    runs = [("none", "none", {})]
    for target in budgets:
        tag = f"{round(100 * target)}"
        r, _ = match_flops("dtp", target, cfg, n_visual, n_text, early_layer=early, late_layer=late)
        r = max(r, 1 / n_visual)
        runs.append((f"dtp-{tag}", "dtp", {"keep_ratio": round(r, 4), "early_layer": early, "late_layer": late}))
        for method, fixed in BASELINES:
            value, _ = match_flops(method, target, cfg, n_visual, n_text, **fixed)
            param = "keep_ratio" if isinstance(value, float) else "layer"
            if param == "keep_ratio":                 # at least one visual token (0 is not a keep ratio)
                value = round(max(value, 1 / n_visual), 4)
            runs.append((f"{method}-{tag}", method, {**fixed, param: value}))
    return runs


def run_demo(out="demo_out", per_family: int = 30, calib_samples: int = 16, sweep: bool = True,
             figures: bool = True, progress: bool = True, log=print, model_name: str = "testbed",
             model_args: dict | None = None) -> dict:
    """Run the demo into ``out``; returns ``{"calibration", "runs": {name: summary}, "tables": {...},
    "figures": {...}}``. ``model_name`` / ``model_args`` pick another model than the shipped testbed (any
    name :func:`~mambaprune.eval.config.resolve_loader` accepts)."""
    from .eval.config import EvalConfig, resolve_loader
    from .eval.report import accuracy_table, efficiency_table, load_runs, plot_sweep, sweep_table
    from .eval.runner import run_eval

    t0 = time.perf_counter()
    out = Path(out)
    data = out / "synthvqa"
    model_args = dict(model_args or {})
    model = resolve_loader(model_name)(**model_args).eval()      # first: a missing model fails at once
    log(f"[1/5] SynthVQA ({per_family} test questions per family) -> {data}")
    _synth(data, per_family)
    test = load_dataset("synthvqa", data, "test")
    n_text = round(sum(len(model.prepare(s.image, s.question).text_ids[0]) for s in test[:20]) / min(20, len(test)))

    log(f"[2/5] DTP calibration on {calib_samples} validation questions (Eq. 7-9)")
    val = load_dataset("synthvqa", data, "val")
    cal = calibrate(model, spread(val, calib_samples), out / "figures", progress=progress)
    early, late = cal["early_layer"], cal["late_layer"]
    log(f"      early layer {early}, late layer {late} (of {model.lm.config.n_layer})")

    runs = plan_runs(model, early, late, n_text)
    log(f"[3/5] {len(runs)} runs on {len(test)} test questions")
    summaries = {}

    def run(name, method, params):
        cfg = EvalConfig(model=model_name, model_args=model_args, method=method, params=params, data="synthvqa", data_root=str(data),
                         split="test", out=str(out / "runs" / name))
        summary = run_eval(cfg, progress=progress, model=model)
        summaries[name] = summary
        log(f"      {name:16s} FLOPs {100 * summary['flops_ratio']:5.1f}%  avg {summary['average']:5.1f}  "
            f"prefill {summary['prefill_ms_mean']:6.2f} ms")

    for name, method, params in runs:
        run(name, method, params)

    log("[4/5] tables")
    tables_dir = out / "tables"
    main_runs = load_runs([out / "runs" / name for name, _, _ in runs])
    t1 = accuracy_table(main_runs, levels=BUDGETS, flops_unit=1e9,
                        title="Table 1 analogue: testbed on SynthVQA test")
    t3 = efficiency_table(main_runs, title="Table 3 analogue: efficiency (CPU)")
    t1.save(tables_dir / "table1")
    t3.save(tables_dir / "table3")
    log(t1.to_markdown())
    log("")
    log(t3.to_markdown())
    result = {"calibration": cal, "runs": summaries, "tables": {"table1": str(tables_dir / "table1.md"),
                                                                 "table3": str(tables_dir / "table3.md")}}

    if sweep:
        log(f"[5/5] DTP keep-ratio sweep {SWEEP} (Figure 11) and analysis figures")
        names = []
        for r in SWEEP:
            name = f"sweep-dtp-{r:g}"
            run(name, "dtp", {"keep_ratio": r, "early_layer": early, "late_layer": late})
            names.append(name)
        sweep_runs = load_runs([out / "runs" / n for n in names])
        ts = sweep_table(sweep_runs, param="keep_ratio", title="DTP keep-ratio sweep")
        ts.save(tables_dir / "sweep")
        baseline = load_runs([out / "runs" / "none"])[0]
        result["figures"] = {"keep_ratio_curve": str(plot_sweep(sweep_runs, out / "figures" / "keep_ratio_curve.png",
                                                                param="keep_ratio", baseline=baseline))}
        log(ts.to_markdown())
    if figures:
        sample = next(s for s in test if s.group == "synthvqa:read")
        dtp_params = next(p for n, m, p in runs if m == "dtp")
        result.setdefault("figures", {}).update(
            analysis_figures(model, sample, out / "figures", method="dtp", params=dtp_params))
        result["figures"]["std_curve"] = cal.get("figure")
    log(f"done in {time.perf_counter() - t0:.0f} s; everything is under {out}/ (tables/, figures/, runs/)")
    return result
