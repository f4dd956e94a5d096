"""The testbed model: its file format, its tokenizer, its training script, and the shipped weights."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mambaprune.data.readers import VSR_PROMPT, Sample, load_dataset
from mambaprune.data.synthvqa import CODE_ALPHABET, FAMILIES, SynthConfig, generate_synthvqa
from mambaprune.eval.evaluate import answer_samples, score_samples
from mambaprune.models import load_model
from mambaprune.models.checkpoints import CheckpointError
from mambaprune.models.testbed import TESTBED_DIR, build_testbed, build_tokenizer, load_testbed
from mambaprune.models.testbed import TestbedConfig as Config          # aliased: pytest collects test*
from mambaprune.models.testbed import read_testbed_config, save_testbed
from mambaprune.models.testbed import testbed_prompt as prompt
from mambaprune.train_testbed import (AUX_SHAPES, IGNORE, AuxHead, MemoryHead, TrainSettings, TurnEncoder, add_arguments,
                                      answer_loss, answer_start_positions, conversations,
                                      grow_mamba, grow_step, init_mamba_, lr_at,
                                      patch_targets, phase_lr, pretrain_tower, referent_tap, referent_targets,
                                      rename_layer,
                                      settings_from_args,
                                      spread_positions, stack_targets, standardize_tower, tower_features, train,
                                      visual_rms_penalty)

TINY = Config(image_size=32, patch_size=8, vision_width=16, vision_layers=1,
                     projector_hidden=32, d_model=16, n_layer=2, d_state=4, vocab_size=320)
CORPUS = [prompt(q) + a for q, a in [("What color is the triangle?", "red"),
                                              ("What does the sign say?", "K7M"),
                                              ("How many circles are there?", "3"),
                                              ("Is there a red circle in the image?", "yes"),
                                              ("The red circle is left of the blue square.", "false")]] * 5


@pytest.fixture(scope="module")
def synth_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthvqa(root, SynthConfig(per_family=6, train_multiplier=1))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=TINY.vocab_size)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    model = build_testbed(TINY, tokenizer)
    init_mamba_(model.lm, seed=0)
    return model.eval()


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_spells_codes_one_character_per_token(tokenizer):
    for code in ("K7M", "ZZ9", "A2B"):
        pieces = tokenizer.tokenize(code)
        assert pieces == list(code)
    text = prompt("What does the sign say?") + "K7M<|endoftext|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    for special in ("<|endoftext|>", "<|user|>", "<|assistant|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0


# ------------------------------------------------------------------------------------------------ file format
def test_save_and_load_round_trip(tiny_model, tmp_path, synth_small):
    save_testbed(tiny_model, TINY, tmp_path, info={"note": "tiny"})
    assert not any("lm_head" in k for k in _keys(tmp_path))          # tied head not stored
    loaded = load_model("testbed", tmp_path)
    config, info = read_testbed_config(tmp_path)
    assert config == TINY and info == {"note": "tiny"}
    image = synth_small / "images" / "3000000.png"
    a = tiny_model.prepare(image, "How many circles are there?")
    b = loaded.prepare(image, "How many circles are there?")
    assert torch.equal(a.inputs_embeds, b.inputs_embeds)
    assert torch.equal(tiny_model.prefill(a).logits, loaded.prefill(b).logits)


def _keys(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_broken_testbed_folders_raise_checkpoint_error(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_testbed(tmp_path / "missing")
    save_testbed(tiny_model, TINY, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_testbed(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "format": "other"}))
    with pytest.raises(CheckpointError, match="not a mambaprune-testbed config"):
        load_testbed(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("lm.backbone.norm_f.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="norm_f"):
        load_testbed(tmp_path)


# ------------------------------------------------------------------------------------------------ training
def test_init_mamba_draws_delta_in_range(tiny_model, tokenizer):
    for layer in tiny_model.lm.backbone.layers:
        dt = F.softplus(layer.mixer.dt_proj.bias.detach())
        assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
        assert torch.equal(layer.mixer.D, torch.ones_like(layer.mixer.D))
    # a_scale divides A; difference_conv makes a run of identical inputs write nothing into the state
    lm = build_testbed(TINY, tokenizer).lm
    init_mamba_(lm, 0, a_scale=8.0, difference_conv=True)
    for layer in lm.backbone.layers:
        A = -torch.exp(layer.mixer.A_log)
        assert torch.allclose(A[0], -torch.arange(1, A.shape[1] + 1) / 8.0)
        assert torch.equal(layer.mixer.conv1d.bias, torch.zeros_like(layer.mixer.conv1d.bias))
    u = torch.randn(1, 1, TINY.d_model).expand(1, 12, -1)                # one token repeated 12 times
    mixer = lm.backbone.layers[0].mixer
    with torch.no_grad():
        x, z = mixer.in_proj(u).chunk(2, dim=-1)
        conv = mixer.conv1d(x.transpose(1, 2))[..., :12]
    assert conv[..., 4:].abs().max() < 0.25 * conv[..., :1].abs().max()   # 10% noise left of the filter


def test_zero_out_proj_init_makes_every_layer_the_identity(tokenizer):
    lm = build_testbed(TINY, tokenizer).lm
    init_mamba_(lm, 0, out_proj_scale=0.0)
    assert all(float(layer.mixer.out_proj.weight.detach().abs().max()) == 0 for layer in lm.backbone.layers)
    ids = torch.tensor([[5, 9, 17, 3, 11]])
    with torch.no_grad():
        logits = lm(ids, return_all_logits=True).logits
        expected = lm.lm_head(lm.backbone.norm_f(lm.backbone.embedding(ids)))
    torch.testing.assert_close(logits, expected)
    init_mamba_(lm, 0, out_proj_scale=0.5)                          # a scale multiplies the 1/sqrt(L) init
    half = lm.backbone.layers[0].mixer.out_proj.weight.clone()
    init_mamba_(lm, 0)
    torch.testing.assert_close(half, 0.5 * lm.backbone.layers[0].mixer.out_proj.weight)


def test_grow_mamba_keeps_the_function_and_adds_identity_layers(tokenizer):
    small = build_testbed(TINY, tokenizer).lm
    init_mamba_(small, 0)
    big = grow_mamba(small, small.config.n_layer + 3, seed=5)
    assert big.config.n_layer == small.config.n_layer + 3
    assert all(float(layer.mixer.out_proj.weight.detach().abs().max()) == 0
               for layer in big.backbone.layers[small.config.n_layer:])
    ids = torch.tensor([[5, 9, 17, 3, 11, 2, 8]])
    with torch.no_grad():
        torch.testing.assert_close(big(ids, return_all_logits=True).logits,
                                   small(ids, return_all_logits=True).logits)
    # the new layers are trainable: their out_proj gets a gradient although it starts at zero
    big(ids, return_all_logits=True).logits.square().sum().backward()
    assert float(big.backbone.layers[-1].mixer.out_proj.weight.grad.abs().max()) > 0
    with pytest.raises(ValueError, match="below"):
        grow_mamba(big, 1)


def test_grow_mamba_spread_puts_the_trained_layers_at_the_given_depths(tokenizer):
    small = build_testbed(TINY, tokenizer).lm
    init_mamba_(small, 0)
    assert spread_positions(2, 16) == [0, 8] and spread_positions(4, 16) == [0, 4, 8, 12]
    big = grow_mamba(small, 5, seed=5, positions=[1, 3])
    for i in range(5):
        if i in (1, 3):
            trained = small.backbone.layers[(1, 3).index(i)].state_dict()
            assert all(torch.equal(v, trained[k]) for k, v in big.backbone.layers[i].state_dict().items())
        else:
            assert float(big.backbone.layers[i].mixer.out_proj.weight.detach().abs().max()) == 0
    ids = torch.tensor([[5, 9, 17, 3, 11, 2, 8]])
    with torch.no_grad():
        torch.testing.assert_close(big(ids, return_all_logits=True).logits,
                                   small(ids, return_all_logits=True).logits)
    for bad in ([3, 1], [0, 5], [2, 2], [0]):
        with pytest.raises(ValueError, match="increasing layer indices"):
            grow_mamba(small, 5, positions=bad)
    assert rename_layer("lm.backbone.layers.1.mixer.D", {0: 0, 1: 8}) == "lm.backbone.layers.8.mixer.D"
    assert rename_layer("projector.fc1.weight", {1: 8}) == "projector.fc1.weight"


def test_embedding_std_sets_the_scale_of_the_tied_embeddings(tokenizer):
    lm = build_testbed(TINY, tokenizer).lm
    for std in (0.02, 1.0):
        init_mamba_(lm, 0, embedding_std=std)
        w = lm.backbone.embedding.weight
        assert abs(float(w.detach().std()) - std) < 0.1 * std
        assert lm.lm_head.weight is w                                   # still tied


def test_turn_encoder_labels_only_the_answers(tokenizer):
    enc = TurnEncoder(tokenizer)
    turns = [("What color is the triangle?", "red"), ("What does the sign say?", "K7M")]
    ids, labels = enc.encode(turns)
    assert len(ids) == len(labels)
    assert tokenizer.decode(ids) == "".join(prompt(q) + a + "<|endoftext|>" for q, a in turns)
    scored = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert scored == [i for i, l in zip(ids, labels) if l == i]
    assert tokenizer.decode(scored) == "red<|endoftext|>K7M<|endoftext|>"
    batch_ids, batch_labels = enc.batch([turns, turns[:1]])
    assert batch_ids.shape == batch_labels.shape and batch_ids.shape[1] == len(ids)
    assert (batch_labels[1, len(enc.encode(turns[:1])[0]):] == IGNORE).all()


def test_answer_loss_equals_teacher_forced_cross_entropy(tiny_model, tokenizer, synth_small):
    """One turn: the loss equals -log p(answer tokens, EOS | [visual][prompt]) computed through prepare()."""
    image = synth_small / "images" / "3000001.png"
    question, answer = "What does the sign say?", "K7M"
    enc = TurnEncoder(tokenizer)
    ids, labels = enc.batch([[(question, answer)]])
    pixels = tiny_model.vision.preprocess(image)
    with torch.no_grad():
        loss = answer_loss(tiny_model, tiny_model.embed_visual(pixels), ids, labels)
        prepared = tiny_model.prepare(image, question)
        reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [enc.eos]
        embeds = torch.cat([prepared.inputs_embeds,
                            tiny_model.lm.backbone.embedding(torch.tensor([reply[:-1]]))], dim=1)
        logits = tiny_model.lm(inputs_embeds=embeds, return_all_logits=True).logits[0]
        vocab = tiny_model.lm.config.vocab_size
        logp = torch.log_softmax(logits[-len(reply):, :vocab].float(), -1)
        expected = -logp[torch.arange(len(reply)), torch.tensor(reply)].mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def test_answer_start_positions_point_at_each_prompts_last_token(tokenizer):
    labels = torch.tensor([[IGNORE, IGNORE, 7, 0, IGNORE, 9, 0],
                           [IGNORE, 5, 0, IGNORE, IGNORE, IGNORE, IGNORE]])
    rows, pos = answer_start_positions(labels, n_visual=10)
    assert rows.tolist() == [0, 0, 1] and pos.tolist() == [11, 14, 10]
    enc = TurnEncoder(tokenizer)
    turns = [("What color is the triangle?", "red"), ("What does the sign say?", "K7M")]
    ids, labels = enc.batch([turns])
    rows, pos = answer_start_positions(labels, n_visual=3)
    first_answer_tokens = [enc.ids(a)[0] for _, a in turns]
    assert ids[0, pos - 3 + 1].tolist() == first_answer_tokens           # the next token opens the answer
    assert [tokenizer.decode(i) for i in ids[0, pos - 3]] == ["\n", "\n"]   # each prompt's closing newline


def test_answer_loss_taps_the_stream_after_a_layer(tiny_model, tokenizer, synth_small):
    enc = TurnEncoder(tokenizer)
    ids, labels = enc.batch([[("What does the sign say?", "K7M")]])
    with torch.no_grad():
        visual = tiny_model.embed_visual(tiny_model.vision.preprocess(synth_small / "images" / "3000001.png"))
        loss, states = answer_loss(tiny_model, visual, ids, labels, state_layer=1)
        assert torch.equal(loss, answer_loss(tiny_model, visual, ids, labels))
        embeds = torch.cat([visual, tiny_model.lm.backbone.embedding(ids)], dim=1)
        hidden, residual = embeds, None
        for block in tiny_model.lm.backbone.layers[:2]:
            hidden, residual, _ = block(hidden, residual)
        expected = F.layer_norm(hidden + residual, (hidden.shape[-1],))
    assert states.shape == (1, visual.shape[1] + ids.shape[1], tiny_model.lm.config.d_model)
    assert torch.allclose(states, expected, atol=1e-5)
    with torch.no_grad():
        _, first = answer_loss(tiny_model, visual, ids, labels, state_layer=0)
        _, both = answer_loss(tiny_model, visual, ids, labels, state_layer=(1, 0))
        _, same = answer_loss(tiny_model, visual, ids, labels, state_layer=(1, 1))
    assert len(both) == 2 and torch.equal(both[0], states) and torch.equal(both[1], first)
    assert not torch.allclose(first, states)
    assert torch.equal(same[0], states) and torch.equal(same[1], states)


def test_referent_tap_follows_its_layer_through_the_growth():
    s = TrainSettings(data="", out="", memory_layer=11, model=replace(TINY, n_layer=16))
    assert referent_tap(s, 16) == 11 and referent_tap(s, 2) == 1          # default: memory_layer's
    s = replace(s, referent_layer=1)
    assert referent_tap(s, 16) == 1                                       # no growth: that layer
    s = replace(s, grow_from=2)
    assert referent_tap(s, 2) == 1 and referent_tap(s, 16) == 1           # grown on top: it stays
    s = replace(s, grow_spread=True)
    assert referent_tap(s, 2) == 1 and referent_tap(s, 16) == 8           # spread: 2 -> 16 puts layer 1 at 8
    assert referent_tap(replace(s, referent_layer=0), 16) == 0
    assert referent_tap(replace(s, referent_layer=-1), 16) == 8           # negative: from the top


def test_referent_targets_and_their_loss(synth_small):
    from mambaprune.data.synthvqa import load_scenes, question_referents
    scene = load_scenes(synth_small, "train")[0]
    caption = scene["questions"]["spatial"]["caption"]
    subj, obj = question_referents(scene, "spatial", caption)
    assert referent_targets(scene, caption).tolist() == [subj["row"], subj["col"], obj["row"], obj["col"]]
    asked = VSR_PROMPT.format(caption=caption)                       # as the VSR reader gives it
    assert referent_targets(scene, asked).tolist() == [subj["row"], subj["col"], obj["row"], obj["col"]]
    attr = scene["questions"]["attr"]["question"]
    named = question_referents(scene, "attr", attr)
    t = referent_targets(scene, attr).tolist()
    assert t[:2] == [named[0]["row"], named[0]["col"]] and (t[2:] == [IGNORE] * 2) == (len(named) == 1)
    for family in ("exist", "count", "read"):
        q = scene["questions"][family]["question"]
        assert referent_targets(scene, q).tolist() == [IGNORE] * 4
    # the loss: cross-entropy over the 4 grid classes of every named row / column, the rest ignored
    head = MemoryHead(8)
    states = torch.randn(3, 8)
    targets = torch.tensor([[1, 2, 3, 0], [0, 3, IGNORE, IGNORE], [IGNORE] * 4])
    logits = head.referent(states).reshape(3, 4, -1)
    picked = [logits[0, 0, 1], logits[0, 1, 2], logits[0, 2, 3], logits[0, 3, 0], logits[1, 0, 0], logits[1, 1, 3]]
    lse = [logits[0, k].logsumexp(0) for k in range(4)] + [logits[1, k].logsumexp(0) for k in range(2)]
    expected = sum(l - p for l, p in zip(lse, picked)) / 6
    assert torch.allclose(head.referent_loss(states, targets), expected, atol=1e-6)
    assert head.referent_loss(states[2:], targets[2:]).item() == 0.0


def test_the_ordinal_names_read_out_by_hand():
    from mambaprune.train_testbed import ordinal_cells
    assert ordinal_cells(torch.tensor([0, 1, 2, 3])).tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    head = MemoryHead(8)
    states, cells = torch.randn(3, 8), torch.tensor([[0, 3], [2, 1], [3, 3]])
    pred = states @ head.ordinal.weight.T + head.ordinal.bias
    target = torch.tensor([[-1, 1], [1 / 3, -1 / 3], [1, 1]])
    assert torch.allclose(head.named_loss(states, cells, "ordinal"), ((pred - target) ** 2).mean(), atol=1e-6)
    # the class code is the 4-way cross-entropy of the first slot, as before
    assert torch.allclose(head.named_loss(states, cells),
                          F.cross_entropy(head.named_logits(states).reshape(-1, 4), cells.reshape(-1)))
    with pytest.raises(ValueError, match="code"):
        head.named_loss(states, cells, "onehot")


@pytest.mark.parametrize("at,code", [("answer", "class"), ("names", "class"), ("names", "ordinal")])
@pytest.mark.parametrize("layer", [None, 0])
def test_training_with_the_referent_read_out_runs(synth_small, tmp_path, at, code, layer):
    s = TrainSettings(data=str(synth_small), out=str(tmp_path), steps=2, batch_size=2, warmup=1, eval_every=10,
                      eval_per_family=1, test_per_family=1, referent_weight=1.0, referent_at=at, model=TINY,
                      referent_layer=layer, referent_code=code)
    rows = []
    train(s, log=lambda m: rows.append(m))
    logged = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and math.isfinite(logged[-1]["memory_loss"]) and logged[-1]["memory_loss"] > 0


def test_name_positions_point_at_the_last_token_of_each_name(synth_small):
    from mambaprune.data.synthvqa import load_scenes
    from mambaprune.train_testbed import TurnEncoder
    tok = build_tokenizer(["The red circle is left of the small blue square. What color is the star?"] * 4,
                          vocab_size=300)
    enc = TurnEncoder(tok)
    scene = {"objects": [
        {"row": 0, "col": 0, "color": "red", "shape": "circle", "size": "large"},
        {"row": 2, "col": 3, "color": "blue", "shape": "square", "size": "small"},
        {"row": 1, "col": 3, "color": "blue", "shape": "square", "size": "large"},
        {"row": 3, "col": 1, "color": "green", "shape": "star", "size": "small"}]}
    turns = [("How many circles are there?", "1"), ("The red circle is left of the small blue square.", "true"),
             ("What color is the star?", "green")]
    ids, _ = enc.encode(turns)
    found = enc.name_positions(scene, turns)
    assert [(r, c) for _, r, c in found] == [(0, 0), (2, 3), (3, 1)]
    for (j, _, _), name in zip(found, ["red circle", "small blue square", "star"]):
        assert tok.decode(ids[:j + 1]).endswith(name) and not tok.decode(ids[:j]).endswith(name)
    for scene in load_scenes(synth_small, "train"):          # every template's names are found
        for family in ("spatial", "attr"):
            q = scene["questions"][family]
            assert enc.name_positions(scene, [(q.get("caption") or q["question"], "x")])
    # and in the questions training asks, as the readers give them (VSR's caption inside its prompt)
    scenes = {sc["image_id"]: sc for sc in load_scenes(synth_small, "train")}
    n_named = Counter()
    for image, turns in conversations(synth_small, "train"):
        scene = scenes[int(Path(image).stem)]
        for q, a in turns:
            found = enc.name_positions(scene, [(q, a)])
            n_named[q.startswith("Is this statement")] += len(found)
            if q.startswith("Is this statement"):
                assert len(found) == 2 and referent_targets(scene, q).ne(IGNORE).all()
                ids, _ = enc.encode([(q, a)])
                caption = scene["questions"]["spatial"]
                assert tok.decode(ids[:found[0][0] + 1]).endswith(caption["subj"])
                assert tok.decode(ids[:found[1][0] + 1]).endswith(caption["obj"])
    assert n_named[True] == 2 * len(scenes) and n_named[False] > 0


def _asked(synth_small, tmp_path, monkeypatch, **settings) -> list:
    """The conversations (one list of turns per image) that a 2-step training run with ``settings`` asks."""
    import mambaprune.train_testbed as tt
    seen = []
    batch = tt.TurnEncoder.batch
    monkeypatch.setattr(tt.TurnEncoder, "batch", lambda self, turns: seen.append(turns) or batch(self, turns))
    s = TrainSettings(data=str(synth_small), out=str(tmp_path), steps=2, batch_size=2, warmup=1, eval_every=10,
                      eval_per_family=1, test_per_family=1, model=TINY, **settings)
    train(s, log=lambda m: None)
    return seen


def test_training_asks_the_recall_questions_it_is_told_to(synth_small, tmp_path, monkeypatch):
    seen = _asked(synth_small, tmp_path, monkeypatch, extra_per_family=0, recall_per_image=3)
    assert len(seen) == 2
    single = re.compile(r"What (color|shape|size) is the (?!object directly)[a-z ]+\?")
    for turns in seen:                 # each image: its five benchmark questions and up to three recall ones
        for conv in turns:
            extra = len(conv) - len(FAMILIES)
            assert 1 <= extra <= 3
            assert sum(bool(single.fullmatch(q)) for q, _ in conv) >= extra   # (+ its own attr one, maybe)


def test_row_flip_scans_the_patch_rows_bottom_first(synth_small, tmp_path, monkeypatch):
    """``row_flip=1``: the first step's language model reads the same projected tokens as without it, its patch
    rows in reverse order (each row still left to right); the scan-memory losses skip flipped images, and a
    batch of flipped images only still trains (finite loss)."""
    import mambaprune.train_testbed as tt
    read = []
    loss_fn = tt.answer_loss

    def recording(model, visual, *a, **k):
        read.append(visual.detach().clone())
        return loss_fn(model, visual, *a, **k)

    monkeypatch.setattr(tt, "answer_loss", recording)
    logged = {}
    for flip in (0.0, 1.0):
        read.clear()
        rows = []
        s = TrainSettings(data=str(synth_small), out=str(tmp_path / str(flip)), steps=1, batch_size=2, warmup=1,
                          eval_every=10, eval_per_family=1, test_per_family=1, model=TINY, row_flip=flip,
                          memory_weight=1.0, turn_memory_weight=1.0)
        train(s, log=lambda m: rows.append(m))
        logged[flip] = read[0]                       # the first training step's batch of two images
        (row,) = [json.loads(m) for m in rows if m.startswith('{"step": 1,')]
        assert math.isfinite(row["loss"])
        # both scan-memory losses read unflipped images only: none are left when every image is flipped
        assert (row["memory_loss"] == 0) == (flip == 1.0)
    g = TINY.image_size // TINY.patch_size
    order = [r * g + c for r in reversed(range(g)) for c in range(g)]
    assert torch.equal(logged[1.0], logged[0.0][:, order])
    assert not torch.equal(logged[1.0], logged[0.0])
    with pytest.raises(ValueError, match="probability"):
        train(replace(s, row_flip=1.5), log=lambda m: None)


def test_extra_captions_are_asked_as_the_vsr_reader_asks_them(synth_small, tmp_path, monkeypatch):
    import mambaprune.train_testbed as tt
    seen = _asked(synth_small, tmp_path, monkeypatch, extra_per_family=2)
    questions = [q for turns in seen for conv in turns for q, _ in conv]
    captions = [q for q in questions if tt.named_question(q)[0] == "spatial"]
    assert len(captions) > sum(len(turns) for turns in seen)   # each image's own caption, and extra ones
    assert all(q.startswith(VSR_PROMPT.format(caption="")) for q in captions)


def test_visual_penalties_by_hand():
    v = torch.tensor([[[3.0, 4.0], [0.0, 0.0]],        # image 0: tokens of RMS sqrt(12.5) and 0
                      [[1.0, 0.0], [0.0, 2.0]]])       # image 1: tokens of RMS sqrt(0.5) and sqrt(2)
    per_token = ((12.5 ** 0.5 - 1) ** 2 + 1 + (0.5 ** 0.5 - 1) ** 2 + (2 ** 0.5 - 1) ** 2) / 4
    assert torch.isclose(visual_rms_penalty(v), torch.tensor(per_token))


def test_learning_rate_schedule():
    s = TrainSettings(data="", out="", steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0)
    assert lr_at(60, s) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, s) == pytest.approx(0.1) and lr_at(500, s) == pytest.approx(0.1)
    # stage 1's schedule: the same shape with its own peak and length
    assert lr_at(0, s, peak=2.0, total=30) == pytest.approx(0.2) and lr_at(20, s, peak=2.0, total=30) == \
        pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lr_at(30, s, peak=2.0, total=30) == pytest.approx(0.2)


def test_patch_targets_by_hand():
    # 224 px scene on a 160 px tower with 16 px patches: (100, 60) -> (71.4, 42.9) -> patch row 2, col 4 = 24
    scene = {"objects": [{"shape": "triangle", "color": "blue", "size": "large", "center": [100, 60]}],
             "code": "AB", "sign": {"text_origin": [10, 150], "scale": 2}}
    t = patch_targets(scene, 224, 160, 16)
    assert t["color"][24] > 0 and t["shape"][24] == AUX_SHAPES.index("triangle")
    assert t["category"][24] == t["color"][24] * len(AUX_SHAPES) + t["shape"][24]
    assert t["size"][24] == 2                                      # ("none", "small", "large")
    assert (t["category"] > 0).sum() == 1 and (t["size"] > 0).sum() == 1
    assert t["chars"].sum() == 2 and t["chars"][:, 0].sum() == 1 and t["chars"][:, 1].sum() == 1
    # glyph centres x = 10 + 2 * (2.5, 8.5) -> 15, 27 px, y = 150 + 2 * 3.5 = 157 px (glyphs 5 x 7, one apart):
    # at 160 / 224 both fall in patch row 7, col 0 and col 1 -> patches 70 and 71, "A" (index 0) then "B"
    assert t["char_order"][70].tolist() == [1, 0, 0] and t["char_order"][71].tolist() == [2, 0, 0]
    assert (t["row"][[24, 70, 71]].tolist(), t["col"][[24, 70, 71]].tolist()) == ([3, 8, 8], [5, 1, 2])
    assert int((t["row"] > 0).sum()) == 3 and int((t["col"] > 0).sum()) == 3


def test_patch_targets_keep_the_reading_order_of_characters_sharing_a_patch():
    # both glyph centres (x = 2 + 2 * (2.5, 8.5) = 7, 19 px -> 5, 13.6 px at 160) fall in patch 0
    scene = {"objects": [], "code": "ZA", "sign": {"text_origin": [2, 2], "scale": 2}}
    t = patch_targets(scene, 224, 160, 16)
    assert t["char_order"][0].tolist() == [CODE_ALPHABET.index("Z") + 1, CODE_ALPHABET.index("A") + 1, 0]
    assert (t["char_order"][1:] == 0).all() and t["chars"][0].sum() == 2


def test_balanced_character_loss_weighs_the_filled_slots_as_much_as_the_empty_ones():
    scene = {"objects": [], "code": "ZA", "sign": {"text_origin": [2, 2], "scale": 2}}
    targets = stack_targets([patch_targets(scene, 224, 160, 16)], "cpu")
    torch.manual_seed(0)
    features = torch.randn(1, 100, 8)
    plain, balanced = AuxHead(8, 10), AuxHead(8, 10, balance_chars=True)
    balanced.load_state_dict(plain.state_dict())
    sizes = plain.sizes
    order = plain.proj(F.layer_norm(features, (8,))).split(sizes, dim=-1)[5].reshape(300, -1)
    slots = targets["char_order"].flatten()
    per_slot = F.cross_entropy(order, slots, reduction="none")
    filled = slots > 0                                      # 2 of the 300 slots hold a character
    assert int(filled.sum()) == 2
    # the two losses differ only in the character-order term: mean over all slots x 3, against
    # mean over the filled slots x 3 + mean over the empty ones
    expected = per_slot[filled].mean() * 3 + per_slot[~filled].mean() - per_slot.mean() * 3
    assert torch.allclose(balanced.loss(features, targets) - plain.loss(features, targets), expected, atol=1e-5)


def test_stage_one_lowers_the_patch_loss_and_cached_features_equal_the_tower(synth_small):
    torch.manual_seed(0)
    model = build_testbed(TINY, build_tokenizer(CORPUS, vocab_size=TINY.vocab_size))
    tower, aux = model.vision, AuxHead(model.vision.dim, model.vision.image_size // model.vision.patch_size)
    scenes_file = json.loads((synth_small / "scenes" / "train.json").read_text())
    scenes = {sc["image_id"]: sc for sc in scenes_file["scenes"]}
    paths = [p for p, _ in conversations(synth_small, "train")]
    def targets_of(p):
        return patch_targets(scenes[int(Path(p).stem)], scenes_file["image_size"], tower.image_size,
                             tower.patch_size)
    def patch_loss():
        t = [targets_of(p) for p in paths]
        with torch.no_grad():
            return aux.loss(tower(tower.preprocess(paths)), stack_targets(t, "cpu"))
    before = patch_loss()
    s = TrainSettings(data="", out="", tower_steps=30, tower_batch_size=6, warmup=1, tower_lr=1e-2)
    pretrain_tower(tower, aux, paths, targets_of, s, log=lambda m: None)
    assert patch_loss() < 0.5 * before
    tower.train()
    cached = tower_features(tower, paths, batch_size=4)
    assert tower.training                                         # the mode is given back
    with torch.no_grad():
        direct = tower.eval()(tower.preprocess(paths))
    assert cached.dtype == torch.float16 and cached.shape == direct.shape
    torch.testing.assert_close(cached.float(), direct, atol=1e-2, rtol=1e-2)


def test_standardised_tower_centres_each_position_and_scales_each_channel(synth_small):
    torch.manual_seed(0)
    tower = build_testbed(TINY, build_tokenizer(CORPUS, vocab_size=TINY.vocab_size)).vision
    paths = [p for p, _ in conversations(synth_small, "train")]
    with torch.no_grad():
        raw = tower.eval()(tower.preprocess(paths))                 # fp32 (tower_features gives fp16)
    returned = standardize_tower(tower, raw)
    after = tower_features(tower, paths).float()                   # the tower now applies it itself
    torch.testing.assert_close(after, returned.float(), atol=2e-2, rtol=1e-2)
    expected = (raw.float() - raw.float().mean(0, keepdim=True))
    expected = expected / expected.std(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(after, expected, atol=2e-2, rtol=1e-2)
    assert after.mean(0).abs().max() < 1e-2                       # nothing shared by all images is left
    torch.testing.assert_close(after.std(dim=(0, 1)), torch.ones(after.shape[-1]), atol=1e-2, rtol=0)


def test_command_line_sets_the_language_model_shape():
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    s = settings_from_args(p.parse_args(["--data", "d", "--out", "o", "--d-model", "64", "--expand", "1",
                                         "--d-state", "8", "--tower-steps", "5", "--freeze-tower",
                                         "--balance-chars", "--referent-weight", "0.5"]))
    assert (s.model.d_model, s.model.expand, s.model.d_state, s.model.n_layer) == (64, 1, 8, Config().n_layer)
    assert s.tower_steps == 5 and s.freeze_tower and s.model.image_size == Config().image_size
    assert s.balance_chars and s.referent_weight == 0.5
    default = settings_from_args(p.parse_args(["--data", "d", "--out", "o"]))
    assert not default.balance_chars and default.referent_weight == 0.0


def test_training_runs_resumes_and_writes_a_loadable_testbed(synth_small, tmp_path):
    convs = conversations(synth_small, "train")
    assert len(convs) == 6 and all(len(t) == len(FAMILIES) for _, t in convs)
    s = TrainSettings(data=str(synth_small), out=str(tmp_path), steps=2, batch_size=2, warmup=1, eval_every=10,
                      eval_per_family=2, test_per_family=2, model=TINY)
    info = train(s, log=lambda m: None)
    assert info["steps_done"] == 2 and set(info["test_accuracy"]) == set(FAMILIES)
    rows = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and set(rows[0]["val"]) == set(FAMILIES)
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "last.pt").is_file()
    first = load_testbed(tmp_path)
    # resuming with a larger step budget continues from step 2, with the saved tokenizer
    train(TrainSettings(**{**s.__dict__, "steps": 4}), log=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    second = load_testbed(tmp_path)
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert not torch.equal(first.lm.backbone.embedding.weight, second.lm.backbone.embedding.weight)


def test_visual_aux_reads_the_projected_tokens_and_resumes(synth_small, tmp_path):
    """--visual-aux-weight: the per-patch read-out of the projected tokens trains the projector (the tower is
    frozen), is logged, is saved with the checkpoint, and a resumed run continues with it."""
    s = TrainSettings(data=str(synth_small), out=str(tmp_path), steps=2, batch_size=2, warmup=1, eval_every=2,
                      eval_per_family=1, test_per_family=1, freeze_tower=True, extra_per_family=0,
                      visual_aux_weight=0.5, model=TINY)
    train(s, log=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1]["visual_aux_loss"]) and rows[-1]["visual_aux_loss"] > 0
    saved = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    head = AuxHead(TINY.d_model, TINY.image_size // TINY.patch_size)
    assert saved["visual_aux"].keys() == head.state_dict().keys()
    train(TrainSettings(**{**s.__dict__, "steps": 4}), log=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val" in r] == [2, 4] and "visual_aux_loss" in rows[-1]
    without = TrainSettings(**{**s.__dict__, "out": str(tmp_path / "plain"), "visual_aux_weight": 0.0})
    train(without, log=lambda m: None)
    assert "visual_aux" not in torch.load(tmp_path / "plain" / "last.pt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("spread", [False, True])
def test_grown_training_deepens_at_its_step_and_resumes_across_the_growth(synth_small, tmp_path, spread):
    """grow_from=2 on a 4-layer LM (spread: the trained layers go to 0 and 2), growth at step 2 of 4. A run
    stopped right after the step-2 checkpoint (still shallow) and started again ends with exactly the weights of
    an uninterrupted run."""
    deep = Config(**{**TINY.__dict__, "n_layer": 4})
    s = TrainSettings(data=str(synth_small), out=str(tmp_path / "whole"), steps=4, batch_size=2, warmup=1,
                      eval_every=2, eval_per_family=1, test_per_family=1, grow_from=2, grow_at=0.5, model=deep,
                      grow_spread=spread)
    assert grow_step(s) == 2
    train(s, log=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["n_layer"]) for r in rows] == [(2, 2), (4, 4)]
    whole = load_testbed(tmp_path / "whole")
    assert whole.lm.config.n_layer == 4

    class Stop(Exception):
        pass

    def stop_at_two(message):
        if message.startswith("{") and json.loads(message)["step"] == 2:
            raise Stop

    cut = TrainSettings(**{**s.__dict__, "out": str(tmp_path / "cut")})
    with pytest.raises(Stop):
        train(cut, log=stop_at_two)
    # a row written after the checkpoint (a run stopped between checkpoints) is dropped when the step is redone
    with open(tmp_path / "cut" / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "n_layer": 4}) + "\n")
    train(cut, log=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["n_layer"]) for r in rows] == [(2, 2), (4, 4)]
    resumed = load_testbed(tmp_path / "cut")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="grow_from 4"):
        train(TrainSettings(**{**s.__dict__, "grow_from": 4}))


def test_stop_at_ends_a_piece_that_the_next_piece_resumes(synth_small, tmp_path):
    """A run made of pieces (``stop_at``, as ``scripts/make_testbed.sh`` makes the shipped testbed): stopped at
    step 3 (not a checkpoint step of eval_every=2: the checkpoint is written there anyway, with no test split and
    no testbed), a piece asking to stop at an earlier step does nothing, and the last piece ends with exactly the
    weights of an uninterrupted run."""
    deep = Config(**{**TINY.__dict__, "n_layer": 4})
    s = TrainSettings(data=str(synth_small), out=str(tmp_path / "whole"), steps=4, batch_size=2, warmup=1,
                      eval_every=2, eval_per_family=1, test_per_family=1, grow_from=2, grow_at=0.5, model=deep,
                      grow_spread=True)
    train(s, log=lambda m: None)
    pieces = tmp_path / "pieces"
    first = TrainSettings(**{**s.__dict__, "out": str(pieces), "stop_at": 3})
    assert train(first, log=lambda m: None) == {"steps_done": 3, "stopped": True}
    assert torch.load(pieces / "last.pt", weights_only=False)["step"] == 3
    assert not (pieces / "model.safetensors").exists()
    said = []
    assert train(TrainSettings(**{**first.__dict__, "stop_at": 2}), log=said.append)["steps_done"] == 3
    assert any("nothing to do" in m for m in said)
    assert torch.load(pieces / "last.pt", weights_only=False)["step"] == 3
    info = train(TrainSettings(**{**s.__dict__, "out": str(pieces)}), log=lambda m: None)
    assert info["steps_done"] == 4 and set(info["test_accuracy"]) == set(FAMILIES)
    rows = [json.loads(l) for l in (pieces / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["n_layer"], "val" in r) for r in rows] == [(2, 2, True), (3, 4, True), (4, 4, True)]
    whole, resumed = load_testbed(tmp_path / "whole"), load_testbed(pieces)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_make_testbed_script_ends_with_the_shipped_settings(tmp_path):
    """scripts/make_testbed.sh, run with a stand-in for the ``mambaprune`` command that records its arguments:
    every piece parses, the pieces stop at increasing steps, the model grows once (at step 12000, the shipped
    log's growth), and the last piece has exactly the settings the shipped config.json records."""
    import argparse
    import dataclasses
    import os
    import subprocess

    from mambaprune.train_testbed import A_INIT_SCALE, DT_MAX, DT_MIN

    root = Path(__file__).resolve().parents[1]
    record = tmp_path / "calls.jsonl"
    fake = tmp_path / "fake_mambaprune"
    fake.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                    f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    synth = tmp_path / "synth"
    synth.mkdir()
    (synth / "manifest.json").write_text("{}")                  # present: the script writes no SynthVQA
    subprocess.run(["bash", str(root / "scripts" / "make_testbed.sh"), str(synth), str(tmp_path / "out"),
                    "--shipped-tower"], check=True, env={**os.environ, "MAMBAPRUNE": str(fake)})
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls and all(c[0] == "train-testbed" for c in calls)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    pieces = [settings_from_args(parser.parse_args(c[1:])) for c in calls]
    stops = [p.stop_at for p in pieces]
    assert stops[-1] is None and stops[:-1] == sorted(set(stops[:-1]))
    starts = [0] + stops[:-1]                                   # each piece resumes where the last stopped
    grows = [grow_step(p) for p, start in zip(pieces, starts) if start <= grow_step(p) < (p.stop_at or p.steps)]
    assert grows == [12000]
    log = [json.loads(line) for line in (TESTBED_DIR / "train_log.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in log if r["n_layer"] == 16) == 12010
    _, info = read_testbed_config(TESTBED_DIR)
    last = dataclasses.asdict(pieces[-1])
    for key in ("data", "out", "model", "stop_at"):
        last.pop(key)
    # options removed since (commit 9bd38ae has them): the values the code now fixes are the shipped ones
    fixed = {"a_init_scale": A_INIT_SCALE, "dt_min": DT_MIN, "dt_max": DT_MAX, "out_proj_init": 1.0,
             "where_per_image": 0, "token_curriculum": 0.0, "visual_shared_weight": 0.0, "visual_rms_global": False}
    shipped = dict(info["settings"])
    assert {k: shipped.pop(k) for k in fixed} == fixed
    shipped.pop("max_minutes")                                  # a time budget: it did not end the run
    shipped.pop("curriculum_tokens")                            # read only with token_curriculum > 0
    shipped["tower_from"] = str(root / shipped["tower_from"])
    assert last == shipped
    assert info["steps_done"] == pieces[-1].steps


def test_phase_lr_restarts_the_schedule_at_the_growth_step():
    s = TrainSettings(data="", out="", steps=100, warmup=10, lr=1.0, min_lr_ratio=0.0, grow_from=2, grow_at=0.4)
    assert [phase_lr(i, s) for i in (0, 9)] == [0.1, 1.0]
    assert phase_lr(39, s) == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))
    assert [phase_lr(i, s) for i in (40, 49)] == [0.1, 1.0]          # a second warm-up from step 40
    assert phase_lr(99, s) == pytest.approx(0.5 * (1 + math.cos(math.pi * 49 / 50)))
    low = TrainSettings(**{**s.__dict__, "grow_lr_scale": 0.25})   # the deep phase peaks at a quarter
    assert [phase_lr(i, low) for i in (9, 39)] == [phase_lr(i, s) for i in (9, 39)]
    assert [phase_lr(i, low) for i in (40, 49, 99)] == pytest.approx([0.25 * phase_lr(i, s) for i in (40, 49, 99)])
    plain = TrainSettings(data="", out="", steps=100, warmup=10, lr=1.0)
    assert grow_step(plain) is None and phase_lr(55, plain) == lr_at(55, plain)


def test_two_stage_training_keeps_the_stage_one_tower(synth_small, tmp_path, monkeypatch):
    import mambaprune.train_testbed as tt
    after_stage_one = {}

    def recording(tower, *args, **kwargs):
        tt_pretrain(tower, *args, **kwargs)
        after_stage_one.update({k: v.clone() for k, v in tower.state_dict().items()})

    tt_pretrain = tt.pretrain_tower
    monkeypatch.setattr(tt, "pretrain_tower", recording)
    s = TrainSettings(data=str(synth_small), out=str(tmp_path), steps=2, batch_size=2, warmup=1, eval_every=10,
                      eval_per_family=2, test_per_family=2, tower_steps=3, tower_batch_size=2, freeze_tower=True,
                      model=TINY)
    train(s, log=lambda m: None)
    shipped = load_testbed(tmp_path)
    assert after_stage_one and all(torch.equal(after_stage_one[k], v) for k, v in shipped.vision.state_dict().items())
    torch.manual_seed(0)
    fresh = build_testbed(TINY, shipped.tokenizer).vision.state_dict()
    assert not all(torch.equal(fresh[k], v) for k, v in after_stage_one.items())      # stage 1 trained it


@pytest.mark.parametrize("source", ["folder", "last.pt"])
def test_tower_from_skips_stage_one_and_takes_that_tower(synth_small, tmp_path, monkeypatch, source):
    import mambaprune.train_testbed as tt
    first = TrainSettings(data=str(synth_small), out=str(tmp_path / "a"), steps=2, batch_size=2, warmup=1,
                          eval_every=1, eval_per_family=1, test_per_family=1, tower_steps=3, tower_batch_size=2,
                          freeze_tower=True, standardize=True, model=TINY)
    train(first, log=lambda m: None)
    donor = load_testbed(tmp_path / "a").vision.state_dict()
    assert donor["feature_scale"].ne(1).any()                      # standardised, so the buffers must travel

    def no_stage_one(*args, **kwargs):
        raise AssertionError("stage 1 ran")

    monkeypatch.setattr(tt, "pretrain_tower", no_stage_one)
    given = tmp_path / "a" if source == "folder" else tmp_path / "a" / "last.pt"
    logs = []
    train(replace(first, out=str(tmp_path / "b"), tower_from=str(given)), log=logs.append)
    taken = load_testbed(tmp_path / "b").vision.state_dict()
    assert taken.keys() == donor.keys() and all(torch.equal(taken[k], donor[k]) for k in donor)
    assert any("stage 1 skipped" in m for m in logs)
    with pytest.raises(FileNotFoundError, match="no testbed weights or last.pt"):
        train(replace(first, out=str(tmp_path / "c"), tower_from=str(tmp_path / "nowhere")), log=lambda m: None)



# ------------------------------------------------------------------------------------------------ evaluation
def test_score_samples_per_group():
    samples = [Sample("a", None, "q", ["red"], "exact_match", "g:attr"),
               Sample("b", None, "q", ["blue"], "exact_match", "g:attr"),
               Sample("c", None, "q", ["yes"], "pope", "g:exist"),
               Sample("d", None, "q", ["no"], "pope", "g:exist"),
               Sample("e", None, "q", ["3"] * 10, "vqa_accuracy", "g:count")]
    scores = score_samples(samples, ["Red", "green", "yes", "yes", "three"])
    assert scores["g:attr"] == {"accuracy": 0.5, "n": 2}
    assert scores["g:exist"]["accuracy"] == 0.5 and scores["g:exist"]["precision"] == 0.5
    assert scores["g:exist"]["recall"] == 1.0 and scores["g:exist"]["yes_ratio"] == 1.0
    assert scores["g:count"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="2 predictions for 5"):
        score_samples(samples, ["a", "b"])


# ------------------------------------------------------------------------------------------------ shipped model
shipped = pytest.mark.skipif(not (TESTBED_DIR / "model.safetensors").is_file(), reason="testbed not trained yet")

#: chance level of each family's metric on SynthVQA (attr: 6 colours / 5 shapes / 2 sizes; count: 1..5)
CHANCE = {"attr": 0.25, "exist": 0.5, "read": 0.0, "count": 0.2, "spatial": 0.5}


@shipped
def test_shipped_testbed_loads_by_name_and_has_the_promised_shape():
    model = load_model("testbed")
    config, info = read_testbed_config(TESTBED_DIR)
    assert model.vision.num_tokens >= 100 and model.lm.config.n_layer >= 16
    assert (TESTBED_DIR / "model.safetensors").stat().st_size <= 40 * 2 ** 20
    assert set(info["test_accuracy"]) == set(FAMILIES)
    assert not model.training


#: the families the shipped testbed answers from the image: all five (docs/testbed.md, "How good it is")
READS_THE_IMAGE = ("attr", "exist", "read", "count", "spatial")
#: the issue's accuracy targets, and those the shipped testbed meets (docs/testbed.md, "How good it is"; attr, exist and
#: spatial fall short)
TARGET = {"attr": 0.85, "exist": 0.9, "read": 0.5, "count": 0.6, "spatial": 0.9}
MEETS_TARGET = {family: TARGET[family] for family in ("read", "count")}


@shipped
def test_shipped_testbed_answers_from_the_image(tmp_path):
    """Unseen test questions, each asked about its own image and about the image of the next question of its
    family: on the families it reads, the model is well above chance with the right image and falls by at least
    15 points with the wrong one (so it is not answering from the question alone), and on read and count it
    meets the issue's targets. 400 questions for attr, exist, spatial and count, whose margins are a few points
    (with 100 or 200 they move by 4-8 points between samples; count is 64.5% against a target of 60), 100 for
    read."""
    import dataclasses

    model = load_model("testbed")
    generate_synthvqa(tmp_path, SynthConfig(per_family=400, train_multiplier=1))
    per_family = {"attr": 400, "exist": 400, "read": 100, "count": 400, "spatial": 400}
    samples, shifted = [], []
    for family in READS_THE_IMAGE:
        group = load_dataset(f"synthvqa:{family}", tmp_path, "test")[:per_family[family]]
        samples += group
        shifted += [dataclasses.replace(s, image=group[(i + 1) % len(group)].image) for i, s in enumerate(group)]
    own = score_samples(samples, answer_samples(model, samples, batch_size=50))
    other = score_samples(shifted, answer_samples(model, shifted, batch_size=50))
    for family in READS_THE_IMAGE:
        right, wrong = own[f"synthvqa:{family}"]["accuracy"], other[f"synthvqa:{family}"]["accuracy"]
        assert right >= CHANCE[family] + 0.2 and right - wrong >= 0.15, (family, right, wrong)
        assert right >= MEETS_TARGET.get(family, 0.0), (family, right)


@pytest.fixture(scope="module")
def shipped_scores_24(tmp_path_factory):
    """The shipped testbed's accuracy per family on 24 unseen test questions per family (the first images of the
    default test split)."""
    model = load_model("testbed")
    root = tmp_path_factory.mktemp("synth_test24")
    generate_synthvqa(root, SynthConfig(per_family=24, train_multiplier=1))
    samples = load_dataset("synthvqa", root, "test")
    scores = score_samples(samples, answer_samples(model, samples, batch_size=30))
    return {family: scores[f"synthvqa:{family}"]["accuracy"] for family in FAMILIES}


@shipped
def test_shipped_testbed_is_well_above_chance_on_every_family(shipped_scores_24):
    """The fast check of the issue: on 24 questions per family, every family at least 20 points over chance (the
    margin test_shipped_testbed_answers_from_the_image asks on 400)."""
    for family, acc in shipped_scores_24.items():
        assert acc >= CHANCE[family] + 0.2, (family, acc)


@shipped
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="attr, exist and spatial are short of the issue's targets (docs/testbed.md, 'How good it is'; 50%, "
                          "83% and 79% on these 24 questions)")
def test_shipped_testbed_meets_every_target(shipped_scores_24):
    """Every family is checked before the test fails: the message lists each family short of its target."""
    assert set(shipped_scores_24) == set(TARGET)
    short = {family: (acc, TARGET[family]) for family, acc in shipped_scores_24.items() if acc < TARGET[family]}
    assert not short, "short of the target (accuracy, target): " + ", ".join(
        f"{family} {acc:.3f} < {target}" for family, (acc, target) in sorted(short.items()))


def test_conv_tower_tokens_and_pixels():
    from PIL import Image

    from mambaprune.models.testbed import ConvTower

    torch.manual_seed(0)
    tower = ConvTower(image_size=64, patch_size=16, width=32, depth=1).eval()
    assert tower.grid == (4, 4) and tower.num_tokens == 16 and tower.dim == 32
    gray = Image.new("RGB", (90, 50), (255, 0, 128))
    pixels = tower.preprocess([gray, gray])
    assert pixels.shape == (2, 3, 64, 64)
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)
    assert torch.allclose(tower.display(pixels)[0, :, 5, 5], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-6)
    with torch.no_grad():
        base = tower(pixels)
        assert base.shape == (2, 16, 32)
        # a change in the bottom-right corner reaches only the last tokens (receptive field < 1 patch away
        # in the stem's last stride, a few pixels further through the blocks): token 0 is unchanged
        edited = pixels.clone()
        edited[:, :, 60:, 60:] = -1.0
        out = tower(edited)
    assert torch.equal(out[:, 0], base[:, 0]) and not torch.equal(out[:, 15], base[:, 15])
    # with an attention block on top every token sees the whole image, as a ViT's do
    mixing = ConvTower(image_size=64, patch_size=16, width=32, depth=1, attention_layers=1, heads=4).eval()
    with torch.no_grad():
        assert not torch.allclose(mixing(edited)[:, 0], mixing(pixels)[:, 0], atol=1e-6)
    assert len(mixing.attention) == 1 and mixing.attention[0].self_attn.num_heads == 4
    with pytest.raises(ValueError, match="power of 2"):
        ConvTower(image_size=64, patch_size=12)
    with pytest.raises(ValueError, match=r"\(batch, 3, 64, 64\)"):
        tower(torch.zeros(1, 3, 32, 32))


def test_missing_shipped_testbed_says_how_to_train_one(tmp_path, monkeypatch):
    """The shipped folder stands in as an empty folder (the trained testbed is shipped, so the real one cannot
    be missing): loading it says how to train one; an empty folder given by hand names the missing config.json,
    a folder that does not exist says so."""
    from mambaprune.models import testbed as testbed_module
    from mambaprune.models.testbed import describe_testbed

    empty = tmp_path / "assets" / "testbed"
    empty.mkdir(parents=True)
    monkeypatch.setattr(testbed_module, "TESTBED_DIR", empty)
    with pytest.raises(CheckpointError, match="mambaprune train-testbed --data SYNTH --out DIR") as e:
        load_model("testbed")
    assert f"no trained testbed is shipped in {empty} yet" in str(e.value)
    assert "load_model('testbed', DIR)" in str(e.value) and "--model-arg folder=DIR" in str(e.value)
    with pytest.raises(CheckpointError, match="no trained testbed is shipped"):
        describe_testbed()
    monkeypatch.undo()
    for load in (load_model, lambda name, folder: describe_testbed(folder)):
        with pytest.raises(CheckpointError) as e:
            load("testbed", folder=empty)
        assert str(e.value) == f"missing config.json in the testbed folder {empty}"
        with pytest.raises(CheckpointError) as e:
            load("testbed", folder=tmp_path / "nowhere")
        assert str(e.value) == f"testbed folder not found: {tmp_path / 'nowhere'}"
