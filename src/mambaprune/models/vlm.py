"""One multimodal model class for every Mamba MLLM: vision tower -> projector -> [visual | text] -> MambaLM.

:class:`MambaVLM` holds a vision tower (:mod:`~mambaprune.models.vision`), a projector, a :class:`MambaLM`, a
tokenizer and a :class:`VLMSpec` (the prompt template, the decoding defaults, the name). What distinguishes
Cobra from RoboMamba or from a user's own Mamba MLLM is the spec and the weights, so a new model plugs in by a
spec and a small builder (see :mod:`~mambaprune.models.cobra`), not by a new class.

The sequence fed to the language model is ``[visual tokens][prompt text tokens]`` with no BOS: visual token
``i`` is patch ``i`` of the tower's ``grid`` in row-major order and its position in the
:class:`~mambaprune.pruning.sequence.TokenSequence` is ``i``; text token ``j`` has position ``num_visual + j``.
Samples of a batch are left-padded to the longest prompt. A pruner (any hook the :class:`MambaLM` accepts, e.g.
a :class:`~mambaprune.pruning.base.Pruner`) is passed through as the model's ``hook``; ``None`` runs unpruned.

"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Sequence

import torch
import torch.nn as nn

from .checkpoints import CheckpointError
from .mamba_lm import MambaLM, MambaOutput
from .vision import VisionTower, pixel_batch_size


@dataclass
class VLMSpec:
    """What makes one Mamba MLLM differ from another apart from its weights.

    Attributes:
        name: the model's registry name.
        prompt_template: a format string with a ``{question}`` field, or a function question -> prompt text.
        max_new_tokens: default decoding budget; ``task_max_new_tokens`` per benchmark where the released
            evaluation code sets one (see :meth:`max_new_tokens_for`).
        do_sample, temperature, top_p: decoding defaults (greedy unless ``do_sample``).
        eos_token: the token that ends an answer; its id is looked up in the tokenizer.
        notes: where these settings come from.
        chat_template: the model's bare chat template around a message (a format string with a ``{message}``
            field, or a function); None: :attr:`prompt_template` serves.
        protocol: the evaluation protocol the model runs under by default (:mod:`mambaprune.eval.protocols`);
            None: ``official``.
        vision_autocast: run the vision tower and the projector under ``torch.autocast`` in the language
            model's dtype when that is bf16 or fp16, as the released generation code does (the language model
            itself does its own rounding, see :class:`~mambaprune.models.mamba_lm.MambaMixer`).
    """

    name: str
    prompt_template: str | Callable[[str], str]
    max_new_tokens: int = 128
    task_max_new_tokens: dict[str, int] = field(default_factory=dict)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token: str = "<|endoftext|>"
    notes: str = ""
    chat_template: str | Callable[[str], str] | None = None
    protocol: str | None = None
    vision_autocast: bool = False

    def prompt(self, question: str) -> str:
        """The prompt text for one question."""
        if not isinstance(question, str):
            raise ValueError(f"a question must be a string, got {type(question).__name__}")
        if callable(self.prompt_template):
            return self.prompt_template(question)
        return self.prompt_template.format(question=question)

    def chat(self, message: str) -> str:
        """The model's chat template around ``message`` (its prompt template when it declares none)."""
        if self.chat_template is None:
            return self.prompt(message)
        if not isinstance(message, str):
            raise ValueError(f"a message must be a string, got {type(message).__name__}")
        if callable(self.chat_template):
            return self.chat_template(message)
        return self.chat_template.format(message=message)

    def max_new_tokens_for(self, task: str | None = None) -> int:
        """The decoding budget the released evaluation uses for ``task``, else :attr:`max_new_tokens`."""
        return self.task_max_new_tokens.get(task, self.max_new_tokens)

    def generation_defaults(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class PreparedInputs:
    """A batch ready for the language model (see :meth:`MambaVLM.prepare`).

    Attributes:
        inputs_embeds: (batch, L, d_model) ``[visual][text]`` embeddings, left-padded with zeros.
        attention_mask: (batch, L) bool, False for left padding.
        is_visual: (batch, L) bool, True for the visual tokens.
        num_visual: visual tokens per sample (``grid[0] * grid[1]``).
        grid: (rows, cols) of image patches; visual token i is patch (i // cols, i % cols).
        prompts: the prompt text of each sample; ``text_ids`` its token ids (no BOS).
        pixels: what the vision tower received (a tensor, or a dict of tensors for a fused tower).
        images: (batch, 3, s, s) in [0, 1], the pictures the tower saw (for plots).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    is_visual: torch.Tensor
    num_visual: int
    grid: tuple[int, int]
    prompts: list[str]
    text_ids: list[list[int]]
    pixels: torch.Tensor | dict[str, torch.Tensor]
    images: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.inputs_embeds.shape[0]


class MambaVLM(nn.Module):
    """A Mamba multimodal LLM: ``vision`` -> ``projector`` -> ``[visual | text]`` -> ``lm``.

    Args:
        vision: a vision tower (:class:`~mambaprune.models.vision.VisionTower` protocol).
        projector: a module mapping ``vision.dim`` to ``lm.config.d_model`` with ``in_dim``/``out_dim``
            attributes (:class:`~mambaprune.models.projector.MLPProjector`).
        lm: the :class:`MambaLM`.
        tokenizer: a transformers tokenizer (``__call__``, ``decode``, ``get_vocab``).
        spec: the model's :class:`VLMSpec`.
    """

    #: keyword options of :meth:`generate` / :meth:`answer`, passed on to :meth:`MambaLM.generate`
    GENERATION_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_p", "eos_token_id", "generator")

    def __init__(self, vision: VisionTower, projector: nn.Module, lm: MambaLM, tokenizer, spec: VLMSpec):
        super().__init__()
        if projector.in_dim != vision.dim:
            raise ValueError(f"the projector takes {projector.in_dim} channels, the vision tower gives {vision.dim}")
        if projector.out_dim != lm.config.d_model:
            raise ValueError(f"the projector gives {projector.out_dim} channels, the language model's d_model is "
                             f"{lm.config.d_model}")
        eos = tokenizer.get_vocab().get(spec.eos_token)
        if eos is None:
            raise ValueError(f"the tokenizer has no token {spec.eos_token!r} (the spec's eos_token)")
        self.vision = vision
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        self.spec = spec
        self.eos_token_id = eos

    # ---------------------------------------------------------------------------------------------- inputs
    def embed_visual(self, pixels) -> torch.Tensor:
        """(batch, num_visual, d_model): projected patch features, in the language model's dtype (under
        ``torch.autocast`` when the spec's ``vision_autocast`` asks for it)."""
        dtype = self.lm.backbone.embedding.weight.dtype
        param = next(self.projector.parameters())
        autocast = self.spec.vision_autocast and dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(param.device.type, dtype=dtype) if autocast else contextlib.nullcontext():
            features = self.vision(pixels)
            projected = self.projector(features.to(device=param.device, dtype=param.dtype))
        return projected.to(dtype)

    def _batch(self, images, questions):
        """(questions list, pixels, single?) with the batch sizes checked."""
        single = isinstance(questions, str)
        if single:
            if isinstance(images, (list, tuple)):
                raise ValueError("one question goes with one image; give lists of equal length for a batch")
            questions = [questions]
        elif (not isinstance(questions, (list, tuple)) or not questions
              or not all(isinstance(q, str) for q in questions)):
            raise ValueError("questions must be a string or a non-empty list of strings")
        pixels = self.vision.preprocess(images)
        n_images = pixel_batch_size(pixels)
        if n_images != len(questions):
            raise ValueError(f"{n_images} image(s) for {len(questions)} question(s); give one image per question")
        return list(questions), pixels, single

    @torch.no_grad()
    def prepare(self, images, questions, prompts: Sequence[str] | None = None) -> PreparedInputs:
        """Embed ``[visual][prompt text]`` for one image + one question, or equal-length lists (left-padded).

        Images are PIL images, paths, or prepared pixels (see the vision tower's ``preprocess``). The prompt
        is ``spec.prompt(question)``, or ``prompts[i]`` verbatim when given (an evaluation protocol's exact text),
        tokenized without special tokens (no BOS).
        """
        questions, pixels, _ = self._batch(images, questions)
        if prompts is None:
            prompts = [self.spec.prompt(q) for q in questions]
        elif len(prompts) != len(questions) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"give one prompt string per question ({len(questions)}), got {prompts!r}")
        prompts = list(prompts)
        text_ids = [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        embedding = self.lm.backbone.embedding
        rows = embedding.weight.shape[0]
        too_big = [i for ids in text_ids for i in ids if not 0 <= i < rows]
        if too_big:
            raise ValueError(f"the tokenizer gave ids {sorted(set(too_big))[:10]} outside the language model's "
                             f"{rows}-row embedding: tokenizer and model do not match")
        visual = self.embed_visual(pixels)
        b, nv, d = visual.shape
        length = nv + max(len(ids) for ids in text_ids)
        device = embedding.weight.device
        embeds = torch.zeros(b, length, d, dtype=visual.dtype, device=device)
        mask = torch.zeros(b, length, dtype=torch.bool, device=device)
        is_visual = torch.zeros(b, length, dtype=torch.bool, device=device)
        for i, ids in enumerate(text_ids):
            start = length - nv - len(ids)
            embeds[i, start:start + nv] = visual[i]
            if ids:
                embeds[i, start + nv:] = embedding(torch.tensor(ids, device=device))
            mask[i, start:] = True
            is_visual[i, start:start + nv] = True
        return PreparedInputs(inputs_embeds=embeds, attention_mask=mask, is_visual=is_visual, num_visual=nv,
                              grid=tuple(self.vision.grid), prompts=prompts, text_ids=text_ids, pixels=pixels,
                              images=self.vision.display(pixels))

    # ---------------------------------------------------------------------------------------------- running
    @torch.no_grad()
    def prefill(self, prepared: PreparedInputs, pruner=None, signal_layers: Collection[int] | bool | None = None,
                use_cache: bool = False) -> MambaOutput:
        """Run the prepared batch through the language model once, with ``pruner`` as the layer hook."""
        return self.lm(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                       is_visual=prepared.is_visual, hook=pruner, signal_layers=signal_layers, use_cache=use_cache)

    def _options(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(self.GENERATION_OPTIONS))
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; known: {list(self.GENERATION_OPTIONS)}")
        merged = {**self.spec.generation_defaults(), "eos_token_id": self.eos_token_id}
        merged.update(options)
        return merged

    @torch.no_grad()
    def generate(self, images, questions, pruner=None, timings: dict | None = None, **options) -> torch.Tensor:
        """New token ids (batch, n) for ``images`` and ``questions`` (as :meth:`prepare`), prefilled with
        ``pruner`` as the hook; decoding per the spec's defaults, overridden by ``options``
        (:attr:`GENERATION_OPTIONS`). Each row ends with EOS, then EOS padding, unless the budget ran out.
        ``timings``: a dict filled as :meth:`MambaLM.generate` describes (prefill and step times; the vision
        tower and the projector are not timed)."""
        opts = self._options(options)
        return self.generate_prepared(self.prepare(images, questions), pruner=pruner, timings=timings, **opts)

    @torch.no_grad()
    def generate_prepared(self, prepared: PreparedInputs, pruner=None, timings: dict | None = None,
                          first_logits: list | None = None, **options) -> torch.Tensor:
        """:meth:`generate` on inputs already built by :meth:`prepare` (so their preparation can be handled,
        or timed, apart); ``first_logits`` as :meth:`MambaLM.generate` fills it."""
        opts = self._options(options)
        eos = opts["eos_token_id"]
        return self.lm.generate(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                                is_visual=prepared.is_visual, hook=pruner,
                                pad_token_id=eos if eos is not None else 0, timings=timings,
                                first_logits=first_logits, **opts)

    def candidate_ids(self, candidates: Sequence[str]) -> list[int]:
        """The token id of each candidate string (``encode(s, add_special_tokens=False)``), each required to be
        one token, as Cobra's ``CobraVLM.__init__`` asserts (cobra/models/vlms/cobra.py l. 80-84)."""
        ids = []
        for s in candidates:
            enc = list(self.tokenizer(s, add_special_tokens=False)["input_ids"])
            if len(enc) != 1:
                raise ValueError(f"candidate {s!r} is {len(enc)} tokens of this tokenizer ({enc}); a candidate "
                                 f"answer must be one token")
            ids.append(enc[0])
        return ids

    @staticmethod
    def candidate_probabilities(logits: torch.Tensor, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities over the whole vocabulary, the same renormalised over the candidates), each (batch, k),
        from first-step logits (batch, vocab), as Cobra's ``generate_batch`` computes them (cobra/models/vlms/
        cobra.py l. 519-545: a softmax over the full logits row, the candidates' entries, divided by their sum)."""
        probs = torch.softmax(logits.float(), dim=-1)[:, list(ids)]
        return probs, probs / probs.sum(dim=-1, keepdim=True)

    def decode(self, token_ids: torch.Tensor, eos_token_id: int | None = -1) -> list[str]:
        """Text of each row up to its first EOS (default: the spec's), special tokens skipped, stripped."""
        eos = self.eos_token_id if eos_token_id == -1 else eos_token_id
        texts = []
        for row in token_ids.tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def answer(self, image, question, pruner=None, timings: dict | None = None, **options):
        """The answer string to ``question`` about ``image`` (a list of strings for lists), see :meth:`generate`
        (``timings`` included)."""
        eos = self._options(options)["eos_token_id"]
        texts = self.decode(self.generate(image, question, pruner=pruner, timings=timings, **options),
                            eos_token_id=eos)
        return texts[0] if isinstance(question, str) else texts


def load_tokenizer(folder):
    """A transformers tokenizer from a local folder (``tokenizer.json`` etc.); nothing is downloaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {folder}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # missing or unreadable tokenizer files
        raise CheckpointError(f"cannot load a tokenizer from {folder}: {type(e).__name__}: {str(e)[:300]}") from e
