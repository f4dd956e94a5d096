"""Reports from evaluation runs: the DTP paper's tables and its keep-ratio figure, from ``summary.json`` files.

Every run folder written by the runner holds a ``summary.json`` (keys used here: ``config`` with ``model``,
``method``, ``params``, ``data``; ``label``; ``n_samples``, ``n_errors``; ``accuracy`` = percent per group, e.g.
``"synthvqa:attr": 91.0``; ``flops``, ``flops_baseline``, ``flops_ratio``; ``prefill_ms_mean``,
``decode_ms_per_token_mean``, ``method_ms_mean``, ``total_s``; ``peak_mem_mb``, ``peak_mem_kind``,
``timing_protocol``, ``device``). :func:`load_runs` reads them; the builders return a :class:`Table` that
renders as Markdown, CSV (the raw numbers, for plotting) and LaTeX (booktabs).

Layouts
-------
* :func:`accuracy_table` -- Tables 1 and 2 of the paper: ``Method | FLOPs (G) | FLOPs ratio | <benchmarks> |
  Avg``. The baseline (the run whose method is ``"none"``, or the one given) comes first; the other rows show
  each score with its difference to the baseline, ``62.0 (-0.3)``, ``49.8 (+0.1)``, ``58.2 (+0.0)``. Rows can
  be grouped by FLOPs level (``levels=(0.7, 0.5)``: the ~70% block, then the ~50% block, as in Table 1).
  The paper's Tables 4-6 (ablations: a few benchmarks per model, FLOPs beside them) are the same layout with
  ``benchmarks=`` chosen and, where wanted, ``baseline=False`` (no differences).
* :func:`efficiency_table` -- Table 3: ``Method | FLOPs | Prefill mean (ms) | Decode mean (ms/token) |
  Method (ms) | Total latency | Peak memory``, with the prefill speed-up over the baseline (``61.54 (1.59x)``),
  total latency as ``16m 05s`` and memory as ``812 MB`` / ``8.8 GB``.
* :func:`sweep_table` and :func:`plot_sweep` -- Figure 11: accuracy per benchmark (and the average) against a
  swept parameter (the keep ratio ``r``), one line per method with that parameter removed from its label, and
  the unpruned baseline as a dashed horizontal line.

Rounding is half-up on the decimal value (``65.75 -> 65.8``, unlike Python's ``round``), and a difference
to the baseline is the difference of the two *displayed* numbers, so every row can be checked by eye (the
paper's "Ours (r=0.9) 65.8 (+0.0)" is printed the same way). Averages are recomputed over the benchmarks shown,
not read from the summary's ``average``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["Table", "load_runs", "merge_runs", "accuracy_table", "efficiency_table", "sweep_table", "plot_sweep", "format_duration",
           "format_memory", "latex_escape"]

#: What a table shows for a number that is not there.
MISSING = "\u2013"  # en dash
#: Names of common FLOPs units, used in the column header ("FLOPs (G)").
UNIT_NAMES = {1.0: "", 1e3: "K", 1e6: "M", 1e9: "G", 1e12: "T", 1e15: "P"}


# ---------------------------------------------------------------------------------------------- loading
def load_runs(paths) -> list[dict]:
    """The summaries of the runs at ``paths`` (one path or a sequence of them), in order.

    A path may be a run folder (holding ``summary.json``), a summary file itself, or a parent folder of run
    folders (every ``*/summary.json`` in it, sorted by path). A path that yields no summary raises a
    :class:`ValueError` naming it.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = [p / "summary.json"] if (p / "summary.json").is_file() else sorted(p.glob("*/summary.json"))
        else:
            raise ValueError(f"{p}: no such file or folder (expected a run folder with summary.json)")
        if not files:
            raise ValueError(f"{p}: no summary.json here (expected a run folder holding summary.json, a "
                             "summary.json file, or a folder of run folders)")
        for f in files:
            try:
                run = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{f}: not a readable JSON summary ({e})") from None
            if not isinstance(run, dict):
                raise ValueError(f"{f}: a summary must be a JSON object, got {type(run).__name__}")
            runs.append(run)
    return runs


def merge_runs(runs: Sequence[Mapping]) -> list[dict]:
    """One summary per (model, method label, evaluation protocol): the runs of one setting on several benchmarks (one run folder
    each, as the paper's Table 1 has one row per setting across six benchmarks) become one row; runs of different
    protocols stay apart.

    Accuracies and metrics are united (two runs of one label may not both report the same group: that is a
    :class:`ValueError` naming it); ``flops`` / ``flops_baseline`` and the timing means are averaged weighted by
    the runs' sample counts, ``flops_ratio`` is their sum ratio, ``total_s`` and the counts add up, memory is the
    maximum. Runs keep their first appearance's order.
    """
    groups: dict[tuple, list[Mapping]] = {}
    for run in runs:
        groups.setdefault((_config(run).get("model"), _label(run), _protocol(run)), []).append(run)
    merged = []
    for (_, label, _), parts in groups.items():
        if len(parts) == 1:
            merged.append(dict(parts[0]))
            continue
        out = dict(parts[0])
        accuracy, metrics, finals = {}, {}, {}
        for run in parts:
            for group, value in (run.get("accuracy") or {}).items():
                if group in accuracy:
                    raise ValueError(f"two runs labelled {label!r} both report {group!r}; give each setting "
                                     f"one run per benchmark")
                accuracy[group] = value
            metrics.update(run.get("metrics") or {})
            finals.update(run.get("accuracy_final") or {})
        weights = [max(1, int(r.get("n_samples") or 0)) for r in parts]

        def wmean(key):
            pairs = [(r.get(key), w) for r, w in zip(parts, weights) if r.get(key) is not None]
            return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else None

        out.update(accuracy=accuracy, metrics=metrics, accuracy_final=finals,
                   average=_mean([v for v in accuracy.values() if v is not None]),
                   n_samples=sum(int(r.get("n_samples") or 0) for r in parts),
                   n_errors=sum(int(r.get("n_errors") or 0) for r in parts),
                   total_s=sum(float(r.get("total_s") or 0.0) for r in parts),
                   peak_mem_mb=max((r["peak_mem_mb"] for r in parts if r.get("peak_mem_mb") is not None),
                                   default=None),
                   config={**_config(parts[0]), "data": "+".join(str(_config(r).get("data")) for r in parts)})
        for key in ("flops", "flops_baseline", "prefill_ms_mean", "decode_ms_per_token_mean", "method_ms_mean"):
            out[key] = wmean(key)
        if out.get("flops") is not None and out.get("flops_baseline"):
            out["flops_ratio"] = out["flops"] / out["flops_baseline"]
        merged.append(out)
    return merged


# ---------------------------------------------------------------------------------------------- Table
_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", MISSING: "--"}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (``_ % & # $ { } ~ ^ \\``; the en dash becomes ``--``)."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def _csv_value(x) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        # ten significant digits drop float noise (88.10000000000001 -> 88.1); repr keeps a float a float (69.0)
        return "" if math.isnan(x) else repr(float(format(x, ".10g")))
    return str(x)


@dataclass
class Table:
    """A rendered table: ``rows`` are lists of cell strings, one per column.

    ``breaks`` are the indices of rows before which a separator is drawn (a blank row in Markdown, a
    ``\\midrule`` in LaTeX). ``csv_columns``/``csv_rows`` hold the underlying numbers (``None`` for a missing
    one) that :meth:`to_csv` writes; without them the CSV holds the cell strings.
    """

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    breaks: list[int] = field(default_factory=list)
    csv_columns: list[str] | None = None
    csv_rows: list[list] | None = None

    def __post_init__(self):
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"row {i} has {len(row)} cells for {len(self.columns)} columns")
        if (self.csv_columns is None) != (self.csv_rows is None):
            raise ValueError("csv_columns and csv_rows go together")
        if self.csv_rows is not None:
            for i, row in enumerate(self.csv_rows):
                if len(row) != len(self.csv_columns):
                    raise ValueError(f"csv row {i} has {len(row)} values for {len(self.csv_columns)} columns")

    def to_markdown(self) -> str:
        """A bold title line, a pipe table (first column left-aligned and the others right-aligned, padded so
        that the source reads as a grid) and the notes as a list."""
        def esc(s):
            return str(s).replace("|", r"\|")

        header = [esc(c) for c in self.columns]
        body = [[esc(c) for c in row] for row in self.rows]
        widths = [max(3, len(h), *(len(r[j]) for r in body)) for j, h in enumerate(header)]

        def line(cells):
            return "| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                     for j, (c, w) in enumerate(zip(cells, widths))) + " |"

        rule = "|" + "|".join(":" + "-" * (w + 1) if j == 0 else "-" * (w + 1) + ":"
                              for j, w in enumerate(widths)) + "|"
        out = [f"**{self.title}**", "", line(header), rule]
        for i, row in enumerate(body):
            if i in self.breaks and i > 0:
                out.append(line([""] * len(widths)))
            out.append(line(row))
        if self.notes:
            out.append("")
            out.extend(f"- {n}" for n in self.notes)
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        """The numbers behind the table (no parentheses, no units in the cells), one header line."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if self.csv_rows is None:
            w.writerow(self.columns)
            w.writerows(self.rows)
        else:
            w.writerow(self.csv_columns)
            w.writerows([_csv_value(x) for x in row] for row in self.csv_rows)
        return buf.getvalue()

    def to_latex(self) -> str:
        """A ``table`` float with a booktabs ``tabular`` (``\\toprule``/``\\midrule``/``\\bottomrule``)."""
        spec = "l" + "r" * (len(self.columns) - 1)
        out = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(self.title)}}}",
               rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
               " & ".join(latex_escape(c) for c in self.columns) + r" \\", r"\midrule"]
        for i, row in enumerate(self.rows):
            if i in self.breaks and i > 0:
                out.append(r"\midrule")
            out.append(" & ".join(latex_escape(c) for c in row) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
        out += [rf"{{\footnotesize {latex_escape(n)}}}\par" for n in self.notes]
        out.append(r"\end{table}")
        return "\n".join(out) + "\n"

    def save(self, stem) -> list[Path]:
        """Write ``stem.md``, ``stem.csv`` and ``stem.tex`` (creating the folder); returns the three paths."""
        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths = []
        for ext, text in ((".md", self.to_markdown()), (".csv", self.to_csv()), (".tex", self.to_latex())):
            path = stem.with_name(stem.name + ext)
            path.write_text(text, encoding="utf-8")
            paths.append(path)
        return paths

    def __str__(self) -> str:
        return self.to_markdown()


# ---------------------------------------------------------------------------------------------- helpers
def _dec(x: float, digits: int) -> Decimal:
    """``x`` rounded half-up to ``digits`` decimals, as the decimal a reader sees (``repr`` of the float)."""
    return Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)


def _fmt(x, digits: int) -> str:
    return MISSING if x is None else f"{_dec(x, digits):.{digits}f}"


def _signed(d: Decimal, digits: int) -> str:
    return f"{'+' if d >= 0 else '-'}{abs(d):.{digits}f}"


def _score_cell(x, base, digits: int = 1, star: str = "") -> str:
    """``62.0 (-0.3)``: the score and, when ``base`` is given, the difference of the two displayed numbers."""
    if x is None:
        return MISSING
    cell = _fmt(x, digits) + star
    if base is not None:
        cell += f" ({_signed(_dec(x, digits) - _dec(base, digits), digits)})"
    return cell


def _config(run: Mapping) -> Mapping:
    return run.get("config") or {}


def _method(run: Mapping) -> str | None:
    return _config(run).get("method")


def _format_params(params: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _label(run: Mapping) -> str:
    if run.get("label"):
        return str(run["label"])
    cfg = _config(run)
    params = cfg.get("params") or {}
    name = str(cfg.get("method", "run"))
    return f"{name}({_format_params(params)})" if params else name


def _row_label(run: Mapping, is_baseline: bool, baseline_label: str | None, mark: bool = False) -> str:
    """The row's label; with ``mark``, followed by the run's evaluation protocol in brackets."""
    suffix = f" [{_protocol(run)}]" if mark else ""
    if is_baseline:
        if baseline_label is not None:
            return baseline_label + suffix
        if _method(run) == "none":
            model = _config(run).get("model")
            return (f"Baseline ({model})" if model else "Baseline") + suffix
    return _label(run) + suffix


def _protocol(run: Mapping) -> str | None:
    """The evaluation protocol a run was answered and scored under (None for runs from before protocols)."""
    return run.get("protocol") or _config(run).get("protocol")


def _protocol_marks(runs: Sequence[Mapping]) -> tuple[bool, list[str]]:
    """(mark rows?, notes): runs of different protocols in one table get their protocol in each row's label and
    a note saying that their scores are not comparable."""
    names = list(dict.fromkeys(str(_protocol(r)) for r in runs))
    if len(names) < 2:
        return False, []
    return True, [f"Runs under different evaluation protocols ({', '.join(names)}), marked in each row: their "
                  f"scores are not comparable."]


def _resolve_baseline(runs: Sequence[Mapping], baseline) -> Mapping | None:
    """``None``: the first run whose method is ``"none"`` (or no baseline); ``False``: no baseline; an int:
    that index; a string: the run with that label; a summary dict: that run (it need not be in ``runs``)."""
    if baseline is False:
        return None
    if baseline is None:
        return next((r for r in runs if _method(r) == "none"), None)
    if isinstance(baseline, bool):
        raise ValueError("baseline=True is ambiguous: pass None (auto), False, an index, a label or a run")
    if isinstance(baseline, int):
        return runs[baseline]
    if isinstance(baseline, str):
        for r in runs:
            if _label(r) == baseline:
                return r
        raise ValueError(f"no run labelled {baseline!r}; labels: {[_label(r) for r in runs]}")
    if isinstance(baseline, Mapping):
        return baseline
    raise TypeError(f"baseline must be None, False, an index, a label or a summary dict, got {baseline!r}")


def _ordered(runs: Sequence[Mapping], base: Mapping | None) -> list[Mapping]:
    """The baseline first, then the other runs in their order."""
    if base is None:
        return list(runs)
    return [base] + [r for r in runs if r is not base]


def _accuracy(run: Mapping) -> Mapping:
    return run.get("accuracy") or {}


def _benchmarks(runs: Sequence[Mapping], benchmarks) -> list[str]:
    seen: dict[str, None] = {}
    for r in runs:
        for g in _accuracy(r):
            seen.setdefault(g, None)
    if benchmarks is None:
        return list(seen)
    finals = {k for r in runs for k in (r.get("accuracy_final") or {})}
    out = []
    for b in benchmarks:
        if b in seen or b in finals:
            out.append(b)
            continue
        matches = [g for g in seen if ":" in g and g.split(":", 1)[1] == b]
        if len(matches) != 1:
            raise ValueError(f"benchmark {b!r} is in no run (or is ambiguous); groups: {list(seen)}")
        out.append(matches[0])
    return out


def _short_names(benchmarks: Sequence[str], rename: Mapping[str, str] | None) -> list[str]:
    """Column names: a dataset prefix shared by all (``synthvqa:attr -> attr``) is dropped; ``rename`` maps a
    full or a short name to the shown one."""
    prefixes = {b.split(":", 1)[0] if ":" in b else None for b in benchmarks}
    common = len(prefixes) == 1 and None not in prefixes
    rename = rename or {}
    names = []
    for b in benchmarks:
        short = b.split(":", 1)[1] if common else b
        names.append(rename.get(b, rename.get(short, short)))
    return names


def _flops_ratio(run: Mapping, base: Mapping | None) -> float | None:
    if run.get("flops_ratio") is not None:
        return float(run["flops_ratio"])
    if run.get("flops") is not None:
        if run.get("flops_baseline"):
            return run["flops"] / run["flops_baseline"]
        if base is not None and base.get("flops"):
            return run["flops"] / base["flops"]
    return None


def _unit_name(unit: float) -> str:
    name = UNIT_NAMES.get(float(unit))
    return f"FLOPs ({name})" if name else ("FLOPs" if name == "" else f"FLOPs (x{unit:g})")


def _scaled(x, unit: float):
    return None if x is None else x / unit


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _scores(run: Mapping, benchmarks: Sequence[str]) -> list[float | None]:
    acc = {**(run.get("accuracy_final") or {}), **_accuracy(run)}
    return [None if acc.get(b) is None else float(acc[b]) for b in benchmarks]


def _default_title(prefix: str, runs: Sequence[Mapping], with_data: bool = False) -> str:
    models = list(dict.fromkeys(str(_config(r).get("model")) for r in runs if _config(r).get("model")))
    title = prefix + (f" on the {', '.join(models)} model" if models else "")
    data = list(dict.fromkeys(str(_config(r).get("data")) for r in runs if _config(r).get("data")))
    if with_data and data:
        title += f" ({', '.join(data)})"
    return title


def _error_notes(runs: Sequence[Mapping], labels: Sequence[str]) -> list[str]:
    return [f"{lab}: {r['n_errors']} of {r.get('n_samples', '?')} samples failed and count as wrong."
            for r, lab in zip(runs, labels) if r.get("n_errors")]


class _Averages:
    """The Avg column: the mean over the shown benchmarks a run has, starred when it lacks some."""

    def __init__(self, base_scores: list[float | None] | None):
        self.base_scores = base_scores
        self.starred = False

    def cell(self, scores: list[float | None], is_baseline: bool) -> tuple[str, float | None]:
        have = [i for i, s in enumerate(scores) if s is not None]
        avg = _mean([scores[i] for i in have])
        if avg is None:
            return MISSING, None
        star = "*" if len(have) < len(scores) else ""
        self.starred |= bool(star)
        ref = None
        if not is_baseline and self.base_scores is not None:
            base = [self.base_scores[i] for i in have]
            ref = None if any(b is None for b in base) else _mean(base)
        return _score_cell(avg, ref, 1, star), avg

    def note(self, with_difference: bool = True) -> list[str]:
        if not self.starred:
            return []
        diff = "; its difference is to the baseline's mean over the same benchmarks" if with_difference else ""
        return [f"Avg marked * is the mean over the benchmarks that run has (the others show {MISSING}){diff}."]


# ---------------------------------------------------------------------------------------------- Table 1
def accuracy_table(runs: Sequence[Mapping], baseline=None, benchmarks: Sequence[str] | None = None,
                   flops_unit: float = 1e9, title: str | None = None, levels: Sequence[float] | None = None,
                   rename: Mapping[str, str] | None = None, baseline_label: str | None = None) -> Table:
    """Table 1/2 of the paper: ``Method | FLOPs (G) | FLOPs ratio | <benchmarks> | Avg``.

    * ``baseline``: ``None`` picks the first run whose method is ``"none"``; or an index, a label, a summary;
      ``False`` for none (no differences shown). It is the first row, named ``Baseline (<model>)`` when its
      method is ``"none"`` (``baseline_label`` overrides).
    * ``benchmarks``: groups to show (full ``"synthvqa:attr"`` or short ``"attr"`` names); by default every
      group, in order of first appearance (baseline first). Columns drop a dataset prefix common to all of
      them; ``rename`` maps a full or short name to the column name.
    * FLOPs are ``flops / flops_unit`` with 2 decimals (the unit is in the header: ``FLOPs (T)`` for 1e12),
      the ratio a whole percent, scores 1 decimal with ``(+/-difference)`` to the baseline.
    * Avg is the mean over the shown benchmarks; a run lacking some shows ``–`` there and a starred Avg.
    * ``levels``: e.g. ``(0.7, 0.5)`` puts each non-baseline run in the block of the level nearest its FLOPs
      ratio, blocks in that order (runs keep their order inside a block), with a rule between blocks.
    """
    base = _resolve_baseline(runs, baseline)
    ordered = _ordered(runs, base)
    if not ordered:
        raise ValueError("no runs to tabulate")
    benches = _benchmarks(ordered, benchmarks)
    names = _short_names(benches, rename)

    others = ordered[1:] if base is not None else ordered
    head = [base] if base is not None else []
    breaks: list[int] = []
    level_of: dict[int, float] = {}
    if levels:
        blocks: list[list[Mapping]] = [[] for _ in levels]
        for r in others:
            ratio = _flops_ratio(r, base)
            if ratio is None:
                raise ValueError(f"run {_label(r)!r} has no FLOPs ratio to place it in a level")
            k = min(range(len(levels)), key=lambda i: abs(ratio - levels[i]))
            blocks[k].append(r)
            level_of[id(r)] = levels[k]
        rows_runs = list(head)
        for block in blocks:
            if block:
                breaks.append(len(rows_runs))
                rows_runs += block
    else:
        rows_runs = head + list(others)

    base_scores = _scores(base, benches) if base is not None else None
    avgs = _Averages(base_scores)
    rows, csv_rows, labels = [], [], []
    mark, protocol_notes = _protocol_marks(rows_runs)
    for r in rows_runs:
        is_base = r is base
        label = _row_label(r, is_base, baseline_label, mark)
        scores = _scores(r, benches)
        cells = [_score_cell(s, None if is_base or base_scores is None else base_scores[i])
                 for i, s in enumerate(scores)]
        avg_cell, avg = avgs.cell(scores, is_base)
        ratio = _flops_ratio(r, base)
        flops = _scaled(r.get("flops"), flops_unit)
        rows.append([label, _fmt(flops, 2), MISSING if ratio is None else f"{_dec(ratio * 100, 0)}%",
                     *cells, avg_cell])
        csv_row = [label, flops, ratio, *scores, avg]
        if levels:
            csv_row.append(level_of.get(id(r)))
        csv_rows.append(csv_row)
        labels.append(label)

    flops_col = _unit_name(flops_unit)
    columns = ["Method", flops_col, "FLOPs ratio", *names, "Avg"]
    csv_columns = ["Method", flops_col, "FLOPs ratio", *names, "Avg"] + (["Level"] if levels else [])
    notes = avgs.note() + _error_notes(rows_runs, labels) + protocol_notes
    return Table(title or _default_title("Comparison of pruning methods", ordered), columns, rows, notes,
                 breaks, csv_columns, csv_rows)


# ---------------------------------------------------------------------------------------------- Table 3
def format_duration(seconds: float) -> str:
    """``12.3s`` under a minute, else ``16m 05s`` (``1h 02m 05s`` from an hour), seconds rounded half-up."""
    if seconds is None:
        return MISSING
    if _dec(seconds, 1) < 60:
        return f"{_dec(seconds, 1):.1f}s"
    total = int(_dec(seconds, 0))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def format_memory(mb: float) -> str:
    """``812 MB`` below 1024 MB, else gigabytes with one decimal (``9011 MB -> 8.8 GB``, 1 GB = 1024 MB)."""
    if mb is None:
        return MISSING
    if _dec(mb, 0) < 1024:
        return f"{_dec(mb, 0)} MB"
    return f"{_dec(mb / 1024, 1):.1f} GB"


def efficiency_table(runs: Sequence[Mapping], baseline=None, flops_unit: float = 1e9, title: str | None = None,
                     baseline_label: str | None = None) -> Table:
    """Table 3 of the paper: ``Method | FLOPs (G) | Prefill mean (ms) | Decode mean (ms/token) | Method (ms) |
    Total latency | Peak memory``.

    Times have 2 decimals; each non-baseline prefill carries its speed-up over the baseline's
    (``baseline prefill / run prefill``, 2 decimals: ``61.54 (1.59x)``). Total latency is the run's wall time
    (``16m 05s``), memory its peak (``8.8 GB``); notes state the memory kind, device and timing protocol.
    ``baseline`` and ``baseline_label`` work as in :func:`accuracy_table`.
    """
    base = _resolve_baseline(runs, baseline)
    ordered = _ordered(runs, base)
    if not ordered:
        raise ValueError("no runs to tabulate")
    base_prefill = base.get("prefill_ms_mean") if base is not None else None
    rows, csv_rows = [], []
    mark, protocol_notes = _protocol_marks(ordered)
    for r in ordered:
        is_base = r is base
        label = _row_label(r, is_base, baseline_label, mark)
        prefill = r.get("prefill_ms_mean")
        speedup = None
        if not is_base and prefill and base_prefill:
            speedup = base_prefill / prefill
        prefill_cell = _fmt(prefill, 2) + ("" if speedup is None else f" ({_dec(speedup, 2):.2f}x)")
        flops = _scaled(r.get("flops"), flops_unit)
        rows.append([label, _fmt(flops, 2), prefill_cell, _fmt(r.get("decode_ms_per_token_mean"), 2),
                     _fmt(r.get("method_ms_mean"), 2), format_duration(r.get("total_s")),
                     format_memory(r.get("peak_mem_mb"))])
        csv_rows.append([label, flops, prefill, speedup, r.get("decode_ms_per_token_mean"),
                         r.get("method_ms_mean"), r.get("total_s"), r.get("peak_mem_mb")])
    flops_col = _unit_name(flops_unit)
    columns = ["Method", flops_col, "Prefill mean (ms)", "Decode mean (ms/token)", "Method (ms)",
               "Total latency", "Peak memory"]
    csv_columns = ["Method", flops_col, "Prefill mean (ms)", "Prefill speed-up", "Decode mean (ms/token)",
                   "Method (ms)", "Total latency (s)", "Peak memory (MB)"]
    notes = list(protocol_notes)
    for key, what in (("peak_mem_kind", "Peak memory"), ("device", "Device"), ("timing_protocol", "Timing")):
        values = list(dict.fromkeys(str(r[key]) for r in ordered if r.get(key) is not None))
        if len(values) == 1:
            notes.append(f"{what}: {values[0]}.")
        elif values:
            notes.append(f"{what} differs between runs: {'; '.join(values)}.")
    return Table(title or _default_title("Inference latency and peak memory", ordered, with_data=True), columns,
                 rows, notes, [], csv_columns, csv_rows)


# ---------------------------------------------------------------------------------------------- Figure 11
def _series_name(run: Mapping, param: str) -> str:
    """The run's label without ``param=...`` (``fastv(k=2, keep_ratio=0.5) -> fastv(k=2)``); a label that
    does not show the parameter is replaced by the method and its other parameters from the config."""
    label = _label(run)
    pattern = re.compile(rf"(?<![\w.]){re.escape(param)}\s*=\s*[^,()]*")
    m = re.match(r"^(.*?)\((.*)\)\s*$", label)
    if m and pattern.search(m.group(2)):
        items = [it.strip() for it in m.group(2).split(",")]
        items = [it for it in items if not pattern.fullmatch(it)]
        return f"{m.group(1)}({', '.join(items)})" if items else m.group(1)
    cfg = _config(run)
    params = {k: v for k, v in (cfg.get("params") or {}).items() if k != param}
    name = str(cfg.get("method", label))
    return f"{name}({_format_params(params)})" if params else name


def _sweep_points(runs: Sequence[Mapping], param: str, base: Mapping | None):
    """``{series: [(value, run), ...]}`` (descending values, series in order of first appearance) and the
    labels of the runs without the parameter."""
    series: dict[str, list] = {}
    skipped = []
    for r in runs:
        if r is base:
            continue
        params = _config(r).get("params") or {}
        if params.get(param) is None:
            skipped.append(_label(r))
            continue
        try:
            value = float(params[param])
        except (TypeError, ValueError):
            raise ValueError(f"run {_label(r)!r}: {param}={params[param]!r} is not a number") from None
        series.setdefault(_series_name(r, param), []).append((value, r))
    if not series:
        raise ValueError(f"no run has config.params[{param!r}]")
    for points in series.values():
        points.sort(key=lambda p: -p[0])
    return series, skipped


def sweep_table(runs: Sequence[Mapping], param: str = "keep_ratio", benchmarks: Sequence[str] | None = None,
                baseline=None, title: str | None = None, rename: Mapping[str, str] | None = None,
                baseline_label: str | None = None) -> Table:
    """The numbers of Figure 11: ``Method | <param> | FLOPs ratio | <benchmarks> | Avg``, one row per run.

    ``Method`` is the label without the swept parameter (one figure line each), rows of a method by
    decreasing parameter value; the baseline (as in :func:`accuracy_table`) comes first with ``–`` for the
    parameter. Scores have 1 decimal and no differences. Runs without ``config.params[param]`` are left out
    (a note names them).
    """
    base = _resolve_baseline(runs, baseline)
    series, skipped = _sweep_points(runs, param, base)
    ordered = _ordered([r for pts in series.values() for _, r in pts], base)
    benches = _benchmarks(ordered, benchmarks)
    names = _short_names(benches, rename)
    avgs = _Averages(None)
    rows, csv_rows = [], []
    entries = ([(_row_label(base, True, baseline_label), None, base)] if base is not None else [])
    entries += [(name, v, r) for name, pts in series.items() for v, r in pts]
    for name, value, r in entries:
        scores = _scores(r, benches)
        avg_cell, avg = avgs.cell(scores, True)
        ratio = _flops_ratio(r, base)
        rows.append([name, MISSING if value is None else f"{value:g}",
                     MISSING if ratio is None else f"{_dec(ratio * 100, 0)}%",
                     *[_score_cell(s, None) for s in scores], avg_cell])
        csv_rows.append([name, value, ratio, *scores, avg])
    notes = avgs.note(with_difference=False)
    if skipped:
        notes.append(f"Left out (no {param}): {', '.join(skipped)}.")
    columns = ["Method", param, "FLOPs ratio", *names, "Avg"]
    return Table(title or _default_title(f"Accuracy across {param}", ordered), columns, rows, notes, [],
                 list(columns), csv_rows)


def plot_sweep(runs: Sequence[Mapping], path, param: str = "keep_ratio", benchmarks: Sequence[str] | None = None,
               average: bool = True, baseline=None, title: str | None = None,
               rename: Mapping[str, str] | None = None) -> Path:
    """Figure 11: accuracy against ``config.params[param]``, one panel per benchmark (all by default; ``()``
    for none) plus an ``Avg`` panel (``average=True``: the mean over the shown benchmarks, over all of them for
    ``benchmarks=()``; only runs with every one of them enter it), one line
    per method label without the parameter, and the baseline (as in :func:`accuracy_table`; ``False`` for
    none) as a dashed horizontal line. Drawn on a Figure with the Agg canvas (no pyplot); returns ``path``.
    """
    from matplotlib.figure import Figure

    base = _resolve_baseline(runs, baseline)
    series, _ = _sweep_points(runs, param, base)
    ordered = _ordered([r for pts in series.values() for _, r in pts], base)
    benches = _benchmarks(ordered, benchmarks)  # the panels
    averaged = benches or _benchmarks(ordered, None)  # the Avg panel: the shown benchmarks, or all for ()

    def value_of(run: Mapping, panel: int):
        if panel < len(benches):
            return _scores(run, benches)[panel]
        scores = _scores(run, averaged)
        return None if any(s is None for s in scores) else _mean(scores)

    panels = (_short_names(benches, rename) if benches else []) + (["Avg"] if average and averaged else [])
    if not panels:
        raise ValueError("nothing to plot: no benchmarks (and no average)")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for k, name in enumerate(panels):
        ax = axes[k]
        for sname, pts in series.items():
            xy = sorted((v, value_of(r, k)) for v, r in pts if value_of(r, k) is not None)
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=sname)
        if base is not None and value_of(base, k) is not None:
            ax.axhline(value_of(base, k), linestyle="--", color="gray",
                       label=_row_label(base, True, None))
        ax.set_title(name)
        ax.set_xlabel(param)
        ax.set_ylabel("Accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.suptitle(title or _default_title(f"Accuracy across {param}", ordered))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
