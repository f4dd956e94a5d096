"""Evaluation protocols (mambaprune.eval.protocols): the exact prompt strings the released evaluation code builds,
candidate-probability answers from the prefill's first-step logits, RoboMamba's decoding that never stops at EOS,
and the harness's records under a protocol."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import runner_fixture_model as fx  # noqa: E402
from mambaprune.data import SynthConfig, generate_synthvqa, load_dataset  # noqa: E402
from mambaprune.data.readers import Sample  # noqa: E402
from mambaprune.eval.config import EvalConfig, validate  # noqa: E402
from mambaprune.eval.protocols import (PROTOCOLS, Protocol, Task, build_prompt, get_protocol,  # noqa: E402
                                       register_protocol)
from mambaprune.eval.records import read_records  # noqa: E402
from mambaprune.eval.runner import run_eval  # noqa: E402
from mambaprune.models.cobra import COBRA_SPEC  # noqa: E402
from mambaprune.models.robomamba import ROBOMAMBA_SPEC  # noqa: E402
from mambaprune.pruning import build  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(question, group="g", **kw):
    return Sample(id="1", image=Path("x.jpg"), question=question, answers=["a"], metric="vqa_accuracy", group=group,
                  **kw)


# --- prompts, byte for byte ---------------------------------------------------------------------------------------
# Cobra: vlm-evaluation (h-zhao1997 fork, b0a691f) vlm_eval/models/cobra.py l. 117-161 builds the message; Cobra's
# ZephyrChatPromptBuilder (h-zhao1997/cobra cobra/models/backbones/llm/prompting/zephyr_prompter.py l. 16-35)
# removes "<image>", strips, and wraps it as "<|user|>\n{msg}<|endoftext|>\n<|assistant|>\n".
COBRA_EXPECTED = {
    "vqav2": ("What is he on top of?",
              "<|user|>\nWhat is he on top of?\nAnswer the question using a single word or phrase.<|endoftext|>\n"
              "<|assistant|>\n"),
    "gqa": ("Is the sky dark?",
            "<|user|>\nIs the sky dark?\nAnswer the question using a single word or phrase.<|endoftext|>\n"
            "<|assistant|>\n"),
    "pope": ("Is there a snowboard in the image?",
             "<|user|>\nIs there a snowboard in the image?\nAnswer the question using a single word or phrase."
             "<|endoftext|>\n<|assistant|>\n"),
    # cobra.py l. 137-139: the uncertainty_aware "trigger phrase" before the short-answer line
    "vizwiz": ("What is this?",
               "<|user|>\nWhat is this?\nWhen the provided information is insufficient, respond with "
               "'Unanswerable'.\nAnswer the question using a single word or phrase.<|endoftext|>\n<|assistant|>\n"),
    # harnesses/textvqa.py l. 165-166: Pure = the question before "\nReference OCR token:"
    "textvqa": ("what is the brand of this camera?",
                "<|user|>\nwhat is the brand of this camera?\nAnswer the question using a single word or phrase."
                "<|endoftext|>\n<|assistant|>\n"),
    # cobra.py l. 124-127: the OCR line moved before the question
    "textvqa:ocr": ("what is the brand of this camera?",
                    "<|user|>\nReference OCR token: dakota, digital, single-use, camera\nwhat is the brand of this "
                    "camera?\nAnswer the question using a single word or phrase.<|endoftext|>\n<|assistant|>\n"),
    # cobra.py l. 147-161: the true/false statement prompt, from the caption
    "vsr": ("The car is behind the suitcase.",
            '<|user|>\nBased on the image, is this statement "True" or "False"? The car is behind the suitcase.\n'
            'Respond with "True" or "False" directly.<|endoftext|>\n<|assistant|>\n'),
}

# RoboMamba: src/test.py l. 375 tokenizes "<image>Question:{q} Answer:"; l. 141-149 appends VizWiz's instruction to
# the question as released (no separator, "insuffcient", a trailing space: two spaces before "Answer:").
ROBOMAMBA_EXPECTED = {
    "pope": ("Is there a snowboard in the image?", "<image>Question:Is there a snowboard in the image? Answer:"),
    "vqav2": ("What is he on top of?", "<image>Question:What is he on top of? Answer:"),
    "okvqa": ("What sport can you use this for?", "<image>Question:What sport can you use this for? Answer:"),
    "gqa": ("Is the sky dark?", "<image>Question:Is the sky dark? Answer:"),
    "vizwiz": ("What is this?", "<image>Question:What is this?When the provided information is insuffcient, respond "
                                "with 'Unanswerable'. Answer the question using a single word or phrase.  Answer:"),
}


def _sample_for(dataset, question):
    if dataset.startswith("textvqa"):
        return _sample(question, ocr_tokens=["dakota", "digital", "single-use", "camera"],
                       extra={"question_without_ocr": question})
    if dataset == "vsr":
        return _sample(f"Is this statement true or false? {question}", extra={"caption": question})
    return _sample(question)


@pytest.mark.parametrize("dataset", sorted(COBRA_EXPECTED))
def test_cobra_protocol_prompts_equal_vlm_evaluation(dataset):
    question, expected = COBRA_EXPECTED[dataset]
    task = get_protocol("cobra").task_for(dataset)
    assert build_prompt(task, COBRA_SPEC, _sample_for(dataset, question)) == expected


@pytest.mark.parametrize("dataset", sorted(ROBOMAMBA_EXPECTED))
def test_robomamba_protocol_prompts_equal_test_py(dataset):
    question, expected = ROBOMAMBA_EXPECTED[dataset]
    task = get_protocol("robomamba").task_for(dataset)
    assert build_prompt(task, ROBOMAMBA_SPEC, _sample_for(dataset, question)) == expected


def test_the_official_protocol_is_the_models_own_prompt():
    """``official`` wraps the question in the model's own short-answer prompt (Cobra: vlm-evaluation's VQA prompt,
    the same bytes as ``cobra``'s VQAv2 prompt); TextVQA with OCR puts the tokens after the question."""
    official = get_protocol("official")
    assert build_prompt(official.task_for("vqav2"), COBRA_SPEC, _sample("What is he on top of?")) == \
        COBRA_EXPECTED["vqav2"][1]
    ocr = build_prompt(official.task_for("textvqa:ocr"), COBRA_SPEC,
                       _sample_for("textvqa:ocr", "what is the brand of this camera?"))
    assert ocr == ("<|user|>\nwhat is the brand of this camera?\nReference OCR token: dakota, digital, single-use, "
                   "camera\nAnswer the question using a single word or phrase.<|endoftext|>\n<|assistant|>\n")


def test_robomamba_answer_line_as_its_judges_read_it():
    """test.py l. 386-388 writes ``answer.strip().replace('\\n', ' ')``; the judges read the file back by lines, so a
    carriage return ends the answer, and ``line.strip()`` drops what precedes it; VQAv2 / OK-VQA / VizWiz keep the
    text before the first "Answer:" (test.py l. 205-281)."""
    from mambaprune.eval.protocols import postprocess
    from mambaprune.eval.upstream_scorers import robomamba_answer_text

    vqa, gqa = get_protocol("robomamba").task_for("vqav2"), get_protocol("robomamba").task_for("gqa")
    for text in (" yes\nQuestion: What? Answer: no", "two \rdogs", "\n red Answer:blue\n", "cat"):
        assert postprocess(vqa, text) == robomamba_answer_text(text, "vqav2")
        assert postprocess(gqa, text) == robomamba_answer_text(text, "gqa")
    assert postprocess(vqa, " yes\nQuestion: What? Answer: no") == "yes Question: What? "
    assert postprocess(gqa, "two \rdogs") == "two"


def test_protocol_declarations_and_their_errors():
    cobra = get_protocol("cobra")
    assert cobra.task_for("pope:random") is cobra.task_for("pope")
    assert cobra.task_for("pope").answer == "choice" and cobra.task_for("vsr").candidates[0] == ("True", "true")
    robo = get_protocol("robomamba")
    budgets = {d: robo.task_for(d).max_new_tokens for d in ("pope", "vqav2", "gqa", "vizwiz", "okvqa")}
    assert budgets == {"pope": 2, "vqav2": 16, "gqa": 256, "vizwiz": 64, "okvqa": 64}     # test.py l. 100-154
    assert not any(robo.task_for(d).stop_at_eos for d in budgets)
    with pytest.raises(ValueError, match="declares no task for dataset 'okvqa'"):
        cobra.task_for("okvqa")                      # vlm-evaluation has no OK-VQA task
    with pytest.raises(ValueError, match="unknown protocol 'llava'"):
        get_protocol("llava")
    with pytest.raises(ValueError, match="unknown scorer"):
        register_protocol(Protocol("bad-scorer", "", {"*": Task(scorer="nope")}))
    with pytest.raises(ValueError, match="needs at least two candidates"):
        Task(answer="choice", candidates=(("Y", "yes"),))
    config = EvalConfig(model=fx.__name__ + ":load_tiny", data="okvqa", data_root="d", out="o", protocol="cobra")
    with pytest.raises(ValueError, match="declares no task"):
        validate(config)


# --- the harness under a protocol, on the tiny model ---------------------------------------------------------------

#: single-byte candidates, so that each is one token of the tiny model's byte tokenizer
CHOICE = register_protocol(Protocol("test-choice", "first-step probabilities of 'Y' / 'N'", {
    "*": Task(message="{question} Y or N?", answer="choice", candidates=(("Y", "yes"), ("N", "no")),
              max_new_tokens=3, scorer="cobra_pope", final="yes-no")}))
NO_EOS = register_protocol(Protocol("test-no-eos", "RoboMamba's decoding on the tiny model", {
    "*": Task(max_new_tokens=6, stop_at_eos=False, postprocess=("robomamba_line",))}))


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("protocols") / "synth"
    generate_synthvqa(root, SynthConfig(seed=1, per_family=2, train_multiplier=1))
    return root


def _run(data, out, protocol, method="none", params=None, dataset="synthvqa:exist"):
    config = EvalConfig(model=fx.__name__ + ":load_tiny", data=dataset, data_root=str(data), out=str(out),
                        device="cpu", method=method, params=params or {}, protocol=protocol, warmup=0)
    summary = run_eval(config, progress=False)
    return summary, read_records(Path(out) / "samples.jsonl")


@pytest.mark.parametrize("method,params", [("none", {}), ("dtp", {"keep_ratio": 0.5, "early_layer": 2,
                                                                   "late_layer": 6})])
def test_candidate_probabilities_equal_a_hand_computation_from_the_first_step_logits(data, tmp_path, method,
                                                                                       params):
    """The record's candidate probabilities are softmax(first-step logits) at the candidates' ids, renormalised:
    computed here from a separate prefill of the same prompt with the same pruner."""
    summary, records = _run(data, tmp_path / "run", "test-choice", method, params)
    model = fx.load_tiny()
    samples = load_dataset("synthvqa:exist", data, "test")
    y, n = model.candidate_ids(["Y", "N"])
    assert (y, n) == (model.tokenizer("Y")["input_ids"][0], model.tokenizer("N")["input_ids"][0])
    for sample, rec in zip(samples, records):
        prompt = f"Q: {sample.question} Y or N? A:"
        assert rec["prompt"] == prompt
        from mambaprune.models.vision import load_image

        prepared = model.prepare(load_image(sample.image), sample.question, prompts=[prompt])
        pruner = build(method, **params) if method != "none" else None
        if pruner is not None:
            pruner.start(model.lm.config)
        logits = model.prefill(prepared, pruner=pruner).logits[0].float()
        p = torch.softmax(logits, dim=-1)
        full = [p[y].item(), p[n].item()]
        norm = [full[0] / sum(full), full[1] / sum(full)]
        assert rec["choice"]["vocab_probabilities"] == pytest.approx(full, rel=1e-5)
        assert rec["choice"]["probabilities"] == pytest.approx(norm, rel=1e-5)
        winner = "yes" if norm[0] >= norm[1] else "no"
        assert rec["prediction"] == rec["choice"]["winner"] == winner
        assert rec["score"] == float(winner == sample.answers[0])
    assert summary["protocol"] == "test-choice"
    groups = {r["group"] for r in records}
    expected = {g: 100.0 * sum(r["score"] for r in records if r["group"] == g)
                / sum(1 for r in records if r["group"] == g) for g in groups}
    assert summary["accuracy"] == pytest.approx(expected)
    assert summary["accuracy_final"] == {"yes-no": pytest.approx(sum(expected.values()) / len(expected))}


def test_robomamba_decoding_runs_past_eos_as_the_released_loop_does(data, tmp_path):
    """A tiny model that emits EOS mid-answer: the released loop (RoboMamba's src/test.py with its vlm.py
    generate) decodes the whole budget with EOS fed back and every special token dropped, then strips and turns
    newlines into spaces (test.py l. 386-388). Computed here by hand from greedy full forwards."""
    _, records = _run(data, tmp_path / "run", "test-no-eos", dataset="synthvqa")
    model = fx.load_tiny()
    from mambaprune.models.vision import load_image

    samples = load_dataset("synthvqa", data, "test")
    eos_mid_answer = 0
    for sample, rec in zip(samples, records):
        prepared = model.prepare(load_image(sample.image), sample.question)
        ids = []
        embeds = prepared.inputs_embeds
        for _ in range(6):                                   # greedy, full forward each step, never stopping
            logits = model.lm(inputs_embeds=embeds).logits[0, :model.lm.config.vocab_size]
            token = int(logits.argmax())
            ids.append(token)
            emb = model.lm.backbone.embedding(torch.tensor([[token]]))
            embeds = torch.cat([embeds, emb], dim=1)
        if 0 in ids[:-1]:
            eos_mid_answer += 1
        text = model.tokenizer.decode(ids, skip_special_tokens=True)
        assert rec["n_new_tokens"] == 6
        assert rec["prediction"] == text.strip().replace("\n", " ").split("\r")[0].rstrip()
    assert eos_mid_answer >= 1            # the case this test is about occurred


def test_records_and_summary_name_the_protocol_and_scorer(data, tmp_path):
    summary, records = _run(data, tmp_path / "run", None, dataset="synthvqa:count")
    assert summary["protocol"] == "official"                 # the tiny model declares none
    assert {r["metric"] for r in records} == {"vqa_accuracy"}  # official's "*": the sample's own metric
    assert all(r["prompt"] == f"Q: {r['question']} A:" for r in records)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["protocol"] is None and (run["protocol"], run["scorer"]) == ("official", "sample")
    config = EvalConfig(model=fx.__name__ + ":load_tiny", data="synthvqa:count", data_root=str(data),
                        out=str(tmp_path / "run"), protocol="test-no-eos", warmup=0, limit=1,
                        device="cpu")
    with pytest.raises(ValueError, match="holds another run"):   # another protocol never mixes with the records
        run_eval(config, progress=False)


def test_a_table_does_not_merge_runs_of_different_protocols_without_saying_so():
    from mambaprune.eval.report import accuracy_table, merge_runs

    def run(protocol, group, acc):
        return {"config": {"model": "cobra", "method": "none", "params": {}, "protocol": protocol},
                "protocol": protocol, "accuracy": {group: acc}, "n_samples": 10, "flops": 1.0,
                "flops_baseline": 1.0, "flops_ratio": 1.0}

    same = merge_runs([run("cobra", "pope", 80.0), run("cobra", "gqa", 60.0)])
    assert len(same) == 1 and same[0]["accuracy"] == {"pope": 80.0, "gqa": 60.0}
    mixed = merge_runs([run("cobra", "pope", 80.0), run("official", "gqa", 60.0)])
    assert len(mixed) == 2
    table = accuracy_table([run("cobra", "pope", 80.0), run("official", "pope", 70.0)], baseline=False)
    labels = [row[0] for row in table.rows]
    assert labels == ["none [cobra]", "none [official]"]
    assert any("different evaluation protocols (cobra, official)" in n for n in table.notes)
    single = accuracy_table([run("cobra", "pope", 80.0)], baseline=False)
    assert single.rows[0][0] == "none" and not any("protocol" in n for n in single.notes)


def test_vizwiz_answerable_and_unanswerable_accuracies_in_the_summary():
    from mambaprune.eval.summary import summarize_records

    from mambaprune.eval.metrics import official_score

    def rec(score, answerable, pred):
        answers = ["yes"] * 10
        assert official_score("vizwiz", pred, answers) == score
        return {"group": "vizwiz", "metric": "vizwiz_official", "prediction": pred, "answers": answers,
                "score": score, "answerable": answerable, "error": None, "flops": 1.0, "flops_baseline": 1.0,
                "tokens_per_layer": [1], "prefill_ms": 1.0, "decode_ms": 1.0, "n_decode_steps": 1,
                "method_ms": 0.0}

    records = [rec(1.0, True, "yes"), rec(0.0, True, "no"), rec(1.0, True, "Yes."), rec(0.0, False, "no")]
    config = {"model": "m", "method": "none", "params": {}}
    summary = summarize_records(records, config)
    m = summary["metrics"]["vizwiz"]
    assert m["accuracy_answerable"] == pytest.approx(100 * 2 / 3)
    assert m["accuracy_unanswerable"] == 0.0
    assert summary["accuracy"]["vizwiz"] == pytest.approx(50.0)
    assert summary["scorer"] == ["vizwiz_official"]


def test_pope_final_is_the_mean_of_the_splits_and_a_table_column():
    """vlm-evaluation's PopeScorer (harnesses/pope.py l. 334): POPE-final = the unweighted mean of the three split
    accuracies, not the pooled accuracy (the splits differ in size: 2910 / 3000 / 3000 upstream)."""
    from mambaprune.eval.report import accuracy_table, merge_runs
    from mambaprune.eval.summary import summarize_records

    def rec(group, score):
        pred = "yes" if score else "no"
        return {"group": group, "metric": "cobra_pope", "prediction": pred, "answers": ["yes"], "score": score,
                "error": None, "flops": 1.0, "flops_baseline": 1.0, "tokens_per_layer": [1], "prefill_ms": 1.0,
                "decode_ms": 1.0, "n_decode_steps": 1, "method_ms": 0.0}

    records = ([rec("pope_random", 1.0)] * 3 + [rec("pope_random", 0.0)]       # 75 %
               + [rec("pope_popular", 1.0)]                                    # 100 %
               + [rec("pope_adversarial", 0.0)] * 2)                           # 0 %
    config = {"model": "cobra", "method": "none", "params": {}, "protocol": "cobra"}
    pope = summarize_records(records, config, final="pope", protocol="cobra")
    assert pope["accuracy_final"] == {"pope": pytest.approx(175 / 3)}       # pooled would be 4 / 7 = 57.1
    gqa = {"config": {**config, "data": "gqa"}, "protocol": "cobra", "accuracy": {"gqa": 60.0}, "n_samples": 5,
           "flops": 1.0, "flops_baseline": 1.0, "flops_ratio": 1.0}
    [row] = merge_runs([pope, gqa])
    table = accuracy_table([row], benchmarks=["gqa", "pope"], baseline=False)
    assert table.rows[0][3:5] == ["60.0", "58.3"]


def test_eval_reads_images_from_images_root(data, tmp_path):
    """``--images-root``: the images looked up by file name in another folder give the same records; a missing one
    is one error line naming the folder."""
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    for s in load_dataset("synthvqa:count", data, "test"):
        shutil.copy(s.image, images / s.image.name)
    _, here = _run(data, tmp_path / "a", None, dataset="synthvqa:count")
    config = EvalConfig(model=fx.__name__ + ":load_tiny", data="synthvqa:count", data_root=str(data),
                        out=str(tmp_path / "b"), warmup=0, images_root=str(images), device="cpu")
    run_eval(config, progress=False)
    there = read_records(tmp_path / "b" / "samples.jsonl")
    assert [r["prediction"] for r in there] == [r["prediction"] for r in here]
    assert len(there) == len(here) >= 2 and all(r["error"] is None for r in there)
    from dataclasses import replace

    with pytest.raises(FileNotFoundError, match="images folder .*nowhere not found"):
        run_eval(replace(config, out=str(tmp_path / "c"), images_root=str(tmp_path / "nowhere")), progress=False)
