"""Evaluation protocols, declared rather than programmed (as an lmms-eval task is a declaration).

A :class:`Protocol` says, per dataset (a :class:`Task`): the message built from a sample, how the model's chat
template wraps it, how the answer is produced (generated text with a token budget and a stop rule, or the choice
among candidate strings by their probabilities at the first answer position), the post-processing of the text,
and the scorer (a name in :data:`mambaprune.eval.metrics.METRICS`). The harness reads nothing else: a new protocol
is a declaration (:func:`register_protocol`) plus, at most, a scorer.

A message is a ``str.format`` template over the fields of :func:`sample_fields`: ``question`` (the question
alone: for TextVQA without its OCR line), ``ocr`` (the reference OCR tokens joined by ``", "``) and ``caption``
(VSR's statement). The wrapping is ``"prompt"`` (the model's own short-answer prompt, :meth:`VLMSpec.prompt`)
or ``"chat"`` (the model's bare chat template around the message, :meth:`VLMSpec.chat`).

Three protocols ship:

* ``official``: the model's own prompt around the question, generated text, and each dataset's official
  evaluator (:mod:`mambaprune.eval.official`). The default for models that declare no protocol (the testbed).
* ``cobra``: Cobra's evaluation, the Cobra authors' fork of vlm-evaluation (``h-zhao1997/vlm-evaluation`` at
  b0a691f): the messages of ``vlm_eval/models/cobra.py`` (l. 117-161: the VQA suffix; VizWiz's "Unanswerable"
  line; TextVQA with the OCR line moved before the question or without it; VSR's true/false statement); greedy,
  at most 128 new tokens, stop at EOS (``vlm_eval/models/__init__.py`` l. 15-35, ``cobra.py`` l. 44-46); POPE and
  VSR answered by the probabilities of "Yes"/"No" and "True"/"False" at the first step
  (``harnesses/pope.py`` l. 249-251, ``harnesses/vsr.py`` l. 214-216), POPE-final the mean of the three splits'
  accuracies (``pope.py`` l. 334); GQA predictions cleaned as ``harnesses/gqa.py`` l. 281 does; each harness's
  own scorer. vlm-evaluation has no OK-VQA task, so ``cobra`` declares none.
* ``robomamba``: RoboMamba's ``src/test.py`` and ``src/judger.py`` (``lmzpai/roboMamba`` at c2f52c4): the prompt
  ``<image>Question:{q} Answer:``, VizWiz's appended instruction as released (no separator, "insuffcient", a
  trailing space; l. 141-149), the per-dataset budgets (POPE 2, VQAv2 16, GQA 256, VizWiz and OK-VQA 64;
  l. 100-154), decoding that never stops at EOS (the whole budget is generated and every special token dropped
  from the text; ``vlm.py`` l. 98-102), the answer line's clean-up and the judges. No TextVQA or VSR upstream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from .upstream_scorers import cobra_gqa_clean, robomamba_answer_line, robomamba_before_answer

__all__ = ["Protocol", "Task", "PROTOCOLS", "POSTPROCESS", "register_protocol", "get_protocol",
           "sample_fields", "build_message", "build_prompt", "postprocess"]


@dataclass(frozen=True)
class Task:
    """How one dataset is asked and scored under a protocol.

    Attributes:
        message: ``str.format`` template over :func:`sample_fields` (e.g. ``"\\n{question}\\nAnswer ..."``).
        wrap: ``"prompt"`` (the model's own prompt around the message) or ``"chat"`` (its bare chat template).
        answer: ``"generate"`` (the decoded text is the prediction) or ``"choice"`` (the candidate with the
            highest probability at the first answer position, from the prefill the first generated token comes
            from; the text is still generated, as the released harness does, and recorded).
        candidates: for ``"choice"``: (string, label) pairs; each string must be one token of the model's
            tokenizer; the winner's label is the prediction.
        max_new_tokens: the decoding budget; None: the model's default for the dataset.
        stop_at_eos: False decodes the whole budget, EOS fed back, special tokens dropped from the text (the
            released RoboMamba loop).
        postprocess: names in :data:`POSTPROCESS` applied in order to the decoded text.
        scorer: a metric name in :data:`mambaprune.eval.metrics.METRICS`.
        final: a name under which the run's summary also reports the unweighted mean of its groups' accuracies
            (``accuracy_final``; POPE-final over the three splits, as vlm-evaluation's ``pope.py`` l. 334 does).
    """

    message: str = "{question}"
    wrap: str = "prompt"
    answer: str = "generate"
    candidates: tuple[tuple[str, str], ...] = ()
    max_new_tokens: int | None = None
    stop_at_eos: bool = True
    postprocess: tuple[str, ...] = ()
    scorer: str = "sample"
    final: str | None = None

    def __post_init__(self):
        if self.wrap not in ("prompt", "chat"):
            raise ValueError(f"wrap must be 'prompt' or 'chat', got {self.wrap!r}")
        if self.answer not in ("generate", "choice"):
            raise ValueError(f"answer must be 'generate' or 'choice', got {self.answer!r}")
        if self.answer == "choice" and len(self.candidates) < 2:
            raise ValueError("a 'choice' answer needs at least two candidates")
        unknown = [p for p in self.postprocess if p not in POSTPROCESS]
        if unknown:
            raise ValueError(f"unknown post-processing step(s) {unknown}; known: {sorted(POSTPROCESS)}")


@dataclass(frozen=True)
class Protocol:
    """A named set of :class:`Task` declarations, keyed by dataset name: an exact ``name:variant`` first, then
    the name before the colon, then ``"*"`` (any dataset)."""

    name: str
    description: str
    tasks: Mapping[str, Task] = field(default_factory=dict)

    def task_for(self, dataset: str) -> Task:
        """The task for ``dataset``; a ValueError names the datasets the protocol declares otherwise."""
        for key in (dataset, dataset.partition(":")[0], "*"):
            if key in self.tasks:
                return self.tasks[key]
        raise ValueError(f"protocol {self.name!r} declares no task for dataset {dataset!r}; it declares "
                         f"{', '.join(sorted(self.tasks))}")


# --- post-processing steps ----------------------------------------------------------------------------------------

#: post-processing steps by name: RoboMamba's answer line as its judges read it back (``src/test.py``
#: l. 386-388 and the judges' line reading), the text before the first "Answer:" (its VQAv2, OK-VQA and VizWiz
#: judges), and vlm-evaluation's GQA clean-up (``harnesses/gqa.py`` l. 281: ASCII punctuation deleted, lower case)
POSTPROCESS: dict[str, Callable[[str], str]] = {
    "robomamba_line": robomamba_answer_line,
    "before_answer": robomamba_before_answer,
    "delete_punctuation_lower": cobra_gqa_clean,
}


def postprocess(task: Task, text: str) -> str:
    """``text`` through the task's post-processing steps, in order."""
    for name in task.postprocess:
        text = POSTPROCESS[name](text)
    return text


# --- messages and prompts -----------------------------------------------------------------------------------------

def sample_fields(sample) -> dict[str, str]:
    """The fields a message may use: ``question`` (without a TextVQA OCR line), ``ocr`` (the OCR tokens joined by
    ``", "``, empty when the sample has none) and ``caption`` (VSR's statement; the question otherwise)."""
    extra = getattr(sample, "extra", None) or {}
    question = extra.get("question_without_ocr", sample.question)
    ocr = getattr(sample, "ocr_tokens", None) or []
    return {"question": question, "ocr": ", ".join(ocr), "caption": extra.get("caption", question)}


def build_message(task: Task, sample) -> str:
    """The task's message for ``sample``."""
    return task.message.format(**sample_fields(sample))


def build_prompt(task: Task, spec, sample) -> str:
    """The exact text given to the tokenizer: the message wrapped by the model spec's prompt or chat template."""
    message = build_message(task, sample)
    return spec.chat(message) if task.wrap == "chat" else spec.prompt(message)


# --- the registry -------------------------------------------------------------------------------------------------

PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> Protocol:
    """Add ``protocol`` to :data:`PROTOCOLS` (a name can be registered once)."""
    if protocol.name in PROTOCOLS:
        raise ValueError(f"protocol {protocol.name!r} is already registered")
    from .metrics import METRICS

    for key, task in protocol.tasks.items():
        if task.scorer not in METRICS and task.scorer != "sample":
            raise ValueError(f"protocol {protocol.name!r}, {key}: unknown scorer {task.scorer!r}")
    PROTOCOLS[protocol.name] = protocol
    return protocol


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}") from None


def scorer_for(task: Task, sample) -> str:
    """The metric name that scores ``sample`` under ``task`` (``"sample"``: the sample's own metric)."""
    return sample.metric if task.scorer == "sample" else task.scorer


_SHORT = "\nAnswer the question using a single word or phrase."

register_protocol(Protocol(
    name="official",
    description="the model's own prompt around the question, generated text, each dataset's official evaluator",
    tasks={
        "vqav2": Task(scorer="vqav2_official"),
        "okvqa": Task(scorer="okvqa_official"),
        "textvqa": Task(scorer="textvqa_official"),
        "textvqa:ocr": Task(message="{question}\nReference OCR token: {ocr}", scorer="textvqa_official"),
        "vizwiz": Task(scorer="vizwiz_official"),
        "gqa": Task(scorer="gqa_official"),
        "pope": Task(scorer="pope_official"),
        "vsr": Task(scorer="vsr_official"),
        "*": Task(),                                   # e.g. SynthVQA: the sample's own metric
    }))

register_protocol(Protocol(
    name="cobra",
    description="Cobra's evaluation (h-zhao1997/vlm-evaluation): its messages, POPE and VSR by candidate "
                "probabilities, TextVQA with and without OCR tokens, greedy, at most 128 new tokens",
    tasks={
        "vqav2": Task(message="\n{question}" + _SHORT, wrap="chat", max_new_tokens=128, scorer="cobra_vqav2"),
        "gqa": Task(message="\n{question}" + _SHORT, wrap="chat", max_new_tokens=128,
                    postprocess=("delete_punctuation_lower",), scorer="gqa_official"),
        "vizwiz": Task(message="\n{question}\nWhen the provided information is insufficient, respond with "
                               "'Unanswerable'." + _SHORT, wrap="chat", max_new_tokens=128, scorer="cobra_vizwiz"),
        "textvqa": Task(message="\n{question}" + _SHORT, wrap="chat", max_new_tokens=128, scorer="cobra_textvqa"),
        "textvqa:ocr": Task(message="\nReference OCR token: {ocr}\n{question}" + _SHORT, wrap="chat",
                            max_new_tokens=128, scorer="cobra_textvqa"),
        "pope": Task(message="\n{question}" + _SHORT, wrap="chat", answer="choice",
                     candidates=(("Yes", "yes"), ("No", "no")), max_new_tokens=128, scorer="cobra_pope",
                     final="pope"),
        "vsr": Task(message='\nBased on the image, is this statement "True" or "False"? {caption}'
                            '\nRespond with "True" or "False" directly.', wrap="chat", answer="choice",
                    candidates=(("True", "true"), ("False", "false")), max_new_tokens=128, scorer="cobra_vsr"),
        "synthvqa": Task(max_new_tokens=None),
    }))

_ROBO = dict(wrap="chat", stop_at_eos=False)
register_protocol(Protocol(
    name="robomamba",
    description="RoboMamba's src/test.py and src/judger.py as released: its prompt, budgets, decoding without a "
                "stop at EOS, the answer line's clean-up and its judges",
    tasks={
        "pope": Task(max_new_tokens=2, postprocess=("robomamba_line",), scorer="robomamba_pope", **_ROBO),
        "vqav2": Task(max_new_tokens=16, postprocess=("robomamba_line", "before_answer"), scorer="robomamba_vqav2",
                      **_ROBO),
        "okvqa": Task(max_new_tokens=64, postprocess=("robomamba_line", "before_answer"), scorer="robomamba_okvqa",
                      **_ROBO),
        "gqa": Task(max_new_tokens=256, postprocess=("robomamba_line",), scorer="robomamba_gqa", **_ROBO),
        "vizwiz": Task(message="{question}When the provided information is insuffcient, respond with "
                               "'Unanswerable'. Answer the question using a single word or phrase. ",
                       max_new_tokens=64, postprocess=("robomamba_line", "before_answer"),
                       scorer="robomamba_vizwiz", **_ROBO),
        "synthvqa": Task(),
    }))


def default_protocol(spec) -> str:
    """The protocol a model runs under unless told otherwise: its spec's ``protocol``, else ``official``."""
    return getattr(spec, "protocol", None) or "official"
