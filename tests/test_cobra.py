"""Cobra: the released run-folder layout, written small and loaded back; prompt; 729-token layout; errors."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from mambaprune.models import CheckpointError, load_model  # noqa: E402
from mambaprune.models.cobra import COBRA_SPEC, cobra_vqa_prompt, load_cobra, random_cobra, save_cobra  # noqa: E402
from test_vlm import KeepAll, make_image, make_lm, make_tokenizer  # noqa: E402

QUESTION = "What is the man holding?"


@pytest.fixture(scope="module")
def cobra():
    """A random Cobra at the released resolution (384 px, 27 x 27 patches), towers 32 + 48 wide."""
    return random_cobra(make_lm(seed=5), make_tokenizer(), seed=1)


@pytest.fixture(scope="module")
def files(cobra, tmp_path_factory):
    root = tmp_path_factory.mktemp("cobra")
    dirs = {"run_dir": root / "cobra+3b", "dino_dir": root / "dinov2-with-registers-large",
            "siglip_dir": root / "siglip-so400m-patch14-384", "tokenizer_dir": root / "tokenizer"}
    save_cobra(cobra, dirs["run_dir"], dino_dir=dirs["dino_dir"], siglip_dir=dirs["siglip_dir"],
               tokenizer_dir=dirs["tokenizer_dir"])
    return dirs


def load(files, **changes):
    args = {**files, **changes}
    return load_cobra(args.pop("run_dir"), **args)


def test_prompt_is_byte_identical_to_the_released_template():
    assert cobra_vqa_prompt(QUESTION) == ("<|user|>\nWhat is the man holding?\nAnswer the question using a single "
                                          "word or phrase.<|endoftext|>\n<|assistant|>\n")
    # the prompt builder removes "<image>" and strips the message (leading whitespace of the question goes)
    assert cobra_vqa_prompt("  <image>Is it red? ") == ("<|user|>\nIs it red? \nAnswer the question using a single "
                                                        "word or phrase.<|endoftext|>\n<|assistant|>\n")
    assert COBRA_SPEC.max_new_tokens == 128 and not COBRA_SPEC.do_sample


def test_sequence_layout_729_visual_tokens_then_the_prompt(cobra):
    prep = cobra.prepare(make_image(0, (500, 333)), QUESTION)
    ids = cobra.tokenizer(cobra_vqa_prompt(QUESTION), add_special_tokens=False)["input_ids"]
    assert prep.grid == (27, 27) and prep.num_visual == 729 and cobra.vision.dim == 80
    assert prep.text_ids == [ids] and prep.inputs_embeds.shape == (1, 729 + len(ids), 32)
    assert prep.is_visual[0, :729].all() and not prep.is_visual[0, 729:].any()
    assert ids.count(0) == 1                        # the <|endoftext|> inside the template, no BOS in front
    assert set(prep.pixels) == {"dino", "siglip"} and prep.pixels["dino"].shape == (1, 3, 384, 384)


def test_run_folder_has_the_released_layout(cobra, files):
    run = files["run_dir"]
    cfg = json.loads((run / "config.json").read_text())["model"]
    assert (cfg["model_id"], cfg["vision_backbone_id"], cfg["llm_backbone_id"], cfg["arch_specifier"],
            cfg["image_resize_strategy"]) == ("cobra+3b", "dinosiglip-vit-so-384px", "mamba-2.8b-zephyr",
                                              "no-align+fused-gelu-mlp", "resize-naive")
    ckpt = torch.load(run / "checkpoints" / "latest-checkpoint.pt", weights_only=True)
    assert list(ckpt) == ["model"] and set(ckpt["model"]) == {"projector", "llm_backbone"}
    assert set(ckpt["model"]["projector"]) == {f"projector.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    llm_keys = set(ckpt["model"]["llm_backbone"])
    assert {"llm.backbone.embedding.weight", "llm.lm_head.weight", "llm.backbone.norm_f.weight",
            "llm.backbone.layers.2.mixer.A_log", "llm.backbone.layers.0.norm.weight"} <= llm_keys
    assert all(k.startswith(("llm.backbone.", "llm.lm_head.")) for k in llm_keys)
    siglip_cfg = json.loads((files["siglip_dir"] / "config.json").read_text())
    assert siglip_cfg["model_type"] == "siglip" and siglip_cfg["vision_config"]["hidden_act"] == "gelu_pytorch_tanh"
    assert "encoder.layer.0.attention.attention.query.weight" in load_file(files["dino_dir"] / "model.safetensors")


def test_load_puts_every_tensor_in_place_and_answers_the_same(cobra, files):
    loaded = load_model("cobra", files["run_dir"], dino_dir=files["dino_dir"], siglip_dir=files["siglip_dir"],
                        tokenizer_dir=files["tokenizer_dir"])
    parts = torch.load(files["run_dir"] / "checkpoints" / "latest-checkpoint.pt", weights_only=True)["model"]
    proj, lm = loaded.projector.state_dict(), loaded.lm.state_dict()
    for key, value in parts["projector"].items():
        assert torch.equal(proj[key[len("projector."):]], value), key
    for key, value in parts["llm_backbone"].items():
        assert torch.equal(lm[key[len("llm."):]], value), key
    assert loaded.lm.config.tie_embeddings and loaded.lm.config.n_layer == 3
    for name in ("dino", "siglip"):
        got, ref = loaded.vision.towers[name].model.state_dict(), cobra.vision.towers[name].model.state_dict()
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), name
    assert loaded.vision.towers["siglip"].model.config.hidden_act == "gelu"   # timm's exact GELU, as Cobra ran it
    img = make_image(1, (300, 400))
    answer = loaded.answer(img, QUESTION, max_new_tokens=6)
    assert isinstance(answer, str) and answer == cobra.answer(img, QUESTION, max_new_tokens=6)
    assert loaded.answer(img, QUESTION, pruner=KeepAll(), max_new_tokens=6) == answer


def test_batch_equals_one_by_one(cobra):
    imgs = [make_image(2), make_image(3, (200, 260))]
    qs = ["Is there a dog?", "How many people are in the picture? Count them."]
    ids = cobra.generate(imgs, qs, max_new_tokens=4, eos_token_id=None)
    for i in range(2):
        assert cobra.generate(imgs[i], qs[i], max_new_tokens=4, eos_token_id=None)[0].tolist() == ids[i].tolist()


def test_projector_keys_without_the_module_prefix_are_accepted(cobra, files, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files["run_dir"], run)
    path = run / "checkpoints" / "latest-checkpoint.pt"
    obj = torch.load(path, weights_only=True)
    obj["model"]["projector"] = {k[len("projector."):]: v for k, v in obj["model"]["projector"].items()}
    torch.save(obj, path)
    loaded = load(files, run_dir=run)
    assert all(torch.equal(loaded.projector.state_dict()[k], v) for k, v in cobra.projector.state_dict().items())


def _edit_checkpoint(files, tmp_path, edit):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files["run_dir"], run)
    path = run / "checkpoints" / "latest-checkpoint.pt"
    obj = torch.load(path, weights_only=True)
    edit(obj["model"])
    torch.save(obj, path)
    return run


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["llm_backbone"].pop("llm.backbone.layers.1.mixer.D"), r"missing keys .*backbone\.layers\.1\.mixer\.D"),
    (lambda m: m["llm_backbone"].__setitem__("llm.backbone.layers.0.mixer.extra", torch.zeros(2)),
     r"unexpected keys .*backbone\.layers\.0\.mixer\.extra"),
    (lambda m: m["llm_backbone"].__setitem__("backbone.norm_f.weight", torch.zeros(2)),
     r"unexpected keys .*'backbone\.norm_f\.weight'"),
    (lambda m: m["llm_backbone"].__setitem__("llm.backbone.layers.0.mixer.D", torch.zeros(3)),
     r"mis-shaped .*backbone\.layers\.0\.mixer\.D"),
    (lambda m: m["projector"].pop("projector.4.bias"), r"missing keys \['4\.bias'\]"),
    (lambda m: m.pop("llm_backbone"), "missing part 'llm_backbone'"),
])
def test_bad_checkpoint_contents_name_the_problem(files, tmp_path, edit, needle):
    run = _edit_checkpoint(files, tmp_path, edit)
    with pytest.raises(CheckpointError, match=needle):
        load(files, run_dir=run)


def test_truncated_or_corrupted_checkpoint_is_a_clear_error(files, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files["run_dir"], run)
    path = run / "checkpoints" / "latest-checkpoint.pt"
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], b"\x00garbage" * 100):
        path.write_bytes(broken)
        with pytest.raises(CheckpointError, match="truncated, corrupted"):
            load(files, run_dir=run)
    path.unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load(files, run_dir=run)


@pytest.mark.parametrize("key, value, needle", [
    ("vision_backbone_id", "clip-vit-l", "vision_backbone_id = 'clip-vit-l'"),
    ("llm_backbone_id", "mamba-2.8b-slimpj", "llm_backbone_id = 'mamba-2.8b-slimpj'"),
    ("arch_specifier", "no-align+gelu-mlp", "arch_specifier"),
    ("image_resize_strategy", "letterbox", "image_resize_strategy = 'letterbox'"),
])
def test_unsupported_run_configs_are_rejected(files, tmp_path, key, value, needle):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files["run_dir"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"][key] = value
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=needle):
        load(files, run_dir=run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(files, run_dir=run)


def test_broken_tower_folder_names_the_key(files, tmp_path):
    import shutil

    dino = tmp_path / "dino"
    shutil.copytree(files["dino_dir"], dino)
    state = load_file(dino / "model.safetensors")
    del state["encoder.layer.1.norm2.bias"]
    save_file(state, dino / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"dinov2 tower .*missing keys .*encoder\.layer\.1\.norm2\.bias"):
        load(files, dino_dir=dino)
    with pytest.raises(CheckpointError, match="tokenizer folder not found"):
        load(files, tokenizer_dir=tmp_path / "none")


def test_dtype_and_timm_tower_folders(cobra, files, tmp_path):
    """Load in bf16; and with the DINOv2 weights given as a timm folder at 518 px (37 x 37 positions)."""
    from mambaprune.models.vision import random_vit_model, resample_dinov2_positions_, transformers_to_timm

    big = random_vit_model("dinov2", seed=9, image_size=518, patch_size=14, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_register_tokens=4)
    timm_dir = tmp_path / "timm_dino"
    timm_dir.mkdir()
    save_file({k: v.contiguous() for k, v in transformers_to_timm("dinov2", big.state_dict()).items()},
              timm_dir / "model.safetensors")
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "vit_large_patch14_reg4_dinov2",
                                                      "model_args": {"num_heads": 4}}))
    loaded = load(files, dino_dir=timm_dir, dtype=torch.bfloat16)
    dino = loaded.vision.towers["dino"].model
    assert dino.config.image_size == 384 and dino.embeddings.position_embeddings.shape == (1, 730, 32)
    resample_dinov2_positions_(big, 384)
    emb, ref = dino.embeddings, big.embeddings      # bf16 now; timm keeps the class position inside cls_token
    torch.testing.assert_close(emb.position_embeddings[:, 1:].float(), ref.position_embeddings[:, 1:], rtol=1e-2,
                               atol=1e-2)
    torch.testing.assert_close(emb.cls_token.float(), ref.cls_token + ref.position_embeddings[:, :1], rtol=1e-2,
                               atol=1e-2)
    assert loaded.lm.backbone.embedding.weight.dtype == torch.bfloat16
    out = loaded.prefill(loaded.prepare(make_image(4), QUESTION))
    assert out.logits.shape == (1, loaded.lm.config.padded_vocab_size) and torch.isfinite(out.logits.float()).all()
