"""Reports from run summaries: Table 1 / Table 3 / Figure 11 layouts of the DTP paper, with hand-computed cells."""
import csv
import io
import json

import pytest

from mambaprune.eval.report import (Table, accuracy_table, efficiency_table, format_duration, format_memory,
                                    latex_escape, load_runs, merge_runs, plot_sweep, sweep_table)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def summary(method, params, label, acc, flops, ratio, **extra):
    run = {"config": {"model": "testbed", "method": method, "params": dict(params), "data": "synthvqa",
                      "split": "test"},
           "label": label, "n_samples": 200, "n_errors": 0, "accuracy": dict(acc),
           "average": -1.0,  # deliberately wrong: the tables recompute the average over the shown columns
           "flops": flops, "flops_baseline": 2.46e9, "flops_ratio": ratio}
    run.update(extra)
    return run


def acc(attr, exist, count=None):
    out = {"synthvqa:attr": attr, "synthvqa:exist": exist}
    if count is not None:
        out["synthvqa:count"] = count
    return out


@pytest.fixture
def table1_runs():
    """Baseline, one ~70% FastV, a ~70% DTP and a ~50% DTP (ratios 1.0, 0.72, 0.67, 0.50)."""
    return [
        summary("none", {}, "none", acc(91.04, 95.5, 70.25), 2.46e9, 1.0),
        summary("fastv", {"k": 2, "keep_ratio": 0.7}, "fastv(k=2, keep_ratio=0.7)", acc(90.8, 95.62, 69.0),
                1.7712e9, 0.72),
        summary("dtp", {"keep_ratio": 0.9}, "dtp(keep_ratio=0.9)", acc(91.0, 95.5, 70.3), 1.6482e9, 0.67),
        summary("dtp", {"keep_ratio": 0.5}, "dtp(keep_ratio=0.5)", acc(89.96, 96.0, 65.0), 1.23e9, 0.5),
    ]


# Baseline: 91.04 -> 91.0, 70.25 -> 70.3 (half-up; Python's round gives 70.2), Avg 256.79/3 = 85.597 -> 85.6.
# FastV: 95.62 -> 95.6 (+0.1 against 95.5), 69.0 - 70.3 = -1.3, Avg 255.42/3 = 85.14 -> 85.1 (-0.5).
# DTP 0.9: every displayed number equals the baseline's: +0.0 (Avg 256.8/3 = 85.6).
# DTP 0.5: 89.96 -> 90.0 (-1.0), 65.0 - 70.3 = -5.3, Avg 250.96/3 = 83.653 -> 83.7 (-1.9).
TABLE1_MD = """\
**Comparison of pruning methods on the testbed model**

| Method                     | FLOPs (G) | FLOPs ratio |        attr |       exist |       count |         Avg |
|:---------------------------|----------:|------------:|------------:|------------:|------------:|------------:|
| Baseline (testbed)         |      2.46 |        100% |        91.0 |        95.5 |        70.3 |        85.6 |
| fastv(k=2, keep_ratio=0.7) |      1.77 |         72% | 90.8 (-0.2) | 95.6 (+0.1) | 69.0 (-1.3) | 85.1 (-0.5) |
| dtp(keep_ratio=0.9)        |      1.65 |         67% | 91.0 (+0.0) | 95.5 (+0.0) | 70.3 (+0.0) | 85.6 (+0.0) |
| dtp(keep_ratio=0.5)        |      1.23 |         50% | 90.0 (-1.0) | 96.0 (+0.5) | 65.0 (-5.3) | 83.7 (-1.9) |
"""


def test_accuracy_table_markdown_exact(table1_runs):
    # the baseline is found by its method and put first whatever its position
    runs = table1_runs[1:3] + table1_runs[:1] + table1_runs[3:]
    assert accuracy_table(runs).to_markdown() == TABLE1_MD


def test_differences_are_of_displayed_numbers_with_sign():
    base = summary("none", {}, "none", {"d:a": 62.34, "d:b": 49.7, "d:c": 58.2, "d:d": 0.25}, 2e9, 1.0)
    run = summary("x", {}, "x", {"d:a": 62.06, "d:b": 49.84, "d:c": 58.249, "d:d": 0.35}, 1e9, 0.5)
    t = accuracy_table([base, run])
    # a: 62.3 -> 62.1 shows -0.2 (the raw difference, -0.28, would round to -0.3); b: 49.84 -> 49.8, +0.1;
    # c: 58.249 -> 58.2, +0.0 (never "-0.0"); d: 0.25 -> 0.3 (half-up), 0.35 -> 0.4, +0.1
    assert t.rows[1][3:7] == ["62.1 (-0.2)", "49.8 (+0.1)", "58.2 (+0.0)", "0.4 (+0.1)"]
    assert t.rows[0][3:7] == ["62.3", "49.7", "58.2", "0.3"]
    # Avg: baseline (62.34+49.7+58.2+0.25)/4 = 42.6225 -> 42.6; run 170.499/4 = 42.62475 -> 42.6
    assert t.rows[0][-1] == "42.6" and t.rows[1][-1] == "42.6 (+0.0)"


def test_benchmark_subset_rename_unit_and_recomputed_average(table1_runs):
    t = accuracy_table(table1_runs, benchmarks=["synthvqa:count", "attr"], flops_unit=1e12,
                       rename={"count": "Count", "synthvqa:attr": "Attr"}, title="T")
    assert t.columns == ["Method", "FLOPs (T)", "FLOPs ratio", "Count", "Attr", "Avg"]
    # baseline (70.25 + 91.04)/2 = 80.645 -> 80.6; DTP 0.5: (65 + 89.96)/2 = 77.48 -> 77.5, 77.5 - 80.6 = -3.1
    assert t.rows[0] == ["Baseline (testbed)", "0.00", "100%", "70.3", "91.0", "80.6"]
    assert t.rows[3] == ["dtp(keep_ratio=0.5)", "0.00", "50%", "65.0 (-5.3)", "90.0 (-1.0)", "77.5 (-3.1)"]
    with pytest.raises(ValueError, match="'vsr'"):
        accuracy_table(table1_runs, benchmarks=["vsr"])


def test_prefix_kept_when_datasets_differ():
    base = summary("none", {}, "none", {"gqa:all": 60.0, "pope:random": 85.0}, 2e9, 1.0)
    assert accuracy_table([base]).columns[3:5] == ["gqa:all", "pope:random"]


def test_baseline_choice(table1_runs):
    t = accuracy_table(table1_runs, baseline="dtp(keep_ratio=0.9)", baseline_label="Ref")
    assert [r[0] for r in t.rows] == ["Ref", "none", "fastv(k=2, keep_ratio=0.7)", "dtp(keep_ratio=0.5)"]
    assert t.rows[1][3] == "91.0 (+0.0)"  # 91.04 against the reference's 91.0
    assert t.rows[3][5] == "65.0 (-5.3)"
    plain = accuracy_table(table1_runs, baseline=False)
    assert plain.rows[1][3:] == ["90.8", "95.6", "69.0", "85.1"]
    assert plain.rows[0][0] == "none"
    with pytest.raises(ValueError, match="no run labelled 'ours'"):
        accuracy_table(table1_runs, baseline="ours")


def test_level_grouping(table1_runs):
    base, fastv, dtp9, dtp5 = table1_runs
    dart = summary("dart", {"keep_ratio": 0.44}, "dart(keep_ratio=0.44)", acc(88.0, 94.0, 60.0), 1.1808e9, 0.48)
    vtw = summary("vtw", {"k": 45}, "vtw(k=45)", acc(91.0, 95.0, 70.0), 1.75e9, 0.71)
    # input order mixes the levels; 0.48 and 0.50 are nearest 0.5, 0.67-0.72 nearest 0.7
    t = accuracy_table([dtp5, fastv, base, dart, vtw, dtp9], levels=(0.7, 0.5))
    assert [r[0] for r in t.rows] == ["Baseline (testbed)", "fastv(k=2, keep_ratio=0.7)", "vtw(k=45)",
                                      "dtp(keep_ratio=0.9)", "dtp(keep_ratio=0.5)", "dart(keep_ratio=0.44)"]
    assert t.breaks == [1, 4]
    lines = t.to_markdown().splitlines()  # title, blank, header, rule, baseline, separator, ...
    blank = [i for i, line in enumerate(lines) if line and set(line) == {"|", " "}]
    assert blank == [5, 9] and lines[6].startswith("| fastv") and lines[10].startswith("| dtp(keep_ratio=0.5)")
    tex = t.to_latex()
    assert tex.count(r"\midrule") == 3  # after the header and before each level block
    assert tex.index(r"\midrule", tex.index("Baseline")) < tex.index("fastv")
    rows = list(csv.reader(io.StringIO(t.to_csv())))
    assert rows[0][-1] == "Level" and [r[-1] for r in rows[1:]] == ["", "0.7", "0.7", "0.7", "0.5", "0.5"]
    # levels are placed in the order given
    t2 = accuracy_table(table1_runs, levels=(0.5, 0.7))
    assert [r[2] for r in t2.rows] == ["100%", "50%", "72%", "67%"] and t2.breaks == [1, 2]


def test_missing_benchmark(table1_runs):
    base = table1_runs[0]
    dart = summary("dart", {"keep_ratio": 0.44}, "dart(keep_ratio=0.44)", acc(88.0, 94.0), 1.1808e9, 0.48)
    t = accuracy_table([base, dart])
    # Avg over attr and exist: (88 + 94)/2 = 91.0; the baseline's over the same: (91.04 + 95.5)/2 = 93.27 -> 93.3
    assert t.rows[1] == ["dart(keep_ratio=0.44)", "1.18", "48%", "88.0 (-3.0)", "94.0 (-1.5)", "\u2013",
                         "91.0* (-2.3)"]
    assert t.rows[0][-1] == "85.6"
    assert len(t.notes) == 1 and t.notes[0].startswith("Avg marked * is the mean over the benchmarks")
    assert t.to_markdown().endswith("\n\n- " + t.notes[0] + "\n")
    assert list(csv.reader(io.StringIO(t.to_csv())))[2] == ["dart(keep_ratio=0.44)", "1.1808", "0.48", "88.0",
                                                            "94.0", "", "91.0"]
    # a run with every benchmark: no star and no note
    assert accuracy_table(table1_runs).notes == []


def test_errors_are_noted(table1_runs):
    table1_runs[3]["n_errors"] = 3
    t = accuracy_table(table1_runs)
    assert t.notes == ["dtp(keep_ratio=0.5): 3 of 200 samples failed and count as wrong."]


def test_csv_holds_the_raw_numbers(table1_runs):
    t = accuracy_table(table1_runs[:2])
    assert t.to_csv() == (
        "Method,FLOPs (G),FLOPs ratio,attr,exist,count,Avg\n"
        "Baseline (testbed),2.46,1.0,91.04,95.5,70.25,85.59666667\n"
        "\"fastv(k=2, keep_ratio=0.7)\",1.7712,0.72,90.8,95.62,69.0,85.14\n")
    data = list(csv.reader(io.StringIO(accuracy_table(table1_runs).to_csv())))[1:]
    assert [[float(x) for x in row[1:]] for row in data[2:]] == [[1.6482, 0.67, 91.0, 95.5, 70.3, 85.6],
                                                                 [1.23, 0.5, 89.96, 96.0, 65.0, 83.65333333]]


def test_latex_booktabs_and_escaping():
    t = Table("R&D: 50% of run_1 #2", ["Method", "Score"], [["dtp_a & b", "62.0 (-0.3)"], ["x", "\u2013"]],
              notes=["100% sure"])
    assert t.to_latex() == (
        "\\begin{table}[t]\n"
        "\\centering\n"
        "\\caption{R\\&D: 50\\% of run\\_1 \\#2}\n"
        "\\begin{tabular}{lr}\n"
        "\\toprule\n"
        "Method & Score \\\\\n"
        "\\midrule\n"
        "dtp\\_a \\& b & 62.0 (-0.3) \\\\\n"
        "x & -- \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n"
        "{\\footnotesize 100\\% sure}\\par\n"
        "\\end{table}\n")
    assert latex_escape("a\\b{c}$~^") == r"a\textbackslash{}b\{c\}\$\textasciitilde{}\textasciicircum{}"


def test_table_markdown_escapes_pipes_and_checks_shape(tmp_path):
    t = Table("t", ["A", "B"], [["a|b", "1"]])
    assert t.to_markdown() == "**t**\n\n| A    |   B |\n|:-----|----:|\n| a\\|b |   1 |\n"
    assert t.to_csv() == "A,B\na|b,1\n"
    paths = t.save(tmp_path / "out" / "table1")
    assert [p.name for p in paths] == ["table1.md", "table1.csv", "table1.tex"]
    assert [p.read_text() for p in paths] == [t.to_markdown(), t.to_csv(), t.to_latex()]
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
        Table("t", ["A", "B"], [["x"]])


def test_efficiency_table_paper_numbers():
    # the paper's Table 3 rows for Cobra and DTP (r=0.5), FLOPs in T
    base = summary("none", {}, "none", acc(1, 1), 2.01e12, 1.0, prefill_ms_mean=98.04,
                   decode_ms_per_token_mean=5.04, method_ms_mean=0.0, total_s=965.0, peak_mem_mb=9011.2,
                   peak_mem_kind="cuda_max_allocated", device="cuda", timing_protocol="synchronized, 2 warm-up")
    dtp = summary("dtp", {"keep_ratio": 0.5}, "dtp(keep_ratio=0.5)", acc(1, 1), 0.97e12, 0.48,
                  prefill_ms_mean=61.54, decode_ms_per_token_mean=5.02, method_ms_mean=0.05, total_s=635.4,
                  peak_mem_mb=8499.0, peak_mem_kind="cuda_max_allocated", device="cuda",
                  timing_protocol="synchronized, 2 warm-up")
    t = efficiency_table([dtp, base], flops_unit=1e12)
    assert t.columns == ["Method", "FLOPs (T)", "Prefill mean (ms)", "Decode mean (ms/token)", "Method (ms)",
                         "Total latency", "Peak memory"]
    # 98.04/61.54 = 1.593; 635.4 s -> 635 s = 10m 35s; 9011.2/1024 = 8.80 GB, 8499/1024 = 8.30 GB
    assert t.rows == [["Baseline (testbed)", "2.01", "98.04", "5.04", "0.00", "16m 05s", "8.8 GB"],
                      ["dtp(keep_ratio=0.5)", "0.97", "61.54 (1.59x)", "5.02", "0.05", "10m 35s", "8.3 GB"]]
    assert t.title == "Inference latency and peak memory on the testbed model (synthvqa)"
    assert t.notes == ["Peak memory: cuda_max_allocated.", "Device: cuda.", "Timing: synchronized, 2 warm-up."]
    rows = list(csv.reader(io.StringIO(t.to_csv())))
    assert rows[0] == ["Method", "FLOPs (T)", "Prefill mean (ms)", "Prefill speed-up", "Decode mean (ms/token)",
                       "Method (ms)", "Total latency (s)", "Peak memory (MB)"]
    assert rows[1][3] == "" and float(rows[2][3]) == pytest.approx(98.04 / 61.54)
    assert rows[2][6:] == ["635.4", "8499.0"]


def test_duration_and_memory_formats():
    assert format_duration(965) == "16m 05s"
    assert format_duration(12.34) == "12.3s"
    assert format_duration(59.96) == "1m 00s"  # 60.0 s is a minute
    assert format_duration(65.2) == "1m 05s"
    assert format_duration(3725.4) == "1h 02m 05s"
    assert format_memory(812.0) == "812 MB"
    assert format_memory(1023.6) == "1.0 GB"  # 1024 MB is a gigabyte
    assert format_memory(9011.2) == "8.8 GB"


@pytest.fixture
def sweep_runs():
    base = summary("none", {}, "none", acc(90.0, 96.0), 2.46e9, 1.0)
    dtp = [summary("dtp", {"keep_ratio": r}, f"dtp(keep_ratio={r})", acc(a, e), 1e9, f)
           for r, a, e, f in ((0.5, 88.0, 95.0, 0.48), (0.3, 84.0, 93.25, 0.35), (0.9, 89.5, 96.0, 0.67))]
    fastv = [summary("fastv", {"k": 2, "keep_ratio": r}, f"fastv(keep_ratio={r}, k=2)", acc(a, e), 1e9, f)
             for r, a, e, f in ((0.7, 87.0, 94.0, 0.72), (0.5, 85.0, 93.0, 0.53))]
    vtw = summary("vtw", {"k": 32}, "vtw(k=32)", acc(70.0, 80.0), 1e9, 0.52)
    return [dtp[0], fastv[0], base, dtp[1], vtw, dtp[2], fastv[1]]


def test_sweep_table(sweep_runs):
    t = sweep_table(sweep_runs)
    assert t.columns == ["Method", "keep_ratio", "FLOPs ratio", "attr", "exist", "Avg"]
    # one series per label without keep_ratio, in order of first appearance, by decreasing keep ratio;
    # Avg: 92.75 -> 92.8, 91.5, 177.25/2 = 88.625 -> 88.6, 90.5, 89.0
    assert t.rows == [["Baseline (testbed)", "\u2013", "100%", "90.0", "96.0", "93.0"],
                      ["dtp", "0.9", "67%", "89.5", "96.0", "92.8"],
                      ["dtp", "0.5", "48%", "88.0", "95.0", "91.5"],
                      ["dtp", "0.3", "35%", "84.0", "93.3", "88.6"],
                      ["fastv(k=2)", "0.7", "72%", "87.0", "94.0", "90.5"],
                      ["fastv(k=2)", "0.5", "53%", "85.0", "93.0", "89.0"]]
    assert t.notes == ["Left out (no keep_ratio): vtw(k=32)."]
    rows = list(csv.reader(io.StringIO(t.to_csv())))
    assert rows[1][:2] == ["Baseline (testbed)", ""] and rows[4] == ["dtp", "0.3", "0.35", "84.0", "93.25", "88.625"]
    # another swept parameter; a label without it falls back to the method and its other parameters
    ks = [summary("vtw", {"k": k}, f"VTW at {k}", acc(80.0 + k / 10, 90.0), 1e9, 0.5) for k in (32, 45)]
    t = sweep_table(ks, param="k", baseline=False)
    assert [r[:2] for r in t.rows] == [["vtw", "45"], ["vtw", "32"]]
    with pytest.raises(ValueError, match="no run has config.params\\['alpha'\\]"):
        sweep_table(sweep_runs, param="alpha")


def test_plot_sweep_writes_png(sweep_runs, tmp_path):
    path = plot_sweep(sweep_runs, tmp_path / "fig" / "sweep.png")
    assert path == tmp_path / "fig" / "sweep.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    # Figure 11 itself: the average alone, without the baseline line
    only_avg = plot_sweep(sweep_runs, tmp_path / "avg.png", benchmarks=(), baseline=False)
    assert only_avg.read_bytes().startswith(PNG_MAGIC)


def test_load_runs(tmp_path, table1_runs):
    parent = tmp_path / "results"
    for name, run in zip(["b_fastv", "a_base", "c_dtp"], table1_runs[1::-1] + table1_runs[2:3]):
        (parent / name).mkdir(parents=True)
        (parent / name / "summary.json").write_text(json.dumps(run))
    # a parent folder: every */summary.json, sorted by folder name
    assert [r["label"] for r in load_runs(parent)] == ["none", "fastv(k=2, keep_ratio=0.7)", "dtp(keep_ratio=0.9)"]
    # a run folder, a summary file, and several paths in order
    assert load_runs(parent / "c_dtp")[0]["label"] == "dtp(keep_ratio=0.9)"
    assert [r["label"] for r in load_runs([str(parent / "c_dtp" / "summary.json"), parent / "a_base"])] == \
        ["dtp(keep_ratio=0.9)", "none"]
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}: no summary.json"):
        load_runs([parent / "a_base", empty])
    with pytest.raises(ValueError, match="no such file or folder"):
        load_runs(tmp_path / "missing")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a readable JSON summary"):
        load_runs(bad)


def test_merge_runs_joins_one_setting_across_benchmarks():
    gqa = summary("dtp", {"keep_ratio": 0.5}, "dtp(keep_ratio=0.5)", {"gqa": 61.4}, 1.0, 0.5, n_samples=100,
                  flops_baseline=2.0, prefill_ms_mean=10.0, total_s=60.0, peak_mem_mb=500.0)
    pope = summary("dtp", {"keep_ratio": 0.5}, "dtp(keep_ratio=0.5)", {"pope:random": 87.3}, 0.4, 0.5,
                   n_samples=300, flops_baseline=0.8, prefill_ms_mean=2.0, total_s=30.0, peak_mem_mb=800.0)
    other = summary("none", {}, "none", {"gqa": 62.3}, 2.0, 1.0, n_samples=100, flops_baseline=2.0)
    merged = merge_runs([gqa, other, pope])
    assert [m["label"] for m in merged] == ["dtp(keep_ratio=0.5)", "none"]
    m = merged[0]
    assert m["accuracy"] == {"gqa": 61.4, "pope:random": 87.3} and m["n_samples"] == 400
    assert m["flops"] == pytest.approx((100 * 1.0 + 300 * 0.4) / 400)             # 0.55
    assert m["flops_baseline"] == pytest.approx((100 * 2.0 + 300 * 0.8) / 400)    # 1.1
    assert m["flops_ratio"] == pytest.approx(0.5)
    assert m["prefill_ms_mean"] == pytest.approx(4.0) and m["total_s"] == 90.0 and m["peak_mem_mb"] == 800.0
    assert m["average"] == pytest.approx((61.4 + 87.3) / 2)
    with pytest.raises(ValueError, match="both report 'gqa'"):
        merge_runs([gqa, dict(gqa)])
