"""The evaluation runner: generation timings, records and summary, resumption, errors, validation, torchrun.

The model is the tiny random MLLM of ``runner_fixture_model`` (8 layers, 16 visual tokens, one token per byte),
on a SynthVQA folder with 2 questions per family (10 samples, 2 images). Its answers are garbage; what is
checked is the bookkeeping.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import runner_fixture_model as fx  # noqa: E402
from mambaprune.data import SynthConfig, generate_synthvqa, load_dataset  # noqa: E402
from mambaprune.eval import runner as R  # noqa: E402
from mambaprune.eval.metrics import get_metric  # noqa: E402
from mambaprune.eval.cli import add_eval_arguments, config_from_args, parse_value  # noqa: E402
from mambaprune.eval.config import EvalConfig, validate  # noqa: E402
from mambaprune.eval.loop import TIMING_FIELDS, TIMING_PROTOCOL  # noqa: E402
from mambaprune.eval.records import read_records  # noqa: E402
from mambaprune.eval.runner import run_eval  # noqa: E402
from mambaprune.eval.summary import SUMMARY_TIMING_FIELDS  # noqa: E402
from mambaprune.flops import lm_macs  # noqa: E402
from mambaprune.models.vlm import MambaVLM  # noqa: E402
from mambaprune.pruning import build  # noqa: E402

MODEL = "runner_fixture_model:load_tiny"
REPO = Path(__file__).resolve().parents[1]
N_SAMPLES = 10
SUMMARY_KEYS = {"config", "label", "n_samples", "n_errors", "n_scored", "accuracy", "metrics", "average", "flops",
                "flops_baseline", "flops_ratio", "tokens_per_layer_mean", "prefill_ms_mean",
                "decode_ms_per_token_mean", "method_ms_mean", "total_s", "peak_mem_mb", "peak_mem_kind",
                "timing_protocol", "device", "world_size", "max_new_tokens", "protocol"}


class Killed(BaseException):
    """What a kill looks like to the runner: not an Exception, so nothing records or swallows it."""


pytestmark = pytest.mark.usefixtures("one_thread")


#: the score each test sample gets from the unpruned tiny model once the data fixture has scripted its answers
SCRIPTED_SCORES = {"attr/30000001": 0.0, "attr/30000011": 0.0, "exist/random/1": 1.0, "exist/popular/1": 0.0,
                   "read/30000003": 0.3, "read/30000013": 0.9, "count/30000004": 0.0, "count/30000014": 0.6,
                   "spatial/0": 0.0, "spatial/1": 0.0}


def _script_answers(root: Path) -> None:
    """Rewrite some test answers so that the tiny model's own (garbage, unpruned) answers score a known mix:
    read/30000003 is one of its ten human answers (VQA accuracy (9 * 1/3 + 1 * 0) / 10 = 0.3), read/30000013
    three of them ((3 * 2/3 + 7 * 1) / 10 = 0.9), count/30000014 two of them ((2 * 1/3 + 8 * 2/3) / 10 = 0.6);
    exist/popular/1 is labelled "no" (the model says yes to anything); the rest keep the true answers, which the
    model never gives (score 0; exist/random/1, labelled yes, 1)."""
    model = fx.load_tiny()
    said = {s.id: model.answer(s.image, s.question) for s in load_dataset("synthvqa", root)}
    path = root / "textvqa" / "TextVQA_synth_test.json"
    text = json.loads(path.read_text())
    for q in text["data"]:
        k = {30000003: 1, 30000013: 3}[q["question_id"]]
        assert said[f"read/{q['question_id']}"] not in q["answers"]
        q["answers"] = [said[f"read/{q['question_id']}"]] * k + q["answers"][k:]
    path.write_text(json.dumps(text))
    path = root / "vqav2" / "v2_synth_test_annotations.json"
    counts = json.loads(path.read_text())
    for a in counts["annotations"]:
        if a["question_id"] == 30000014:
            for h in a["answers"][:2]:
                h["answer"] = said["count/30000014"]
    path.write_text(json.dumps(counts))
    path = root / "pope" / "synth_test_pope_popular.json"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(q["question_id"], q["label"]) for q in lines] == [(1, "yes")]
    lines[0]["label"] = "no"
    path.write_text("".join(json.dumps(q) + "\n" for q in lines))


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("runner") / "synth"
    generate_synthvqa(root, SynthConfig(seed=1, per_family=2, train_multiplier=1))
    _script_answers(root)
    return root


def make_config(data, out, **kw) -> EvalConfig:
    kw.setdefault("model", MODEL)
    kw.setdefault("device", "cpu")          # the runner's default is cuda where there is one; these runs mean the CPU
    return EvalConfig(data="synthvqa", data_root=str(data), out=str(out), **kw)


DTP = dict(method="dtp", params={"keep_ratio": 0.5})


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The uninterrupted reference runs: {"none": (summary, records), "dtp": ...}."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, kw in (("none", {}), ("dtp", DTP)):
        cfg = make_config(data, base / name, **kw)
        summary = run_eval(cfg, progress=False)
        out[name] = (cfg, summary, read_records(base / name / "samples.jsonl"))
    return out


def no_timing(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING_FIELDS}


def comparable(summary: dict, drop=()) -> dict:
    s = {k: v for k, v in summary.items() if k not in SUMMARY_TIMING_FIELDS and k not in drop}
    if "config" in s:
        s["config"] = {k: v for k, v in s["config"].items() if k != "out"}
    return s


# ------------------------------------------------------------------------------------------------ timings
def test_generate_timings_keep_tokens_and_time_every_step(data):
    model = fx.load_tiny()
    steps = []
    step = model.lm.step
    model.lm.step = lambda token, cache: (steps.append(1), step(token, cache))[1]
    samples = load_dataset("synthvqa", data)[:4]
    lengths = set()
    for s in samples:
        for pruner in (None, build("dtp", keep_ratio=0.5)):
            plain = model.generate(s.image, s.question, pruner=pruner)
            timings = {}
            steps.clear()
            timed = model.generate(s.image, s.question, pruner=pruner, timings=timings)
            assert torch.equal(plain, timed)
            assert len(timings["decode_s"]) == len(steps) == timed.shape[1] - 1
            assert all(t > 0 for t in timings["decode_s"]) and timings["prefill_s"] > 0
            n_text = len(f"Q: {s.question} A:".encode())             # one token per byte
            if pruner is None:
                assert timings["tokens_per_layer"] == [16 + n_text] * 8
                assert timings["method_s"] == 0.0
            else:   # early 2 = int(0.25 * 8), late 5 = int(0.7 * 8), 8 of 16 visual tokens kept
                assert timings["tokens_per_layer"] == [16 + n_text] * 3 + [8 + n_text] * 2 + [n_text] * 3
                assert timings["method_s"] == pruner.method_seconds > 0
            lengths.add(timed.shape[1])
            timings = {}
            assert model.answer(s.image, s.question, pruner=pruner, timings=timings) == model.decode(plain)[0]
            assert timings["tokens_per_layer"][0] == 16 + n_text
    assert len(lengths) > 1                       # answers of different lengths: steps really were counted


# ------------------------------------------------------------------------------------------------ summary
def test_records_and_summary(runs, data):
    samples = load_dataset("synthvqa", data)
    model = fx.load_tiny()
    cfg_lm = model.lm.config
    for name in ("none", "dtp"):
        cfg, summary, records = runs[name]
        assert SUMMARY_KEYS <= set(summary)
        assert json.loads((Path(cfg.out) / "summary.json").read_text()) == summary
        assert summary["n_samples"] == N_SAMPLES == len(records) and summary["n_errors"] == 0
        assert [r["id"] for r in records] == [s.id for s in samples]
        assert [r["index"] for r in records] == list(range(N_SAMPLES))
        assert summary["label"] == {"none": "none", "dtp": "dtp(keep_ratio=0.5)"}[name]
        assert summary["timing_protocol"] == TIMING_PROTOCOL
        assert (summary["world_size"], summary["device"], summary["peak_mem_kind"]) == (1, "cpu", "cpu_peak_rss")
        assert summary["max_new_tokens"] == fx.SPEC.max_new_tokens and summary["peak_mem_mb"] > 0
        for s, r in zip(samples, records):
            n_text = len(f"Q: {s.question} A:".encode())
            assert (r["n_visual"], r["n_text"], r["group"], r["answers"]) == (16, n_text, s.group, s.answers)
            full = [16 + n_text] * 8
            expected = full if name == "none" else [16 + n_text] * 3 + [8 + n_text] * 2 + [n_text] * 3
            assert r["tokens_per_layer"] == expected
            assert r["flops"] == lm_macs(cfg_lm, expected) and r["flops_baseline"] == lm_macs(cfg_lm, full)
            assert r["score"] == get_metric(s.metric).score(r["prediction"], s.answers)
            assert r["n_decode_steps"] == r["n_new_tokens"] - 1 and 1 <= r["n_new_tokens"] <= 6
            assert r["error"] is None and r["batch_size"] == 1
        groups = sorted({s.group for s in samples})
        assert sorted(summary["accuracy"]) == groups
        for g in groups:
            scores = [r["score"] for r in records if r["group"] == g]
            assert summary["accuracy"][g] == pytest.approx(100 * sum(scores) / len(scores))
            assert summary["metrics"][g]["n"] == len(scores) == 2
        assert summary["average"] == pytest.approx(sum(summary["accuracy"].values()) / len(groups))
        assert summary["flops"] == pytest.approx(sum(r["flops"] for r in records) / N_SAMPLES)
        assert summary["flops_ratio"] == sum(r["flops"] for r in records) / sum(r["flops_baseline"] for r in records)
        assert summary["tokens_per_layer_mean"] == pytest.approx(
            [sum(r["tokens_per_layer"][l] for r in records) / N_SAMPLES for l in range(8)])
        steps = sum(r["n_decode_steps"] for r in records)
        assert summary["decode_ms_per_token_mean"] == pytest.approx(sum(r["decode_ms"] for r in records) / steps)
    assert runs["none"][1]["flops_ratio"] == 1.0
    assert 0.5 < runs["dtp"][1]["flops_ratio"] < 1.0
    # the unpruned run on the scripted answers, by hand: mixed scores, distinct answers
    none, records = runs["none"][1], runs["none"][2]
    assert {r["id"]: r["score"] for r in records} == pytest.approx(SCRIPTED_SCORES, abs=1e-12)
    assert len({r["prediction"] for r in records if r["prediction"]}) == sum(bool(r["prediction"]) for r in records) > 5
    assert none["accuracy"] == pytest.approx({"synthvqa:attr": 0.0, "synthvqa:exist": 50.0, "synthvqa:read": 60.0,
                                              "synthvqa:count": 30.0, "synthvqa:spatial": 0.0})
    assert none["average"] == pytest.approx(28.0)
    # POPE, 1 true yes and 1 false yes: precision 1/2, recall 1/1, F1 2/3, yes ratio 1
    assert none["metrics"]["synthvqa:exist"] == pytest.approx(
        {"accuracy": 50.0, "precision": 50.0, "recall": 100.0, "f1": 200 / 3, "yes_ratio": 100.0, "n": 2,
         "n_errors": 0})
    # the records hold what the model answers outside the runner
    for s, r in zip(samples[:3], runs["none"][2]):
        assert r["prediction"] == model.answer(s.image, s.question)
    # the POPE group carries its full summary, in percent
    pope = runs["none"][1]["metrics"]["synthvqa:exist"]
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(pope)


def test_summary_of_hand_made_records():
    """summarize_records on records made by hand, with unequal groups, an error, mixed scores and costs, where
    each average differs from its tempting alternative (macro vs micro, sum/sum vs mean of ratios, all decoding
    time / all steps vs mean of per-record rates)."""
    def rec(group, metric, prediction, answers, flops, base, tpl, prefill, decode, steps, method, error=None):
        if error is not None:
            return dict(group=group, metric=metric, prediction=None, answers=answers, score=None, flops=None,
                        flops_baseline=None, tokens_per_layer=None, prefill_ms=None, decode_ms=None,
                        n_decode_steps=None, method_ms=None, error=error)
        score = float(get_metric(metric).score(prediction, answers))
        return dict(group=group, metric=metric, prediction=prediction, answers=answers, score=score, flops=flops,
                    flops_baseline=base, tokens_per_layer=tpl, prefill_ms=prefill, decode_ms=decode,
                    n_decode_steps=steps, method_ms=method, error=None)

    records = [
        rec("a", "exact_match", "red", ["red"], 10, 20, [4, 2], 1.0, 6.0, 3, 0.5),
        rec("a", "exact_match", "blue", ["red"], 30, 40, [6, 2], 2.0, 2.0, 1, 0.25),
        rec("a", "exact_match", "Red.", ["red"], 20, 40, [5, 5], 3.0, 0.0, 0, 0.0),
        rec("b", "vqa_accuracy", "2", ["2", "2"] + ["3"] * 8, 40, 40, [8, 8], 6.0, 12.0, 4, 1.0),
        rec("b", "vqa_accuracy", None, ["2"], None, None, None, None, None, None, None, error="OSError: gone"),
        rec("c", "pope", "yes", ["yes"], 10, 10, [1, 1], 1.0, 0.0, 0, 0.0),
        rec("c", "pope", "no", ["yes"], 10, 10, [1, 1], 1.0, 0.0, 0, 0.0),
        rec("c", "pope", "Yes, there is.", ["no"], 10, 10, [1, 1], 1.0, 0.0, 0, 0.0),
        rec("c", "pope", "no", ["no"], 10, 10, [1, 1], 1.0, 0.0, 0, 0.0),
    ]
    s = R.summarize_records(records, {"method": "dtp", "params": {"keep_ratio": 0.5}}, world_size=3)
    assert (s["label"], s["n_samples"], s["n_errors"], s["n_scored"], s["world_size"]) == (
        "dtp(keep_ratio=0.5)", 9, 1, 8, 3)
    # a: 2 of 3 exact ("Red." normalises to "red"); b: VQA accuracy 0.6 (the error is not scored); c: POPE 2/4
    assert [r["score"] for r in records if r["error"] is None] == pytest.approx([1, 0, 1, 0.6, 1, 0, 0, 1])
    assert s["accuracy"] == pytest.approx({"a": 200 / 3, "b": 60.0, "c": 50.0})
    assert s["average"] == pytest.approx((200 / 3 + 60 + 50) / 3)                 # 58.89, not the micro 57.5
    assert s["metrics"]["b"] == pytest.approx({"accuracy": 60.0, "n": 1, "n_errors": 1})
    assert s["metrics"]["c"] == pytest.approx({"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0,
                                               "yes_ratio": 50.0, "n": 4, "n_errors": 0})
    assert s["flops"] == pytest.approx(140 / 8) and s["flops_baseline"] == pytest.approx(180 / 8)
    assert s["flops_ratio"] == pytest.approx(140 / 180)                           # not the mean ratio 0.84
    assert s["tokens_per_layer_mean"] == pytest.approx([27 / 8, 21 / 8])
    assert s["prefill_ms_mean"] == pytest.approx(16 / 8) and s["method_ms_mean"] == pytest.approx(1.75 / 8)
    assert s["decode_ms_per_token_mean"] == pytest.approx(20 / 8)                 # not the mean rate 2.33
    empty = R.summarize_records([records[4]], {"method": "none"})
    assert empty["accuracy"] == {"b": None} and empty["average"] is None and empty["flops_ratio"] is None


def test_batches_give_each_sample_its_own_counts(runs, data, tmp_path):
    cfg, _, single = runs["dtp"]
    batched = run_eval(replace(cfg, out=str(tmp_path / "b3"), batch_size=3), progress=False)
    records = read_records(tmp_path / "b3" / "samples.jsonl")
    assert [r["batch_size"] for r in records] == [3] * 9 + [1]
    for a, b in zip(single, records):
        assert (a["id"], a["prediction"], a["tokens_per_layer"], a["flops"], a["n_new_tokens"]) == \
               (b["id"], b["prediction"], b["tokens_per_layer"], b["flops"], b["n_new_tokens"])
    for k in range(0, 9, 3):                                    # one batch, one share of its time each
        assert len({records[i]["prefill_ms"] for i in range(k, k + 3)}) == 1
    assert batched["flops_ratio"] == runs["dtp"][1]["flops_ratio"]


# ------------------------------------------------------------------------------------------------ resuming
def test_kill_and_resume_equals_an_uninterrupted_run(runs, tmp_path, monkeypatch):
    cfg, reference, ref_records = runs["dtp"]
    cfg = replace(cfg, out=str(tmp_path / "run"))
    path = tmp_path / "run" / "samples.jsonl"
    generate = MambaVLM.generate_prepared

    def kill_after(n_calls):                                    # warm-up calls count too
        calls = [0]

        def gen(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] > n_calls:
                raise Killed
            return generate(self, *args, **kwargs)
        monkeypatch.setattr(MambaVLM, "generate_prepared", gen)

    kill_after(3)                                               # warm-up + 2 samples
    with pytest.raises(Killed):
        run_eval(cfg, progress=False)
    assert [r["id"] for r in read_records(path, repair=False)] == [r["id"] for r in ref_records[:2]]
    total_1 = json.loads((tmp_path / "run" / "state.json").read_text())["total_s"]
    with open(path, "ab") as f:
        f.write(b'{"index": 2, "id": "exist/ran')               # killed in the middle of a write
    kill_after(5)                                               # warm-up + 4 samples
    with pytest.raises(Killed):
        run_eval(cfg, progress=False)
    assert len(read_records(path, repair=False)) == 6
    assert json.loads((tmp_path / "run" / "state.json").read_text())["total_s"] > total_1
    with open(path, "ab") as f:
        f.write(b'{"index": 6, "id": "read/')
    monkeypatch.setattr(MambaVLM, "generate_prepared", generate)

    def killed_summary(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(R, "summarize_records", killed_summary)  # every record written, then killed
    with pytest.raises(Killed):
        run_eval(cfg, progress=False)
    assert not (tmp_path / "run" / "summary.json").exists()
    monkeypatch.undo()

    loaded = []
    monkeypatch.setattr(R, "_load_model", lambda *a: loaded.append(1))
    summary = run_eval(cfg, progress=False)                     # nothing left to answer: no model is loaded
    assert loaded == []
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]              # every line whole
    assert [r["id"] for r in records] == [r["id"] for r in ref_records]     # each sample once, in order
    assert [no_timing(r) for r in records] == [no_timing(r) for r in ref_records]
    assert len({r["score"] for r in records}) >= 4 and len(set(summary["accuracy"].values())) >= 4  # mixed
    assert comparable(summary) == comparable(reference)
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


def test_read_records_repairs_only_the_last_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "x": 1}\n{"id": "b"}\n{"id": "a", "x": 2}\n{"id": "c"')
    assert read_records(path) == [{"id": "a", "x": 1}, {"id": "b"}]          # duplicates: the first one
    assert path.read_text() == '{"id": "a", "x": 1}\n{"id": "b"}\n{"id": "a", "x": 2}\n'
    path.write_text('{"id": "a"}\n{"id": "b"}\n\x00\x00\n')                  # a damaged but complete last line
    assert read_records(path) == [{"id": "a"}, {"id": "b"}] and path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_records(path)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("damage, needle", [("missing", "image file not found"), ("garbage", "cannot read image")])
def test_unreadable_image_is_an_error_record(data, tmp_path, damage, needle):
    root = tmp_path / "synth"
    shutil.copytree(data, root)
    samples = load_dataset("synthvqa", root)
    bad = samples[0].image
    if damage == "missing":
        bad.unlink()
    else:
        bad.write_bytes(b"this is not a png")
    hit = [s.id for s in samples if s.image == bad]
    assert 0 < len(hit) < N_SAMPLES
    cfg = EvalConfig(model=MODEL, data="synthvqa", data_root=str(root), out=str(tmp_path / "run"), device="cpu")
    summary = run_eval(cfg, progress=False)
    records = read_records(tmp_path / "run" / "samples.jsonl")
    assert summary["n_samples"] == N_SAMPLES and summary["n_errors"] == len(hit)
    assert summary["n_scored"] == N_SAMPLES - len(hit)
    for r in records:
        if r["id"] in hit:
            assert needle in r["error"] and r["score"] is None and r["prediction"] is None and r["flops"] is None
        else:
            assert r["error"] is None and r["score"] is not None
    for g, acc in summary["accuracy"].items():
        scores = [r["score"] for r in records if r["group"] == g and r["error"] is None]
        assert acc == pytest.approx(100 * sum(scores) / len(scores))
        assert summary["metrics"][g]["n_errors"] == sum(r["group"] == g and r["id"] in hit for r in records)
    ok = [r for r in records if r["error"] is None]
    assert summary["flops"] == pytest.approx(sum(r["flops"] for r in ok) / len(ok))
    # by hand: the samples of the second image alone are scored (SCRIPTED_SCORES), one per family
    assert sorted(hit) == ["attr/30000001", "count/30000004", "exist/random/1", "read/30000003", "spatial/0"]
    assert summary["accuracy"] == pytest.approx({"synthvqa:attr": 0.0, "synthvqa:exist": 0.0, "synthvqa:read": 90.0,
                                                 "synthvqa:count": 60.0, "synthvqa:spatial": 0.0})
    assert summary["average"] == pytest.approx(30.0)
    # a restart with fatal_errors (not part of a run's identity) keeps the records and raises nothing
    assert comparable(run_eval(replace(cfg, fatal_errors=True), progress=False), ["config"]) == \
        comparable(summary, ["config"])
    with pytest.raises((FileNotFoundError, ValueError), match=needle):
        run_eval(replace(cfg, out=str(tmp_path / "fatal"), fatal_errors=True), progress=False)


def test_a_folder_of_another_run_is_refused(data, tmp_path):
    cfg = make_config(data, tmp_path / "run", limit=1, warmup=0)
    first = run_eval(cfg, progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"] == json.loads(json.dumps(asdict(cfg)))
    with pytest.raises(ValueError, match="method: 'none' there, 'dtp' now"):
        run_eval(replace(cfg, **DTP), progress=False)
    with pytest.raises(ValueError, match="limit: 1 there, 2 now"):
        run_eval(replace(cfg, limit=2), progress=False)
    assert comparable(run_eval(cfg, progress=False)) == comparable(first)
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "samples.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="no run.json"):
        run_eval(replace(cfg, out=str(tmp_path / "stray")), progress=False)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("change, needle", [
    (dict(method="dtp", params={"keep_ratio": 0}), r"keep_ratio must be in \(0, 1\].*got 0$"),
    (dict(method="fastv", params={"keep_ratio": 1.5}), r"keep_ratio.*got 1\.5$"),
    (dict(method="dtp", params={"early_layer": 5, "late_layer": 3}), r"late_layer \(3\).*early_layer \(5\)"),
    (dict(method="fastv", params={"layer": 9}), r"layer = 9 is outside \[0, 7\]"),
    (dict(method="vtw", params={"layer": 12}), r"layer = 12 is outside \[0, 8\]"),
    (dict(method="nosuch"), r"unknown pruning method 'nosuch'"),
    (dict(method="dtp", params={"bogus": 1}), r"no parameter\(s\) bogus"),
    (dict(data="nosuch"), r"unknown dataset 'nosuch'"),
    (dict(split="dev"), r"no split 'dev'"),
    (dict(limit=0), r"limit.*got 0"),
    (dict(batch_size=0), r"batch_size.*got 0"),
    (dict(dtype="float8"), r"dtype 'float8'"),
    (dict(model="runner_fixture_model:nosuch_loader"), r"nosuch_loader"),
    (dict(model="no_such_model_name"), r"unknown model 'no_such_model_name'"),
])
def test_invalid_configs_fail_before_loading(data, tmp_path, change, needle):
    cfg = replace(make_config(data, tmp_path / "out", model="runner_fixture_model:load_forbidden"), **change)
    with pytest.raises(ValueError, match=needle):
        validate(cfg)
    with pytest.raises(ValueError, match=needle):
        run_eval(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_valid_config_reaches_the_loader(data, tmp_path):
    cfg = make_config(data, tmp_path / "out", model="runner_fixture_model:load_forbidden", method="dtp",
                      params={"keep_ratio": 1.0, "early_layer": 1, "late_layer": 8})
    pruner = validate(cfg)
    assert (pruner.early_layer, pruner.late_layer, pruner.seed) == (1, 8, 0)
    with pytest.raises(RuntimeError, match="load_forbidden was called"):
        run_eval(cfg, progress=False)


def test_layers_are_checked_after_loading_without_describe(data, tmp_path):
    cfg = make_config(data, tmp_path / "out", model="runner_fixture_model:load_tiny_undescribed", method="fastv",
                      params={"layer": 9})
    validate(cfg)                                               # the depth is unknown before loading
    with pytest.raises(ValueError, match="layer = 9 is outside"):
        run_eval(cfg, progress=False)
    assert not (tmp_path / "out" / "samples.jsonl").exists()


def test_testbed_describe_reads_the_config_only(data, tmp_path):
    from mambaprune.models.testbed import FORMAT, FORMAT_VERSION, TestbedConfig, load_testbed

    folder = tmp_path / "testbed"
    folder.mkdir()
    config = TestbedConfig(image_size=64, patch_size=16, n_layer=6)
    (folder / "config.json").write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION,
                                                    "config": asdict(config)}))
    assert load_testbed.describe(folder) == {"n_layer": 6, "d_model": 128, "num_visual": 16}
    cfg = make_config(data, tmp_path / "out", model="testbed", model_args={"folder": str(folder)}, method="vtw",
                      params={"layer": 7})
    with pytest.raises(ValueError, match=r"layer = 7 is outside \[0, 6\]"):   # no weights there: not loaded
        validate(cfg)


# ------------------------------------------------------------------------------------------------ command line
def test_flags_override_the_config_file(tmp_path):
    import argparse

    path = tmp_path / "cfg.yaml"
    path.write_text("model: testbed\ndata: synthvqa:read\ndata_root: /d\nout: /o\nmethod: dtp\n"
                    "params: {keep_ratio: 0.5, early_layer: 2}\nlimit: 3\n")
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--config", str(path), "--param", "keep_ratio=0.7", "--param", "late_pruning=false",
                              "--limit", "5", "--model-arg", "folder=/m", "--fatal-errors"])
    cfg = config_from_args(args)
    assert cfg == EvalConfig(model="testbed", data="synthvqa:read", data_root="/d", out="/o", method="dtp",
                             params={"keep_ratio": 0.7, "early_layer": 2, "late_pruning": False}, limit=5,
                             model_args={"folder": "/m"}, fatal_errors=True)
    assert config_from_args(parser.parse_args(["--config", str(path)])).fatal_errors is False
    with pytest.raises(ValueError, match="out"):
        config_from_args(parser.parse_args(["--model", "m", "--data", "gqa", "--data-root", "/d"]))
    assert [parse_value(v) for v in ("3", "-2", "0.5", "1e-3", "true", "False", "none", "delta", "nan")] == \
        [3, -2, 0.5, 1e-3, True, False, None, "delta", "nan"]


def test_torchrun_two_processes_match_one(runs, tmp_path):
    cfg, reference, ref_records = runs["dtp"]
    out = tmp_path / "ddp"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(asdict(replace(cfg, out=str(out)))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}       # the same arithmetic as the reference run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mambaprune.eval.cli", "--config", str(path), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [read_records(out / f"samples.rank{r}.jsonl") for r in range(2)]
    assert [[x["id"] for x in recs] for recs in ranks] == [[x["id"] for x in ref_records[r::2]] for r in range(2)]
    records = read_records(out / "samples.jsonl")
    assert [no_timing(r) for r in records] == [no_timing(r) for r in ref_records]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert comparable(summary, ["world_size"]) == comparable(reference, ["world_size"])
