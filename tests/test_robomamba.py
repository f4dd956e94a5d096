"""RoboMamba: the released checkpoint layout (LinearVLM keys, strict=False semantics), written small and loaded
back; prompt; 256-token layout; errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from mambaprune.models import CheckpointError, load_model  # noqa: E402
from mambaprune.models.robomamba import (ROBOMAMBA_SPEC, load_robomamba, random_robomamba,  # noqa: E402
                                         robomamba_state_dict, save_robomamba)
from test_vlm import KeepAll, make_image, make_lm, make_tokenizer  # noqa: E402

QUESTION = "What color is the cup?"


@pytest.fixture(scope="module")
def robo():
    """A random RoboMamba at the released resolution (224 px, 16 x 16 patches)."""
    return random_robomamba(make_lm(seed=6), make_tokenizer(), seed=2)


@pytest.fixture(scope="module")
def files(robo, tmp_path_factory):
    root = tmp_path_factory.mktemp("robomamba")
    paths = {"checkpoint": root / "robomamba.pth", "clip_dir": root / "clip-vit-large-patch14",
             "llm_dir": root / "mamba-2.8b-hf"}
    save_robomamba(robo, paths["checkpoint"], clip_dir=paths["clip_dir"], llm_dir=paths["llm_dir"],
                   tokenizer_dir=paths["llm_dir"])
    return paths


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_prompt_and_decoding_settings():
    assert ROBOMAMBA_SPEC.prompt(QUESTION) == "<image>Question:What color is the cup? Answer:"
    assert not ROBOMAMBA_SPEC.do_sample
    assert ROBOMAMBA_SPEC.max_new_tokens_for("pope") == 2 and ROBOMAMBA_SPEC.max_new_tokens_for("vqav2") == 16


def test_layout_256_visual_tokens_centre_crop(robo):
    prep = robo.prepare(make_image(0, (320, 240)), QUESTION)
    ids = robo.tokenizer("<image>Question:What color is the cup? Answer:", add_special_tokens=False)["input_ids"]
    assert prep.grid == (16, 16) and prep.num_visual == 256 and prep.text_ids == [ids] and 0 not in ids
    assert prep.inputs_embeds.shape == (1, 256 + len(ids), 32) and prep.is_visual[0, :256].all()
    # shorter side to 224, then the centre 224 x 224: the 320 x 240 image keeps its middle columns only
    wide = np.zeros((240, 320, 3), dtype=np.uint8)
    wide[:, :30] = 255                                   # a white band on the left, cut away by the crop
    from PIL import Image

    pixels = robo.vision.preprocess(Image.fromarray(wide))
    assert torch.allclose(robo.vision.display(pixels), torch.zeros(1, 3, 224, 224), atol=1e-6)


def test_checkpoint_has_the_linear_vlm_keys(files):
    state = torch.load(files["checkpoint"], weights_only=True)
    assert {"vision.model.cls_token", "vision.model.pos_embed", "vision.model.norm_pre.weight",
            "vision.model.blocks.1.attn.qkv.weight", "vision.model.norm.bias",
            "llm.mamba.backbone.embeddings.weight", "llm.mamba.backbone.layers.2.mixer.dt_proj.bias",
            "llm.mamba.backbone.norm_f.weight", "llm.mamba.lm_head.weight",
            "projector.projector.0.weight", "projector.projector.4.bias"} <= set(state)
    assert all(k.startswith(("vision.model.", "llm.mamba.", "projector.projector.")) for k in state)


def test_full_checkpoint_alone_loads_every_tensor(robo, files):
    loaded = load_model("robomamba", files["checkpoint"], tokenizer_dir=files["llm_dir"], clip_num_heads=4)
    assert_same_weights(loaded.vision.model, robo.vision.model)
    assert_same_weights(loaded.projector, robo.projector)
    assert_same_weights(loaded.lm, robo.lm)
    img = make_image(1, (200, 300))
    answer = loaded.answer(img, QUESTION, max_new_tokens=6)
    assert isinstance(answer, str) and answer == robo.answer(img, QUESTION, max_new_tokens=6)
    assert loaded.answer(img, QUESTION, pruner=KeepAll(), max_new_tokens=6) == answer
    assert loaded.answer(img, QUESTION, pruner=lambda seq: None, max_new_tokens=6) == answer


def test_projector_only_checkpoint_with_pretrained_folders(robo, files, tmp_path):
    save_robomamba(robo, tmp_path / "proj.pth", include_vision=False, include_llm=False)
    loaded = load_robomamba(tmp_path / "proj.pth", clip_dir=files["clip_dir"], llm_dir=files["llm_dir"])
    assert_same_weights(loaded.vision.model, robo.vision.model)
    assert_same_weights(loaded.lm, robo.lm)
    assert_same_weights(loaded.projector, robo.projector)
    for missing, needle in (({"llm_dir": files["llm_dir"]},
                             r"no CLIP tensors .*give clip_dir \(openai/clip-vit-large-patch14"),
                            ({"clip_dir": files["clip_dir"], "tokenizer_dir": files["llm_dir"]},
                             r"no language-model tensors .*give llm_dir \(state-spaces/mamba-2\.8b-hf")):
        with pytest.raises(CheckpointError, match=needle):
            load_robomamba(tmp_path / "proj.pth", **missing)


def test_checkpoint_tensors_override_the_pretrained_ones(robo, files, tmp_path):
    """strict=False semantics: what the file holds wins, the rest comes from the folders."""
    other = random_robomamba(make_lm(seed=11), make_tokenizer(), seed=7)
    state = robomamba_state_dict(other)
    partial = {k: v for k, v in state.items()
               if k.startswith(("projector.", "llm.mamba.")) or k.startswith("vision.model.norm.")}
    torch.save(partial, tmp_path / "partial.pth")
    loaded = load_robomamba(tmp_path / "partial.pth", clip_dir=files["clip_dir"], llm_dir=files["llm_dir"])
    assert_same_weights(loaded.lm, other.lm)
    assert_same_weights(loaded.projector, other.projector)
    got, mine, theirs = (m.state_dict() for m in (loaded.vision.model, robo.vision.model, other.vision.model))
    for k in got:
        expected = theirs[k] if k.startswith("post_layernorm.") else mine[k]
        assert torch.equal(got[k], expected), k


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.__setitem__("optimizer.step", torch.zeros(1)), r"unexpected keys .*optimizer\.step"),
    (lambda s: s.__setitem__("llm.mamba.backbone.layers.0.mixer.bogus", torch.zeros(1)),
     r"unexpected keys .*backbone\.layers\.0\.mixer\.bogus"),
    (lambda s: s.__setitem__("vision.model.blocks.0.attn.bogus", torch.zeros(1)),
     r"unexpected keys .*blocks\.0\.attn\.bogus"),
    (lambda s: s.pop("projector.projector.2.weight"), r"missing key '2\.weight'"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("projector.")], "no projector tensors"),
    (lambda s: s.__setitem__("llm.mamba.lm_head.weight", torch.zeros_like(s["llm.mamba.lm_head.weight"])),
     "tied tensor"),
    (lambda s: s.__setitem__("llm.mamba.backbone.norm_f.weight", torch.zeros(5)), r"mis-shaped .*norm_f"),
])
def test_bad_checkpoints_name_the_problem(files, tmp_path, edit, needle):
    state = torch.load(files["checkpoint"], weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=needle):
        load_robomamba(tmp_path / "bad.pth", clip_dir=files["clip_dir"], llm_dir=files["llm_dir"])


def test_missing_tensors_without_a_folder_are_named(files, tmp_path):
    state = torch.load(files["checkpoint"], weights_only=True)
    del state["llm.mamba.backbone.layers.1.mixer.A_log"]
    del state["vision.model.blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "holes.pth")
    with pytest.raises(CheckpointError, match=r"missing keys .*blocks\.1\.mlp\.fc2\.bias"):
        load_robomamba(tmp_path / "holes.pth", tokenizer_dir=files["llm_dir"], clip_num_heads=4)
    with pytest.raises(CheckpointError, match=r"missing keys .*backbone\.layers\.1\.mixer\.A_log"):
        load_robomamba(tmp_path / "holes.pth", clip_dir=files["clip_dir"], tokenizer_dir=files["llm_dir"])


def test_truncated_or_corrupted_checkpoint_is_a_clear_error(files, tmp_path):
    data = files["checkpoint"].read_bytes()
    for i, broken in enumerate((data[: len(data) // 3], b"PK\x03\x04" + b"\x00" * 64)):
        path = tmp_path / f"broken{i}.pth"
        path.write_bytes(broken)
        with pytest.raises(CheckpointError, match="truncated, corrupted"):
            load_robomamba(path, clip_dir=files["clip_dir"], llm_dir=files["llm_dir"])
    with pytest.raises(CheckpointError, match="not found"):
        load_robomamba(tmp_path / "missing.pth", llm_dir=files["llm_dir"])
    with pytest.raises(ValueError, match="tokenizer_dir"):
        load_robomamba(files["checkpoint"], clip_num_heads=4)
