"""Train the testbed (:mod:`mambaprune.models.testbed`) from scratch on SynthVQA, on a CPU.

What one training step sees: ``batch_size`` training images, each with its five questions (one per family) plus
``extra_per_family`` more per family drawn from the image's scene description in the same templates
(:func:`~mambaprune.data.synthvqa.extra_questions`; read has one question per image) and ``recall_per_image``
training-only single-object attr questions (:func:`~mambaprune.data.synthvqa.recall_questions`),
as a multi-turn Zephyr conversation in a random order, ``[100 visual tokens][turn][turn]...``, where a turn is
``testbed_prompt(question) + answer + <|endoftext|>``. The loss is the cross-entropy of the answer tokens and
their closing ``<|endoftext|>`` (prompts are not scored), as in LLaVA-style instruction tuning; one image's
visual prefix serves all its questions, which makes a step several times cheaper than single-turn sequences.
Two linear read-outs are trained alongside and thrown away: one of the vision features per patch
(:class:`AuxHead`: colour and shape of the object centred in the patch, code characters centred in it; weight
``aux_weight``), and one of the language model's residual stream after layer ``memory_layer`` (:class:`MemoryHead`):
at the visual positions it predicts what the scan has seen so far (:func:`memory_targets`, weight
``memory_weight``), and at the position where each answer starts, the whole scene (weight
``turn_memory_weight``), so the state must carry the image across the question and the earlier turns to where
the answers are read (:func:`answer_start_positions`). A penalty keeps the visual embeddings' RMS near 1
(:func:`visual_rms_penalty`, per token, weight ``visual_rms_weight``). The LM starts from :func:`init_mamba_` with
A divided by ``A_INIT_SCALE`` and Δ in ``[DT_MIN, DT_MAX]`` (optionally a difference-filter conv,
``difference_conv``; token embeddings of std ``embedding_std``).
Evaluation is single-turn, exactly as the harness asks. ``--device`` trains on another torch device.

Two-stage training (``tower_steps > 0`` and ``freeze_tower``, the recipe of the shipped testbed): stage 1
trains the tower alone on the per-patch read-out (:func:`pretrain_tower`); stage 2 computes the tower's
features of every training image once (:func:`tower_features`), optionally standardises them
(``standardize``, :func:`standardize_tower`: the per-position mean of the training images is subtracted and
each channel scaled, inside the tower, so the background every image shares is zero), and trains only the
projector and the LM on them. Without these options everything is trained jointly (tower, projector, LM).
Grown depth (``grow_from > 0``): the LM is built with ``grow_from`` layers, trained alone for the first
``grow_at`` of the steps, then deepened to ``n_layer`` with :func:`grow_mamba` (the new layers start as the
identity; they go on top, or with ``grow_spread`` the trained layers are spread evenly through the depth,
:func:`spread_positions`) and trained on; the learning rate warms up and decays once per phase (:func:`phase_lr`), the AdamW
moments of the carried-over parameters are kept (the deep phase peaks at ``lr * grow_lr_scale``), and
``memory_layer`` is taken modulo the current depth. ``balance_chars`` weighs the code characters' slots of the
stage-1 read-out as much as all the empty ones (so the tower learns to read them); ``referent_weight`` adds a
read-out, where each answer starts, of the grid row and column of the objects the question names
(:func:`referent_targets`), or with ``referent_at = "names"`` of each named object's cell at the last token of
its name (:meth:`TurnEncoder.name_positions`), read after layer ``referent_layer`` (:func:`referent_tap`; default
``memory_layer``'s) as a 4-way class per row and column or, ``referent_code = "ordinal"``, as one scalar each
on a line (:func:`ordinal_cells`). ``visual_aux_weight`` puts the per-patch read-out on the projected tokens the
LM reads as well (a second :class:`AuxHead`), so that a projector trained behind a frozen tower keeps the
objects' positions and sizes. ``row_flip`` feeds that fraction of the images to the LM with the patch rows bottom
first (:func:`reorder_patches`; the scan-memory read-outs skip those images, whose targets follow the scan
order), so that a named object's row can no longer be recalled from how long ago the scan passed it, only
from what its tokens hold. ``tower_from`` skips stage 1 and takes the tower of a trained testbed or checkpoint
(:func:`load_tower`), so stage-2 recipes can be compared on one tower. A
shallow Mamba leaves the plateau of recall tasks far sooner than a 16-layer one (``research/recall_plateau.py``).
AdamW, linear warm-up then cosine decay, gradient clipping, fp32. Every ``eval_every`` steps the model answers
``eval_per_family`` validation questions per family (greedy, the real metrics) and a line goes to
``train_log.jsonl``; a resumable checkpoint (``last.pt``, with the optimizer) is written at the same time, and a
run started again with the same ``--out`` continues from it. ``stop_at`` ends a run at that step with the
checkpoint written (and does nothing if the run is already there), so that a run can be made of pieces with
different settings, each resuming the last (``scripts/make_testbed.sh``, the shipped testbed's recipe).
At the end the testbed folder (:func:`~mambaprune.models.testbed.save_testbed`) is written to ``--out``
with the test-split accuracy of every family and the training-curve plot ``curves.png``.

Command line: ``mambaprune train-testbed --data SYNTH_DIR --out DIR [--steps N] [--batch-size B] ...``
(``python -m mambaprune.train_testbed`` takes the same options).

Options that served only the investigations of ``docs/testbed_runs.md`` and docs/testbed.md's "What limits it" (the
SSM init's A scale, Δ range and ``out_proj`` scale, the "Where is ...?" questions, the token curriculum, the
visual embeddings' shared-part penalty and batch-wide RMS, a time budget in minutes) are gone; commit 9bd38ae
has them, to replay those runs.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.readers import VSR_PROMPT, load_dataset
from .data.synthvqa import (CATEGORIES as CATEGORY_NAMES, CODE_ALPHABET, COLORS, FAMILIES, GLYPH_H, GLYPH_W, GRID,
                             SHAPES, SIZES, extra_questions, question_referents, referent_name_spans,
                             recall_questions)
from .eval.evaluate import answer_samples, score_samples
from .models.checkpoints import read_state_file
from .models.mamba_lm import MambaConfig, MambaLM
from .models.testbed import (TestbedConfig, build_testbed, build_tokenizer, save_testbed, testbed_prompt)

IGNORE = -100
#: the SSM initialisation the testbed's LM trains from (:func:`init_mamba_`): A divided by 64, Δ drawn
#: log-uniformly in [0.01, 0.5] (Mamba's own: 1 and [0.001, 0.1])
A_INIT_SCALE, DT_MIN, DT_MAX = 64.0, 0.01, 0.5


@dataclass
class TrainSettings:
    """Options of one training run (all saved in the testbed's ``config.json``)."""

    data: str
    out: str
    steps: int = 2000
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    aux_weight: float = 0.5
    memory_weight: float = 0.0
    turn_memory_weight: float = 1.0
    referent_weight: float = 0.0
    referent_at: str = "answer"
    referent_code: str = "class"
    memory_layer: int = 11
    referent_layer: int | None = None
    difference_conv: bool = True
    visual_rms_weight: float = 0.1
    extra_per_family: int = 2
    recall_per_image: int = 0
    visual_aux_weight: float = 0.0
    row_flip: float = 0.0
    seed: int = 0
    eval_every: int = 100
    eval_per_family: int = 60
    test_per_family: int | None = None
    threads: int | None = None
    device: str = "cpu"
    #: stop after this step with the checkpoint written (no test split, no testbed): a run made of pieces
    #: with different settings (``scripts/make_testbed.sh``) resumes each piece from there
    stop_at: int | None = None
    embedding_std: float = 0.02
    tower_steps: int = 0
    tower_batch_size: int = 32
    tower_lr: float = 2e-3
    balance_chars: bool = False
    freeze_tower: bool = False
    standardize: bool = False
    grow_from: int = 0
    grow_at: float = 0.5
    grow_spread: bool = False
    grow_lr_scale: float = 1.0
    tower_from: str | None = None
    model: TestbedConfig = field(default_factory=TestbedConfig)


def init_mamba_(lm, seed: int, dt_min: float = 1e-3, dt_max: float = 0.1, a_scale: float = 1.0,
                difference_conv: bool = False, out_proj_scale: float = 1.0, embedding_std: float = 0.02) -> None:
    """Mamba's training initialisation (Gu & Dao 2023, Sec. 3.6 and their reference setup), redrawn here:
    embeddings N(0, ``embedding_std``^2) (0.02 in Mamba); Linear layers PyTorch's default with zero biases;
    ``dt_proj.weight`` uniform in ``±dt_rank^-0.5``; ``dt_proj.bias`` the inverse softplus of Δ drawn
    log-uniformly in [dt_min, dt_max]; ``A_log = log((1..d_state) / a_scale)`` (S4D-real, ``a_scale = 1`` in
    Mamba), ``D = 1``; each ``out_proj`` scaled by ``1/sqrt(n_layer)`` (pre-norm residual), times
    ``out_proj_scale`` (0: every layer starts as the identity, so the 16-layer stack starts as shallow as its
    embeddings and grows its layers as it learns).

    The testbed trains with ``a_scale = 64`` and Δ in [0.01, 0.5] (``A_INIT_SCALE``, ``DT_MIN``, ``DT_MAX``):
    slower decay and larger writes at initialisation. With Mamba's defaults the gradient of the last position
    with respect to a visual token 200 positions back is about 1e-6 of its gradient to itself (measured on the
    testbed's 16 x 128 LM, ``research/testbed_init.py``); with these, about 1e-4, and the answers start using the
    image within the hour this CPU has.

    ``embedding_std = 1`` (unit-RMS token embeddings, as PyTorch's ``nn.Embedding`` default) ends the long
    plateau of small Mambas on recall tasks: on ``research/recall_plateau.py`` (is the query among the ten
    tokens before it?) a 2-layer width-64 Mamba is still at the base rate after 3000 steps with 0.02, and at
    81% after 800 steps and past 90% after 1600 with 1."""
    gen = torch.Generator().manual_seed(seed)
    n_layer = lm.config.n_layer
    with torch.no_grad():
        nn.init.normal_(lm.backbone.embedding.weight, std=embedding_std, generator=gen)
        for layer in lm.backbone.layers:
            mixer = layer.mixer
            for lin in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
                bound = 1 / math.sqrt(lin.in_features)
                lin.weight.uniform_(-bound, bound, generator=gen)
                if lin.bias is not None:
                    lin.bias.zero_()
            mixer.out_proj.weight.mul_(out_proj_scale / math.sqrt(n_layer))
            w = mixer.conv1d.weight
            bound = 1 / math.sqrt(w.shape[1] * w.shape[2])
            w.uniform_(-bound, bound, generator=gen)
            if mixer.conv1d.bias is not None:
                mixer.conv1d.bias.uniform_(-bound, bound, generator=gen)
            if difference_conv:
                # x_t = u_t - u_{t-1} (plus 10% of the random init), no bias: a run of identical tokens (empty
                # background patches) writes nothing into the state, so the scan integrates content only
                w.mul_(0.1)
                w[..., -1] += 1.0
                w[..., -2] -= 1.0
                if mixer.conv1d.bias is not None:
                    mixer.conv1d.bias.zero_()
            r = mixer.dt_proj.in_features
            mixer.dt_proj.weight.uniform_(-r ** -0.5, r ** -0.5, generator=gen)
            u = torch.rand(mixer.dt_proj.out_features, generator=gen)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
            mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # softplus^-1(dt)
            n = mixer.A_log.shape[1]
            a = torch.arange(1, n + 1, dtype=torch.float32) / a_scale
            mixer.A_log.copy_(torch.log(a).repeat(mixer.A_log.shape[0], 1))
            mixer.D.fill_(1.0)


def spread_positions(k: int, n_layer: int) -> list[int]:
    """Where :func:`grow_mamba` puts ``k`` trained layers in ``n_layer`` when they are spread evenly:
    ``round(i * n_layer / k)`` (2 -> 16: layers 0 and 8; 4 -> 16: 0, 4, 8, 12)."""
    return [round(i * n_layer / k) for i in range(k)]


def referent_tap(s: "TrainSettings", depth: int) -> int:
    """The layer after which the referent read-out reads at the current ``depth``: ``memory_layer`` modulo the
    depth when ``referent_layer`` is None; else layer ``referent_layer`` (modulo the starting depth) of the model
    training started with, followed to wherever :func:`grow_mamba` put it once the model has grown."""
    if s.referent_layer is None:
        return s.memory_layer % depth
    start = s.grow_from or s.model.n_layer
    k = s.referent_layer % start
    return spread_positions(start, depth)[k] if s.grow_spread and depth != start else k


def grow_mamba(small, n_layer: int, seed: int = 0, positions: list[int] | None = None, **init):
    """A deeper copy of the :class:`~mambaprune.models.mamba_lm.MambaLM` ``small``: its config with ``n_layer``
    layers, its embeddings and final norm, its layers at ``positions`` (increasing; default the bottom,
    ``0 .. k-1``), and new layers everywhere else drawn by :func:`init_mamba_` (``seed`` and ``init`` as there)
    with ``out_proj`` zero, so each new layer starts as the identity and the grown model computes exactly what
    ``small`` did; training on then lets them grow. Spread positions (:func:`spread_positions`) leave the
    trained layers' work at several depths instead of all at the bottom.

    A shallow Mamba leaves the plateau of recall tasks that a 16-layer one does not leave in the same number of
    steps (``research/recall_plateau.py --grow-to 16``), so training shallow and growing is a way to a deep
    model on a small budget."""
    k = small.config.n_layer
    if n_layer < k:
        raise ValueError(f"grow_mamba: n_layer {n_layer} is below the model's {k} layers")
    big = MambaLM(MambaConfig.from_dict({**small.config.to_dict(), "n_layer": n_layer}))
    init_mamba_(big, seed, **{**init, "out_proj_scale": 0.0})
    big.backbone.embedding.load_state_dict(small.backbone.embedding.state_dict())
    big.backbone.norm_f.load_state_dict(small.backbone.norm_f.state_dict())
    positions = list(range(k)) if positions is None else list(positions)
    if len(positions) != k or positions != sorted(set(positions)) or not 0 <= positions[0] <= positions[-1] < n_layer:
        raise ValueError(f"grow_mamba: positions {positions} must be {k} increasing layer indices below {n_layer}")
    for i, trained in zip(positions, small.backbone.layers):
        big.backbone.layers[i].load_state_dict(trained.state_dict())
    return big.to(device=small.lm_head.weight.device, dtype=small.lm_head.weight.dtype)


def conversations(root, split: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(image path, [(question, answer), ...])]``: the questions of each image of ``split``, with the most
    common reference answer (the 10 VQAv2 answers agree on SynthVQA). Codes are taught as drawn, in capitals
    (the TextVQA files hold them lower-cased; the VQA metric lower-cases both sides)."""
    by_image: dict[str, list] = defaultdict(list)
    for s in load_dataset("synthvqa", root, split):
        answer = Counter(s.answers).most_common(1)[0][0]
        if s.group == "synthvqa:read":
            answer = answer.upper()
        by_image[str(s.image)].append((s.question, answer))
    return sorted(by_image.items())


#: auxiliary per-patch classes: colour (none + 6), shape (none + 5), code characters (multi-label, 30)
AUX_COLORS = ("none",) + tuple(COLORS)
AUX_SHAPES = ("none",) + SHAPES
AUX_SIZES = ("none",) + SIZES
CHAR_SLOTS = 3            # characters of a sign one patch can hold, in reading order (patch_targets)


def scene_patches(scene: dict, scene_size: int, image_size: int, patch_size: int) -> tuple[list[int], list[int]]:
    """The row-major patch index holding the centre of each object and of each code character of a scene, with
    coordinates scaled from the scene's ``scene_size`` to the tower's ``image_size``."""
    g = image_size // patch_size
    scale = image_size / scene_size

    def patch(x: float, y: float) -> int:
        return min(g - 1, int(y * scale) // patch_size) * g + min(g - 1, int(x * scale) // patch_size)

    sign = scene["sign"]
    x0, y0 = sign["text_origin"]
    chars = [patch(x0 + (k * (GLYPH_W + 1) + GLYPH_W / 2) * sign["scale"], y0 + GLYPH_H / 2 * sign["scale"])
             for k in range(len(scene["code"]))]
    return [patch(*o["center"]) for o in scene["objects"]], chars


def patch_targets(scene: dict, scene_size: int, image_size: int, patch_size: int) -> dict[str, torch.Tensor]:
    """Per-patch targets of the auxiliary loss, read from a SynthVQA scene description: the colour and shape of
    the object whose centre lies in the patch (class 0 where none does), the set of code characters whose
    centre lies in it (``chars``, multi-hot), the same characters in reading order (``char_order``: slot k is
    the k-th of them from the left, ``CODE_ALPHABET`` index + 1, 0 when there is none; at 160 px two of a
    sign's three characters usually share a patch, and the set alone loses their order), and for a patch
    holding any centre its grid ``row`` and ``col`` + 1 (0 elsewhere: the standardised features of the
    language model's input keep only what differs between images, so a content token must say where it is).
    Coordinates are scaled from the scene's ``scene_size`` to the tower's ``image_size``."""
    g = image_size // patch_size
    n = g * g
    color = torch.zeros(n, dtype=torch.long)
    shape = torch.zeros(n, dtype=torch.long)
    size = torch.zeros(n, dtype=torch.long)
    chars = torch.zeros(n, len(CODE_ALPHABET))
    char_order = torch.zeros(n, CHAR_SLOTS, dtype=torch.long)
    object_patches, char_patches = scene_patches(scene, scene_size, image_size, patch_size)
    for obj, p in zip(scene["objects"], object_patches):
        color[p] = AUX_COLORS.index(obj["color"])
        shape[p] = AUX_SHAPES.index(obj["shape"])
        size[p] = AUX_SIZES.index(obj["size"])
    filled: Counter = Counter()
    for ch, p in zip(scene["code"], char_patches):          # the characters come left to right
        c = CODE_ALPHABET.index(ch)
        chars[p, c] = 1.0
        if filled[p] < CHAR_SLOTS:
            char_order[p, filled[p]] = c + 1
        filled[p] += 1
    content = torch.zeros(n, dtype=torch.bool)
    content[list(object_patches) + list(char_patches)] = True
    index = torch.arange(n)
    return {"color": color, "shape": shape, "category": color * len(AUX_SHAPES) + shape, "size": size,
            "chars": chars, "char_order": char_order,
            "row": torch.where(content, index // g + 1, 0), "col": torch.where(content, index % g + 1, 0)}


PATCH_ORDERS = ("scan", "rows-reversed", "columns-reversed", "rows-rotated")


def reorder_patches(visual: torch.Tensor, grid: int, order: str = "scan") -> torch.Tensor:
    """The visual tokens ``(batch, grid * grid, d)``, row-major, in another order: ``rows-reversed`` visits the
    patch rows bottom to top (each row still left to right), ``columns-reversed`` each row right to left,
    ``rows-rotated`` the lower half of the rows first, then the upper half. A token's content is unchanged, so a
    read-out that finds a named object's row from the content gives the same row in every order, and one that
    finds it from how long ago the scan passed the object (recency) gives the mirrored one under rows-reversed
    (``research/testbed_name_recall.py --order``); ``row_flip`` trains on rows-reversed images."""
    if order not in PATCH_ORDERS:
        raise ValueError(f"order must be one of {PATCH_ORDERS}, got {order!r}")
    if visual.shape[1] != grid * grid:
        raise ValueError(f"{visual.shape[1]} visual tokens are not a {grid} x {grid} grid")
    cells = visual.reshape(visual.shape[0], grid, grid, -1)
    if order == "rows-reversed":
        cells = cells.flip(1)
    elif order == "columns-reversed":
        cells = cells.flip(2)
    elif order == "rows-rotated":
        cells = cells.roll(-(grid // 2), dims=1)
    return cells.reshape(visual.shape)


def stack_targets(rows: list[dict[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    """Per-image target dicts (:func:`patch_targets`, :func:`memory_targets`) stacked into one batch dict."""
    return {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}


class AuxHead(nn.Module):
    """A linear read-out of the vision tower's patch features used only in training (not shipped): it makes the
    tower encode what each patch holds early, which the language model then learns to use far sooner. ``grid``
    is the tower's patches per side (the row and column targets of :func:`patch_targets` run to it)."""

    def __init__(self, dim: int, grid: int, balance_chars: bool = False):
        super().__init__()
        self.balance_chars = balance_chars
        self.sizes = (len(AUX_COLORS), len(AUX_SHAPES), len(AUX_COLORS) * len(AUX_SHAPES), len(AUX_SIZES),
                      len(CODE_ALPHABET), CHAR_SLOTS * (len(CODE_ALPHABET) + 1), grid + 1, grid + 1)
        self.proj = nn.Linear(dim, sum(self.sizes))

    #: the targets of :func:`patch_targets` the read-out predicts, in the order of ``sizes``
    NAMES = ("color", "shape", "category", "size", "chars", "char_order", "row", "col")

    def logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The read-out's logits per target (:attr:`NAMES`), ``(batch, tokens, classes)``; ``char_order`` as
        ``(batch, tokens, CHAR_SLOTS, alphabet + 1)``. Read from layer-normalised features: the read-out gives
        the tower no reason to grow its features."""
        features = F.layer_norm(features.float(), features.shape[-1:])
        out = dict(zip(self.NAMES, self.proj(features).split(self.sizes, dim=-1)))
        out["char_order"] = out["char_order"].reshape(*out["char_order"].shape[:2], CHAR_SLOTS, -1)
        return out

    def loss(self, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of every class target of :func:`patch_targets` plus the multi-hot characters'."""
        logits = self.logits(features)
        ce = sum(F.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten())
                 for k in ("color", "shape", "category", "size", "row", "col"))
        order = logits["char_order"].flatten(0, 2)
        slots = targets["char_order"].flatten()
        if self.balance_chars:     # the few filled slots weigh as much as all the empty ones
            per_slot, filled = F.cross_entropy(order, slots, reduction="none"), slots > 0
            empty = per_slot[~filled].mean() if (~filled).any() else per_slot.sum() * 0.0
            filled_ce = per_slot[filled].mean() if filled.any() else per_slot.sum() * 0.0
            ce = ce + filled_ce * CHAR_SLOTS + empty
        else:
            ce = ce + F.cross_entropy(order, slots) * CHAR_SLOTS
        return ce + F.binary_cross_entropy_with_logits(logits["chars"], targets["chars"]) * len(CODE_ALPHABET)


class TurnEncoder:
    """Token ids and labels of multi-turn sequences (ids and token end offsets cached per text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def _tokenized(self, text: str) -> tuple[list[int], list[int]]:
        """``(ids, the character offset where each token ends)``."""
        if text not in self._cache:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            self._cache[text] = list(enc["input_ids"]), [e for _, e in enc["offset_mapping"]]
        return self._cache[text]

    def ids(self, text: str) -> list[int]:
        return self._tokenized(text)[0]

    def encode(self, turns) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for question, answer in turns:
            prompt = self.ids(testbed_prompt(question))
            reply = self.ids(answer) + [self.eos]
            ids += prompt + reply
            labels += [IGNORE] * len(prompt) + reply
        return ids, labels

    def name_positions(self, scene: dict, turns) -> list[tuple[int, int, int]]:
        """``[(j, row, col)]``: for each object a turn's question names in words
        (:func:`~mambaprune.data.synthvqa.referent_name_spans`), the index in :meth:`encode`'s ids of the last
        token of its name, and the object's grid cell."""
        out, at = [], 0
        for question, answer in turns:
            prompt = testbed_prompt(question)
            family, text = named_question(question)
            if family is not None:
                q0 = prompt.index(text)
                ends = self._tokenized(prompt)[1]
                for obj, (_, end) in referent_name_spans(scene, family, text):
                    out.append((at + ends.index(q0 + end), obj["row"], obj["col"]))
            at += len(self.ids(prompt)) + len(self.ids(answer)) + 1
        return out

    def batch(self, conversations_) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(ids, labels)``, (batch, T); padding is EOS with label IGNORE."""
        encoded = [self.encode(turns) for turns in conversations_]
        T = max(len(i) for i, _ in encoded)
        ids = torch.full((len(encoded), T), self.eos, dtype=torch.long)
        labels = torch.full((len(encoded), T), IGNORE, dtype=torch.long)
        for row, (i, l) in enumerate(encoded):
            ids[row, :len(i)] = torch.tensor(i)
            labels[row, :len(l)] = torch.tensor(l)
        return ids, labels


def answer_loss(model, visual: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                state_layer: int | tuple[int, ...] | None = None):
    """Mean cross-entropy of the labelled text tokens of ``[visual][ids]``; ``visual`` are the projected patch
    embeddings (:meth:`MambaVLM.embed_visual`). Right padding needs no mask: the model is causal. With
    ``state_layer`` also the residual stream after that layer at every position, layer-normalised without
    parameters, ``(batch, nv + T, d_model)``; with a tuple of layers a tuple of such streams, in its order."""
    embeds = torch.cat([visual, model.lm.backbone.embedding(ids)], dim=1)
    layers = (state_layer,) if isinstance(state_layer, int) else state_layer
    tapped = {}

    def tap(seq):
        if seq.layer in layers:
            tapped[seq.layer] = seq.stream()

    out = model.lm(inputs_embeds=embeds, return_all_logits=True, hook=None if state_layer is None else tap)
    nv = visual.shape[1]
    pred = out.logits[:, nv - 1:-1, : model.lm.config.vocab_size]     # position p predicts token p + 1
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)
    if state_layer is None:
        return loss
    normed = {k: F.layer_norm(v.float(), v.shape[-1:]) for k, v in tapped.items()}   # once per layer
    states = tuple(normed[k] for k in layers)
    return loss, states[0] if isinstance(state_layer, int) else states


def answer_start_positions(labels: torch.Tensor, n_visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, positions)`` of the sequence positions that predict the first answer token of each turn:
    text token ``j`` opens an answer when it is labelled and token ``j - 1`` is not, and it is predicted at
    position ``n_visual + j - 1`` of ``[visual][ids]`` (the prompt's last token)."""
    labelled = labels != IGNORE
    opens = labelled.clone()
    opens[:, 1:] &= ~labelled[:, :-1]
    rows, j = opens.nonzero(as_tuple=True)
    return rows, n_visual + j - 1


def memory_targets(scene: dict, scene_size: int, image_size: int, patch_size: int, code_slots: int = 3
                   ) -> dict[str, torch.Tensor]:
    """Targets of the scan-memory loss at every visual position i (row-major patches): what the language
    model has *seen so far* along its scan, read off the scene description. An object or a code character is
    "seen" at the patch holding its centre. Per position: ``present`` (30 colour+shape categories, 0/1),
    ``counts`` (for each of the 5 shapes and 6 colours, whether at least k = 1..5 were seen: 55 flags),
    ``code`` (the character of each code slot once seen, else 0: ``code_slots`` classes of 31) and
    ``where`` (row and column + 1 of the last seen object of each category, else 0: 60 classes of 5)."""
    n = (image_size // patch_size) ** 2
    object_patches, char_patches = scene_patches(scene, scene_size, image_size, patch_size)
    present = torch.zeros(n, len(CATEGORY_NAMES))
    counts = torch.zeros(n, len(SHAPES) + len(COLORS), 5)
    code = torch.zeros(n, code_slots, dtype=torch.long)
    where = torch.zeros(n, len(CATEGORY_NAMES), 2, dtype=torch.long)
    tally = torch.zeros(len(SHAPES) + len(COLORS))
    events = sorted((p, k) for k, p in enumerate(object_patches))
    for p, k in events:
        o = scene["objects"][k]
        c = CATEGORY_NAMES.index(f"{o['color']} {o['shape']}")
        present[p:, c] = 1.0
        where[p:, c, 0], where[p:, c, 1] = o["row"] + 1, o["col"] + 1
        for kind in (SHAPES.index(o["shape"]), len(SHAPES) + list(COLORS).index(o["color"])):
            tally[kind] += 1
            if tally[kind] <= 5:
                counts[p:, kind, int(tally[kind]) - 1] = 1.0
    for j, (ch, p) in enumerate(zip(scene["code"][:code_slots], char_patches)):
        code[p:, j] = CODE_ALPHABET.index(ch) + 1
    return {"present": present, "counts": counts.flatten(1), "code": code, "where": where.flatten(1)}


REFERENT_SLOTS = 2        # objects a question can name (question_referents)


def named_question(question: str) -> tuple[str | None, str]:
    """``(family, text)`` for the SynthVQA templates that name objects: "spatial" with the caption (a question
    as the VSR reader gives it, ``VSR_PROMPT`` around the caption, or the bare caption: it starts with "The "),
    "attr" with the question ("What color/shape/size ..."); ``(None, question)`` for the others."""
    prefix = VSR_PROMPT.split("{caption}")[0]
    text = question[len(prefix):] if question.startswith(prefix) else question
    if text.startswith("The "):
        return "spatial", text
    if question.split(" ", 2)[:2] in (["What", "color"], ["What", "shape"], ["What", "size"]):
        return "attr", question
    return None, question


def referent_targets(scene: dict, question: str) -> torch.Tensor:
    """``(2 * REFERENT_SLOTS,)`` long: the grid row and column of each object the question names
    (:func:`~mambaprune.data.synthvqa.question_referents`: a spatial caption's subject and object, an attr
    question's object, or its reference object and the object beside it), IGNORE for the slots it leaves empty
    and for the families that name kinds rather than objects (exist, count, read). The family is told by the
    template (:func:`named_question`)."""
    family, text = named_question(question)
    out = torch.full((2 * REFERENT_SLOTS,), IGNORE, dtype=torch.long)
    if family is not None:
        for k, obj in enumerate(question_referents(scene, family, text)):
            out[2 * k], out[2 * k + 1] = obj["row"], obj["col"]
    return out


def ordinal_cells(cells: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """Grid rows or columns ``0 .. grid - 1`` mapped linearly onto ``-1 .. 1`` (float)."""
    return cells.float() * (2 / (grid - 1)) - 1


class MemoryHead(nn.Module):
    """A linear read-out of the language model's final states at the visual positions, used only in training
    (not shipped): predicting what the scan has seen so far (:func:`memory_targets`) teaches the SSM to write the
    image's content into its state and hold it, for the answers to read: at initialisation the answer loss gives
    the visual tokens almost no gradient (Δ-scaled state writes are small). In the runs so far it trained (its
    loss fell from 3.2 to 2.4 in 400 steps) but the answers had not yet left chance level."""

    def __init__(self, dim: int, code_slots: int = 3):
        super().__init__()
        self.code_slots = code_slots
        n_cat = len(CATEGORY_NAMES)
        self.sizes = (n_cat, 5 * (len(SHAPES) + len(COLORS)), code_slots * (len(CODE_ALPHABET) + 1), n_cat * 2 * 5)
        self.proj = nn.Linear(dim, sum(self.sizes))
        self.referent = nn.Linear(dim, REFERENT_SLOTS * 2 * GRID)
        self.ordinal = nn.Linear(dim, 2)

    def referent_loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of :func:`referent_targets` (``(n, 2 * REFERENT_SLOTS)``, IGNORE where a question names
        fewer objects) read from the states ``(n, dim)`` where the answers start; 0 when nothing is named."""
        logits = self.referent(states.float()).reshape(-1, GRID)
        targets = targets.reshape(-1)
        if not (targets != IGNORE).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, targets, ignore_index=IGNORE)

    def named_logits(self, states: torch.Tensor) -> torch.Tensor:
        """``(n, 2, GRID)``: the grid row and column logits of the object named at each of ``states`` ``(n, dim)``
        (the last token of its name), read by the first slot of the referent read-out."""
        return self.referent(states.float()).reshape(-1, 2 * REFERENT_SLOTS, GRID)[:, :2]

    def named_ordinal(self, states: torch.Tensor) -> torch.Tensor:
        """``(n, 2)``: the grid row and column of the object named at each of ``states`` ``(n, dim)`` as one scalar
        each, -1 at the first row / column and 1 at the last (:func:`ordinal_cells`)."""
        return self.ordinal(states.float())

    def named_loss(self, states: torch.Tensor, cells: torch.Tensor, code: str = "class") -> torch.Tensor:
        """The loss of the grid row and column ``cells`` ``(n, 2)`` of the objects named at ``states``: the
        cross-entropy of :meth:`named_logits` (``code="class"``), or the squared error of :meth:`named_ordinal`
        against :func:`ordinal_cells` (``code="ordinal"``: positions on a line, which two recalled objects
        can be compared by as a difference)."""
        if code == "ordinal":
            return F.mse_loss(self.named_ordinal(states), ordinal_cells(cells))
        if code != "class":
            raise ValueError(f"code must be 'class' or 'ordinal', got {code!r}")
        return F.cross_entropy(self.named_logits(states).reshape(-1, GRID), cells.reshape(-1))

    def loss(self, states: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        present, counts, code, where = self.proj(states.float()).split(self.sizes, dim=-1)
        code = code.reshape(*code.shape[:2], self.code_slots, -1)
        where = where.reshape(*where.shape[:2], -1, 5)
        return (F.binary_cross_entropy_with_logits(present, t["present"])
                + F.binary_cross_entropy_with_logits(counts, t["counts"])
                + F.cross_entropy(code.flatten(0, 2), t["code"].flatten())
                + F.cross_entropy(where.flatten(0, 2), t["where"].flatten()))


def visual_rms_penalty(visual: torch.Tensor, target: float = 1.0) -> torch.Tensor:
    """``mean((rms(v) - target)^2)`` over the visual embeddings ``v`` (RMS over channels, per token).

    Without it the projector's outputs grow to a norm ~200 times the text embeddings' (measured: 167 against
    0.84 after 400 steps), the residual stream at the visual positions then barely changes through the layers,
    and the answers stay independent of the image."""
    rms = visual.float().pow(2).mean(-1).sqrt()
    return (rms - target).pow(2).mean()


def pretrain_tower(tower, aux: "AuxHead", images: list, targets_of, s: TrainSettings, log=print) -> None:
    """Stage 1 (``tower_steps > 0``): the vision tower alone, trained on the per-patch read-out of
    :class:`AuxHead` (colour, shape, colour x shape, size and code characters of what each patch holds) for
    ``tower_steps`` steps of ``tower_batch_size`` random training images, AdamW with :func:`lr_at`'s schedule
    peaking at ``tower_lr``. ``targets_of(path)`` gives an image's :func:`patch_targets`. Each patch's content
    then sits in its own token, linearly readable, before the language model starts; with ``freeze_tower``
    stage 2 trains only the projector and the LM on these features."""
    dev = next(tower.parameters()).device
    params = list(tower.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=s.tower_lr, weight_decay=s.weight_decay, betas=(0.9, 0.98))
    rng = random.Random(s.seed + 17)
    tower.train()
    running = []
    for step in range(s.tower_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s, peak=s.tower_lr, total=s.tower_steps)
        picked = rng.sample(images, min(s.tower_batch_size, len(images)))
        loss = aux.loss(tower(tower.preprocess(picked).to(dev)), stack_targets([targets_of(p) for p in picked], dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        running.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == s.tower_steps:
            log(json.dumps({"tower_step": step + 1, "aux_loss": round(sum(running) / len(running), 4)}))
            running = []


@torch.no_grad()
def tower_features(tower, images: list, batch_size: int = 64) -> torch.Tensor:
    """The tower's patch features of every image, ``(n, tokens, dim)`` in fp16 on the CPU (stage 2 with a
    frozen tower reads them instead of running the tower at every step)."""
    dev = next(tower.parameters()).device
    was = tower.training
    tower.eval()
    out = [tower(tower.preprocess(images[i:i + batch_size]).to(dev)).half().cpu()
           for i in range(0, len(images), batch_size)]
    tower.train(was)
    return torch.cat(out)


def standardize_tower(tower, features: torch.Tensor) -> torch.Tensor:
    """Set the tower's standardisation buffers from the features of the training images, ``(n, tokens, dim)``
    as :func:`tower_features` gives them (taken with the buffers at identity): ``feature_mean`` is their mean
    over the images at each position, ``feature_scale`` the std of what is left, per channel. Returns the
    features standardised the same way (fp16).

    Why: at each position the background looks the same in every image, so most of every visual token is
    image-independent; the scan sums it over all the visual positions and the image's content is a
    fraction of a percent of the stream where the answers are read (``research/testbed_image_signal.py``).
    Subtracting it leaves only what differs between images. Measured on a linear-probe control (pooled
    features, a 2-layer MLP, 1500 steps on exist questions): the training loss stalls at 0.63 without it and
    falls to 0.04 with it."""
    f = features.float()
    mean = f.mean(0, keepdim=True)
    scale = (f - mean).std(dim=(0, 1), keepdim=True).clamp(min=1e-3)
    with torch.no_grad():
        tower.feature_mean.copy_(mean.to(tower.feature_mean))
        tower.feature_scale.copy_(scale.to(tower.feature_scale))
    return ((f - mean) / scale).half()


def load_tower(tower, source) -> None:
    """Copy into ``tower`` the vision tower of ``source``: a testbed folder (``model.safetensors``) or a training
    checkpoint (``last.pt``, or the folder holding one), standardisation buffers included. The two must have the
    same tower shape."""
    source = Path(source)
    if source.is_dir():
        source = source / "model.safetensors" if (source / "model.safetensors").is_file() else source / "last.pt"
    if not source.is_file():
        raise FileNotFoundError(f"no testbed weights or last.pt at {source}")
    if source.suffix == ".safetensors":
        state = read_state_file(source)
    else:
        state = torch.load(source, map_location="cpu", weights_only=False)["model"]
    prefix = "vision."
    tower_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not tower_state:
        raise ValueError(f"{source} holds no vision tower weights")
    tower.load_state_dict(tower_state)      # strict: a different tower shape fails here, naming the tensors


def lr_at(step: int, s: TrainSettings, peak: float | None = None, total: int | None = None) -> float:
    """Linear warm-up over ``s.warmup`` steps to ``peak`` (default ``s.lr``), then cosine decay to
    ``s.min_lr_ratio * peak`` at step ``total`` (default ``s.steps``)."""
    peak = s.lr if peak is None else peak
    total = s.steps if total is None else total
    if step < s.warmup:
        return peak * (step + 1) / s.warmup
    t = min(1.0, (step - s.warmup) / max(1, total - s.warmup))
    return peak * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def grow_step(s: TrainSettings) -> int | None:
    """The step at which a grown run (``grow_from > 0``) deepens its LM from ``grow_from`` to
    ``model.n_layer`` layers: ``round(grow_at * steps)``; None when the run does not grow."""
    if not s.grow_from:
        return None
    return round(s.grow_at * s.steps)


def phase_lr(step: int, s: TrainSettings) -> float:
    """The learning rate at ``step``: :func:`lr_at` over the whole run, or, in a grown run, one warm-up and
    cosine decay over the shallow phase ``[0, grow_step)`` and another over the deep phase after it, peaking
    at ``lr * grow_lr_scale`` (1: the new layers start from zero and grow fastest at the full rate; run 28's
    2-layer model lost a third of its code reading in the first 100 steps after growth at the full rate)."""
    g = grow_step(s)
    if g is None:
        return lr_at(step, s)
    if step < g:
        return lr_at(step, s, total=g)
    return lr_at(step - g, s, peak=s.lr * s.grow_lr_scale, total=s.steps - g)


def family_subset(samples, per_family: int | None):
    """The first ``per_family`` samples of each family (all when None)."""
    if per_family is None:
        return list(samples)
    seen: Counter = Counter()
    out = []
    for s in samples:
        if seen[s.group] < per_family:
            out.append(s)
            seen[s.group] += 1
    return out


def evaluate_families(model, samples, batch_size: int = 32, progress: bool | str = False) -> dict[str, float]:
    """``{family: accuracy}`` (the family metric's accuracy, a fraction) of the model on ``samples``."""
    model.eval()
    predictions = answer_samples(model, samples, batch_size=batch_size, progress=progress)
    scores = score_samples(samples, predictions)
    return {g.split(":", 1)[1]: v["accuracy"] for g, v in sorted(scores.items())}


def plot_curves(log_path, out_path) -> None:
    """Training loss and per-family validation accuracy against the step, from ``train_log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax1.set(xlabel="step", ylabel="training loss (answer tokens)", yscale="log", title="loss")
    for fam in FAMILIES:
        pts = [(r["step"], 100 * r["val"][fam]) for r in evals if fam in r["val"]]
        if pts:
            ax2.plot(*zip(*pts), marker=".", label=fam)
    ax2.set(xlabel="step", ylabel="validation accuracy (%)", ylim=(0, 100), title="validation accuracy")
    ax2.legend(loc="lower right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def trainable_and_optimizer(model, aux, memory, s: TrainSettings, carry: dict | None = None, visual_aux=None):
    """``(named, opt)``: the trained parameters (name, tensor) and their AdamW (no weight decay on
    embeddings, norms and biases). ``carry`` maps a parameter name to its AdamW state in an earlier optimizer;
    a parameter found there with the same shape keeps its moments (at growth: the lower layers, the
    embeddings, the projector and the read-out heads)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not s.freeze_tower:
        named += list(aux.named_parameters(prefix="aux"))
    named += list(memory.named_parameters(prefix="memory"))
    if visual_aux is not None:
        named += list(visual_aux.named_parameters(prefix="visual_aux"))
    decay = [p for n, p in named if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.98))
    for n, p in named:
        state = (carry or {}).get(n)
        if state and state["exp_avg"].shape == p.shape:
            opt.state[p] = {k: v.clone() for k, v in state.items()}
    return named, opt


def rename_layer(name: str, moved: dict[int, int]) -> str:
    """``name`` of a parameter of layer ``i`` of the LM (``lm.backbone.layers.i.``) renamed to layer
    ``moved[i]``; other names unchanged."""
    head = "lm.backbone.layers."
    if not name.startswith(head):
        return name
    i, rest = name[len(head):].split(".", 1)
    return f"{head}{moved.get(int(i), int(i))}.{rest}"


def optimizer_state_by_name(named, opt) -> dict:
    """The AdamW state of each parameter in ``named``, by name (for :func:`trainable_and_optimizer`)."""
    return {n: opt.state[p] for n, p in named if p in opt.state}


def train(s: TrainSettings, log=print) -> dict:
    """Run (or resume) a training run; returns the final ``info`` dict saved with the model."""
    if s.standardize and not s.freeze_tower:
        raise ValueError("standardize sets the tower's feature statistics once; it needs freeze_tower")
    if s.grow_from and not 0 < s.grow_from < s.model.n_layer:
        raise ValueError(f"grow_from {s.grow_from} must be between 1 and n_layer - 1 = {s.model.n_layer - 1}")
    if s.grow_from and not 0 < s.grow_at < 1:
        raise ValueError(f"grow_at {s.grow_at} must be a fraction of the steps in (0, 1)")
    if s.referent_at not in ("answer", "names"):
        raise ValueError(f"referent_at must be 'answer' or 'names', got {s.referent_at!r}")
    if s.referent_code not in ("class", "ordinal") or (s.referent_code == "ordinal" and s.referent_at != "names"):
        raise ValueError(f"referent_code must be 'class' or, with referent_at 'names', 'ordinal'; "
                         f"got {s.referent_code!r}")
    if not 0 <= s.row_flip <= 1:
        raise ValueError(f"row_flip is a probability, got {s.row_flip}")
    if s.threads:
        torch.set_num_threads(s.threads)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    train_convs = conversations(s.data, "train")
    if not train_convs:
        raise ValueError(f"no training questions under {s.data}")
    val = family_subset(load_dataset("synthvqa", s.data, "val"), s.eval_per_family)
    ckpt_path = out / "last.pt"
    resume = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.is_file() else None

    if resume is not None:
        from .models.vlm import load_tokenizer
        tokenizer = load_tokenizer(out / "tokenizer")
    else:
        texts = [testbed_prompt(q) + a for _, turns in train_convs for q, a in turns]
        tokenizer = build_tokenizer(texts, vocab_size=s.model.vocab_size)
        tokenizer.save_pretrained(str(out / "tokenizer"))
    torch.manual_seed(s.seed)
    init = dict(dt_min=DT_MIN, dt_max=DT_MAX, a_scale=A_INIT_SCALE, difference_conv=s.difference_conv,
                embedding_std=s.embedding_std)
    grow_at_step = grow_step(s)
    # a grown run starts shallow; resumed, it has the depth its checkpoint's config records
    depth = s.grow_from if grow_at_step is not None else s.model.n_layer
    if resume is not None:
        depth = resume["config"]["n_layer"]
    model = build_testbed(replace(s.model, n_layer=depth), tokenizer)
    init_mamba_(model.lm, s.seed, **init)
    aux = AuxHead(model.vision.dim, model.vision.image_size // model.vision.patch_size, s.balance_chars)
    memory = MemoryHead(model.lm.config.d_model)
    # the per-patch read-out once more, of the projected tokens the language model reads (--visual-aux-weight)
    visual_aux = (AuxHead(model.lm.config.d_model, model.vision.image_size // model.vision.patch_size,
                          s.balance_chars) if s.visual_aux_weight else None)
    dev = torch.device(s.device)
    model, aux, memory = model.to(dev), aux.to(dev), memory.to(dev)
    if visual_aux is not None:
        visual_aux = visual_aux.to(dev)
    scene_file = json.loads((Path(s.data) / "scenes" / "train.json").read_text())
    scenes = {sc["image_id"]: sc for sc in scene_file["scenes"]}

    def scene_of(path) -> dict:                    # images are named by their id: <image_id>.png
        return scenes[int(Path(path).stem)]

    geometry = (scene_file["image_size"], model.vision.image_size, model.vision.patch_size)
    image_paths = [p for p, _ in train_convs]
    if resume is None and s.tower_from:
        load_tower(model.vision, s.tower_from)
        log(f"stage 1 skipped: the vision tower of {s.tower_from}")
    elif resume is None and s.tower_steps > 0:
        log(f"stage 1: the vision tower alone, {s.tower_steps} steps of {s.tower_batch_size} images")
        pretrain_tower(model.vision, aux, image_paths,
                       lambda p: patch_targets(scene_of(p), *geometry), s, log=log)
    if s.freeze_tower:
        model.vision.requires_grad_(False)
    named, opt = trainable_and_optimizer(model, aux, memory, s, visual_aux=visual_aux)
    step, elapsed = 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        aux.load_state_dict(resume["aux"])
        memory.load_state_dict(resume["memory"])
        if visual_aux is not None:
            visual_aux.load_state_dict(resume["visual_aux"])
        opt.load_state_dict(resume["optimizer"])
        step, elapsed = resume["step"], resume["elapsed"]
        log(f"resumed from {ckpt_path} at step {step}")
        if s.stop_at is not None and step >= s.stop_at:     # this piece of a pieced run is done
            log(f"already at step {step} (--stop-at {s.stop_at}): nothing to do")
            return {"steps_done": step, "stopped": True}
    cached = None
    if s.freeze_tower:
        log(f"frozen tower: computing the patch features of {len(image_paths)} training images")
        cached = tower_features(model.vision, image_paths)
        if s.standardize and resume is None:
            if not s.tower_from:         # a loaded tower comes with its standardisation
                cached = standardize_tower(model.vision, cached)
            with torch.no_grad():          # a background token (0 after standardising) enters the LM as 0
                for m in model.projector.modules():
                    if isinstance(m, nn.Linear) and m.bias is not None:
                        m.bias.zero_()
    encoder = TurnEncoder(tokenizer)
    log_path = out / "train_log.jsonl"
    if resume is None and log_path.exists():
        log_path.unlink()
    elif log_path.exists():   # rows a stopped run wrote after its last checkpoint are redone: drop them
        kept = [line for line in log_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{len(train_convs)} training images, {len(val)} validation questions, {n_params / 1e6:.2f} M parameters")

    def order_for(epoch: int) -> list[int]:
        idx = list(range(len(train_convs)))
        random.Random(s.seed * 1_000_003 + epoch).shuffle(idx)
        return idx

    t0 = time.perf_counter() - elapsed
    running = []
    end = s.steps if s.stop_at is None else min(s.steps, s.stop_at)
    while step < end:
        model.train()
        per_epoch = len(train_convs) // s.batch_size
        epoch, pos = divmod(step, per_epoch)
        batch_idx = order_for(epoch)[pos * s.batch_size:(pos + 1) * s.batch_size]
        picked = [train_convs[i] for i in batch_idx]
        rng = random.Random(s.seed * 7919 + step)
        turns = []
        for path, base in picked:
            extra = extra_questions(scene_of(path), rng, s.extra_per_family)
            # the extra captions asked as the VSR reader asks the split's own
            both = list(base) + [(VSR_PROMPT.format(caption=q) if f == "spatial" else q, a) for f, q, a in extra]
            if s.recall_per_image:
                both += recall_questions(scene_of(path), rng, s.recall_per_image)
            turns.append(rng.sample(both, len(both)))
        ids, labels = (t.to(dev) for t in encoder.batch(turns))
        if step == grow_at_step and model.lm.config.n_layer < s.model.n_layer:
            carry = optimizer_state_by_name(named, opt)
            k = model.lm.config.n_layer
            at = spread_positions(k, s.model.n_layer) if s.grow_spread else list(range(k))
            model.lm = grow_mamba(model.lm, s.model.n_layer, seed=s.seed + 1, positions=at, **init)
            # the trained layers keep their names' order, so their AdamW moments follow them
            carry = {rename_layer(n, dict(enumerate(at))): v for n, v in carry.items()}
            named, opt = trainable_and_optimizer(model, aux, memory, s, carry, visual_aux=visual_aux)
            log(f"step {step}: grown from {k} to {s.model.n_layer} layers, the trained ones at {at} "
                f"(new layers start as the identity)")
        for group in opt.param_groups:
            group["lr"] = phase_lr(step, s)
        if cached is not None:
            features = cached[batch_idx].to(dev, torch.float32)
        else:
            features = model.vision(model.vision.preprocess([p for p, _ in picked]).to(dev))
        visual = model.projector(features)
        scanned, flipped = visual, torch.zeros(len(picked), dtype=torch.bool, device=dev)
        if s.row_flip:
            # some images scanned bottom row first: a row can then no longer be told by how long ago the scan
            # passed it, only by what the token holds (the recall the names read-out asks for)
            flip_rng = random.Random(s.seed * 104729 + step)
            flipped = torch.tensor([flip_rng.random() < s.row_flip for _ in picked], device=dev)
            grid = model.vision.image_size // model.vision.patch_size
            scanned = torch.where(flipped[:, None, None], reorder_patches(visual, grid, "rows-reversed"), visual)
        unflipped = ~flipped          # the scan-memory targets follow the scan order: read on these images only
        depth = model.lm.config.n_layer
        tap, named_tap = s.memory_layer % depth, referent_tap(s, depth)
        loss, (states, named_states) = answer_loss(model, scanned, ids, labels, state_layer=(tap, named_tap))
        nv = visual.shape[1]
        if cached is None or visual_aux is not None:
            targets = stack_targets([patch_targets(scene_of(p), *geometry) for p, _ in picked], dev)
        aux_loss = aux.loss(features, targets) if cached is None else torch.zeros(())
        vis_loss = torch.zeros(())
        if visual_aux is not None:
            # what each patch holds and where, kept readable in the language model's input: a frozen tower's
            # features carry the objects' positions (97-98% for a linear probe), but a projector trained only by
            # the answers drops them (~30%, chance 25%), and no answer can recall what its input lacks
            vis_loss = s.visual_aux_weight * visual_aux.loss(visual, targets)
        mem_loss = 0.0
        if s.memory_weight or s.turn_memory_weight:
            mem = stack_targets([memory_targets(scene_of(p), *geometry) for p, _ in picked], dev)
        if s.memory_weight and unflipped.any():
            mem_loss = s.memory_weight * memory.loss(states[unflipped, :nv], {k: v[unflipped] for k, v in mem.items()})
        if s.turn_memory_weight or s.referent_weight:
            rows, pos = answer_start_positions(labels, nv)
        if s.turn_memory_weight and unflipped[rows].any():
            # the whole scene, once more, where each answer starts: the state must carry it across the turns
            r_, p_ = rows[unflipped[rows]], pos[unflipped[rows]]
            whole = {k: v[r_, -1].unsqueeze(0) for k, v in mem.items()}
            mem_loss = mem_loss + s.turn_memory_weight * memory.loss(states[r_, p_].unsqueeze(0), whole)
        if s.referent_weight and s.referent_at == "names":
            # where each named object is, at the last token of its name: recall by description, as it is read
            found = [(b, nv + j, r, c) for b, ((p, _), conv) in enumerate(zip(picked, turns))
                     for j, r, c in encoder.name_positions(scene_of(p), conv)]
            if found:
                b, at, r, c = (torch.tensor(v, device=dev) for v in zip(*found))
                mem_loss = mem_loss + s.referent_weight * memory.named_loss(named_states[b, at], torch.stack([r, c], 1),
                                                                        s.referent_code)
        elif s.referent_weight:
            # where the objects the question names are, where its answer starts: recall by description
            named_at = torch.stack([referent_targets(scene_of(p), q) for (p, _), conv in zip(picked, turns)
                                    for q, _ in conv]).to(dev)
            if len(named_at) != len(rows):
                raise RuntimeError(f"{len(rows)} answer starts for {len(named_at)} turns")
            mem_loss = mem_loss + s.referent_weight * memory.referent_loss(named_states[rows, pos], named_at)
        rms_loss = s.visual_rms_weight * visual_rms_penalty(visual)
        opt.zero_grad(set_to_none=True)
        (loss + s.aux_weight * aux_loss + vis_loss + mem_loss + rms_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], s.grad_clip)
        opt.step()
        step += 1
        running.append((loss.item(), aux_loss.item(), mem_loss.item() if torch.is_tensor(mem_loss) else mem_loss,
                        vis_loss.item()))
        if step % 10 == 0 or step % s.eval_every == 0 or step == end:
            row = {"step": step, "loss": sum(r[0] for r in running) / len(running),
                   "aux_loss": sum(r[1] for r in running) / len(running),
                   "memory_loss": sum(r[2] for r in running) / len(running), "lr": phase_lr(step - 1, s),
                   "n_layer": model.lm.config.n_layer,
                   "grad_norm": float(grad_norm), "visual_tokens": nv,
                   "elapsed_s": round(time.perf_counter() - t0, 1)}
            if visual_aux is not None:
                row["visual_aux_loss"] = sum(r[3] for r in running) / len(running)
            running = []
            if step % s.eval_every == 0 or step == end:
                row["val"] = evaluate_families(model, val)
                torch.save({"model": model.state_dict(), "aux": aux.state_dict(), "memory": memory.state_dict(),
                            **({"visual_aux": visual_aux.state_dict()} if visual_aux is not None else {}),
                            "optimizer": opt.state_dict(),
                            "step": step, "config": asdict(replace(s.model, n_layer=model.lm.config.n_layer)),
                            "elapsed": time.perf_counter() - t0}, ckpt_path)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            log(json.dumps(row))

    if s.stop_at is not None and step >= s.stop_at:
        log(f"stopped at step {s.stop_at} (--stop-at): {ckpt_path} resumes it")
        return {"steps_done": step, "stopped": True}
    test = family_subset(load_dataset("synthvqa", s.data, "test"), s.test_per_family)
    test_acc = evaluate_families(model, test, progress="test split")
    info = {"settings": {k: v for k, v in asdict(s).items() if k not in ("data", "out", "model")},
            "steps_done": step, "train_minutes": round((time.perf_counter() - t0) / 60, 1),
            "train_images": len(train_convs), "test_questions_per_family": len(test) // len(FAMILIES),
            "test_accuracy": test_acc, "parameters": sum(p.numel() for p in model.parameters())}   # after any growth
    save_testbed(model, replace(s.model, n_layer=model.lm.config.n_layer), out, info=info)   # stopped early: shallow
    plot_curves(log_path, out / "curves.png")
    log(f"test accuracy: {json.dumps(test_acc)}")
    return info


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainSettings(data="", out="")
    p.add_argument("--data", required=True, help="a SynthVQA folder written by `mambaprune synth`")
    p.add_argument("--out", required=True, help="where the testbed folder (and last.pt, to resume) goes")
    for name in ("steps", "batch_size", "warmup", "seed", "eval_every", "eval_per_family", "test_per_family",
                 "threads", "extra_per_family", "recall_per_image", "memory_layer", "tower_steps", "tower_batch_size",
                 "grow_from", "stop_at"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "aux_weight", "memory_weight",
                 "turn_memory_weight", "referent_weight", "visual_aux_weight", "row_flip", "visual_rms_weight",
                 "tower_lr", "embedding_std", "grow_at", "grow_lr_scale"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    for name in ("d_model", "n_layer", "d_state", "expand"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d.model, name),
                       help=f"the language model's {name} (TestbedConfig)")
    p.add_argument("--tower-from", default=d.tower_from,
                   help="skip stage 1 and take the vision tower (standardisation included) from this testbed "
                        "folder or training checkpoint (last.pt or its folder): to try stage-2 recipes on one tower")
    p.add_argument("--referent-layer", type=int, default=d.referent_layer,
                   help="the layer after which --referent-weight's read-out reads (0-based, of the model training "
                        "starts with; after --grow-from it follows that layer to its new depth); default "
                        "--memory-layer's")
    p.add_argument("--referent-at", choices=("answer", "names"), default=d.referent_at,
                   help="where the referent read-out (--referent-weight) reads the named objects' cells: where "
                        "each answer starts, or at the last token of each object's name in the question")
    p.add_argument("--referent-code", choices=("class", "ordinal"), default=d.referent_code,
                   help="with --referent-at names: read each named object's row and column as a 4-way class "
                        "each (class) or as one scalar each, -1 at the first and 1 at the last (ordinal, a "
                        "squared error: the code two recalled positions are compared by as a difference)")
    p.add_argument("--device", default=d.device, help="torch device to train on (default cpu)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=d.standardize,
                   help="with --freeze-tower: standardise the tower's features (per-position mean, per-channel "
                        "std of the training images) so that the shared background is zero")
    p.add_argument("--balance-chars", action=argparse.BooleanOptionalAction, default=d.balance_chars,
                   help="stage 1: the code characters' slots of the per-patch read-out weigh as much as all the "
                        "empty slots (a sign fills ~3 of 300 per image; unbalanced, the tower reads 11%% of them)")
    p.add_argument("--freeze-tower", action=argparse.BooleanOptionalAction, default=d.freeze_tower,
                   help="stage 2 trains only the projector and the LM, on the tower's cached features")
    p.add_argument("--grow-spread", action=argparse.BooleanOptionalAction, default=d.grow_spread,
                   help="with --grow-from: put the trained layers at evenly spread depths (2 -> 16: layers 0 "
                        "and 8) instead of at the bottom")
    p.add_argument("--difference-conv", action=argparse.BooleanOptionalAction, default=d.difference_conv,
                   help="initialise each conv1d as x_t = u_t - u_{t-1} (default: on)")


def settings_from_args(args) -> TrainSettings:
    fields = TrainSettings.__dataclass_fields__
    given = vars(args)
    model = TestbedConfig(**{k: given[k] for k in ("d_model", "n_layer", "d_state", "expand") if k in given})
    return TrainSettings(**{k: v for k, v in given.items() if k in fields and k != "model"}, model=model)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mambaprune.train_testbed", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    train(settings_from_args(p.parse_args(argv)), log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
