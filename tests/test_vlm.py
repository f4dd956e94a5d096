"""The multimodal model class, the vision towers, the projector, the timm key mapping and the model registry.

Small random models only (nothing can be downloaded): a byte-level BPE tokenizer trained here, random
transformers towers, a random Mamba LM. The helpers at the top are shared with test_cobra / test_robomamba.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

from conftest import hf_pair  # noqa: E402
from mambaprune.models import (CheckpointError, MambaVLM, VLMSpec, available_models, load_model,  # noqa: E402
                               register_model)
from mambaprune.models import registry  # noqa: E402
from mambaprune.models.projector import MLPProjector, projector_from_state  # noqa: E402
from mambaprune.models.vision import (IMAGENET_MEAN, IMAGENET_STD, FusedViTTower, ViTTower,  # noqa: E402
                                      load_vit_model, model_from_timm, random_vit_model, resample_dinov2_positions_,
                                      resize_image, save_vit_model, transformers_to_timm)

hf_logging.set_verbosity_error()

EOS = 0
CORPUS = ["What is in the image? Answer the question using a single word or phrase.",
          "<|user|> <|assistant|> Question: Answer: What color is the cup? Is there a dog? yes no red blue",
          "How many people are in the picture? two three four the a man woman holding"]


@functools.lru_cache(maxsize=None)
def make_tokenizer():
    """A GPT-NeoX-like byte-level BPE tokenizer (vocabulary 300, ``<|endoftext|>`` = 0) that, like many
    tokenizers, prepends ``<|endoftext|>`` as BOS when asked for special tokens: so a model that forgot
    ``add_special_tokens=False`` would show a BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_lm(seed=3, layers=3, width=32, tied=True):
    """A random Mamba LM whose vocabulary (304 rows) covers the tokenizer's 300 ids; ``lm_head`` tied to the
    embedding as in the released Mamba checkpoints."""
    return hf_pair(seed=seed, vocab_size=304, num_hidden_layers=layers, hidden_size=width, state_size=8,
                   time_step_rank=4, tie_word_embeddings=tied)[1]


def make_image(seed=0, size=(120, 90)):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


class KeepAll:
    """A pruning callback that keeps every token (through ``select``) and counts its calls."""

    def __init__(self):
        self.starts = 0
        self.calls = 0

    def start(self, config):
        self.starts += 1

    def __call__(self, seq):
        self.calls += 1
        return seq.select(seq.mask)


SPEC = VLMSpec(name="toy", prompt_template="Q: {question} A:", max_new_tokens=5)


def small_vlm(seed=0, image_size=56):
    """A generic MambaVLM: random CLIP-like tower (4 x 4 patches), projector, LM."""
    clip = random_vit_model("clip", seed=seed, image_size=image_size, patch_size=14, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    lm = make_lm(seed=seed + 3)
    torch.manual_seed(seed)
    return MambaVLM(ViTTower("clip", clip, resize="resize-crop"), MLPProjector(32, lm.config.d_model), lm,
                    make_tokenizer(), SPEC).eval()


def tiny_tower_model(kind, seed=0, image_size=56, **cfg):
    base = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
    if kind != "dinov2":
        base["intermediate_size"] = 64
    base.update(cfg)
    return random_vit_model(kind, seed=seed, image_size=image_size, patch_size=14, **base)


# ------------------------------------------------------------------------------------------------ projector
def test_projector_layout_and_forward():
    proj = MLPProjector(6, 5)
    assert list(proj.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert (proj.in_dim, proj.hidden_dim, proj.out_dim) == (6, 24, 5)
    x = torch.randn(2, 3, 6)
    w = {k: v for k, v in proj.state_dict().items()}
    ref = F.linear(F.gelu(F.linear(F.gelu(F.linear(x, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])),
                   w["4.weight"], w["4.bias"])
    torch.testing.assert_close(proj(x), ref, rtol=0, atol=0)
    again = projector_from_state(proj.state_dict(), "test")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), proj.state_dict().values()))


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("4.bias"), "4.bias"),
    (lambda s: s.__setitem__("6.weight", torch.zeros(2, 2)), "6.weight"),
    (lambda s: s.__setitem__("4.weight", torch.zeros(5, 4)), "4.weight"),
    (lambda s: s.pop("0.weight"), "0.weight"),
])
def test_projector_bad_state_names_the_key(edit, needle):
    state = dict(MLPProjector(6, 5).state_dict())
    edit(state)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        projector_from_state(state, "test")


# ------------------------------------------------------------------------------------------------ images
def test_resize_strategies():
    # 400 x 200: red | green (the middle half) | blue; the crop strategy keeps exactly the middle half
    arr = np.zeros((200, 400, 3), dtype=np.uint8)
    arr[:, :100, 0] = 255
    arr[:, 100:300, 1] = 255
    arr[:, 300:, 2] = 255
    img = Image.fromarray(arr)
    crop = np.asarray(resize_image(img, 56, "resize-crop")).astype(int)
    assert crop.shape == (56, 56, 3)
    inner = crop[:, 4:52]
    assert (inner[..., 1] == 255).all() and (inner[..., 0] == 0).all() and (inner[..., 2] == 0).all()
    assert crop[..., 0].max() < 40 and crop[..., 2].max() < 40            # no red/blue band survived the crop
    naive = np.asarray(resize_image(img, 56, "resize-naive")).astype(int)
    assert naive.shape == (56, 56, 3)
    assert naive[:, 2, 0].min() > 200 and naive[:, -3, 2].min() > 200   # aspect ratio not kept: all bands stay
    square = make_image(1, (80, 80))
    assert np.array_equal(np.asarray(resize_image(square, 56, "resize-crop")),
                          np.asarray(resize_image(square, 56, "resize-naive")))
    with pytest.raises(ValueError, match="letterbox"):
        resize_image(img, 56, "letterbox")


def test_preprocess_normalises_with_the_tower_statistics(tmp_path):
    tower = ViTTower("dinov2", tiny_tower_model("dinov2"))
    gray = Image.new("RGB", (70, 50), (128, 128, 128))
    pixels = tower.preprocess(gray)
    assert pixels.shape == (1, 3, 56, 56) and pixels.dtype == torch.float32
    for c in range(3):   # hand-computed: (128 / 255 - mean) / std
        expected = (np.float32(128) / np.float32(255) - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(pixels[0, c], torch.full((56, 56), float(expected)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tower.display(pixels), torch.full((1, 3, 56, 56), 128 / 255), rtol=0, atol=1e-6)

    img = make_image(2)
    img.save(tmp_path / "im.png")
    rgba = img.convert("RGBA")
    by_path, by_pil, by_rgba = (tower.preprocess(x) for x in (tmp_path / "im.png", img, rgba))
    assert torch.equal(by_path, by_pil) and torch.equal(by_rgba, by_pil)
    batch = tower.preprocess([img, str(tmp_path / "im.png"), gray])
    assert batch.shape == (3, 3, 56, 56) and torch.equal(batch[0], by_pil[0]) and torch.equal(batch[2], pixels[0])
    assert torch.equal(tower.preprocess(by_pil[0]), by_pil)               # a prepared (3, s, s) tensor passes
    with pytest.raises(ValueError, match=r"\(batch, 3, 56, 56\)"):
        tower.preprocess(torch.zeros(1, 3, 32, 32))
    with pytest.raises(FileNotFoundError):
        tower.preprocess(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        tower.preprocess(tmp_path / "junk.png")
    with pytest.raises(ValueError, match="PIL image"):
        tower.preprocess(3.5)


# ------------------------------------------------------------------------------------------------ towers
@pytest.mark.parametrize("kind, prefix", [("dinov2", 5), ("siglip", 0), ("clip", 1)])
def test_tower_features_are_second_to_last_block_without_prefix_tokens(kind, prefix):
    model = tiny_tower_model(kind)
    tower = ViTTower(kind, model)
    assert tower.num_prefix_tokens == prefix and tower.grid == (4, 4) and tower.num_tokens == 16
    blocks = model.encoder.layer if kind == "dinov2" else model.encoder.layers
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks]
    pixels = tower.preprocess([make_image(0), make_image(1)])
    with torch.no_grad():
        feats = tower(pixels)
    for h in hooks:
        h.remove()
    assert feats.shape == (2, 16, 32)
    assert outputs[-2].shape[1] == prefix + 16
    torch.testing.assert_close(feats, outputs[-2][:, prefix:], rtol=0, atol=0)   # block n-2, patches only
    assert not torch.allclose(feats, outputs[-1][:, prefix:])


def test_dinov2_position_resampling_matches_on_the_fly_interpolation():
    """Resampling the 5 x 5 position table to 4 x 4 at load equals transformers' bicubic-antialias interpolation
    of the same table at run time (and timm's resample_abs_pos_embed, which uses the same op)."""
    big = tiny_tower_model("dinov2", image_size=70)
    small = tiny_tower_model("dinov2", image_size=70)
    resample_dinov2_positions_(small, 56)
    assert small.config.image_size == 56 and small.embeddings.position_embeddings.shape == (1, 17, 32)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(small(x).last_hidden_state, big(x).last_hidden_state, rtol=1e-5, atol=1e-5)
    const = tiny_tower_model("dinov2", image_size=70)
    with torch.no_grad():
        const.embeddings.position_embeddings[:, 1:] = 0.25
    resample_dinov2_positions_(const, 42)
    torch.testing.assert_close(const.embeddings.position_embeddings[:, 1:], torch.full((1, 9, 32), 0.25))


def test_fused_tower_concatenates_on_channels():
    dino = ViTTower("dinov2", tiny_tower_model("dinov2", seed=1))
    siglip = ViTTower("siglip", tiny_tower_model("siglip", seed=2, hidden_size=48, intermediate_size=96))
    fused = FusedViTTower({"dino": dino, "siglip": siglip})
    assert fused.dim == 80 and fused.grid == (4, 4) and fused.num_tokens == 16 and fused.image_size == 56
    imgs = [make_image(3), make_image(4)]
    pixels = fused.preprocess(imgs)
    assert set(pixels) == {"dino", "siglip"}
    assert torch.equal(pixels["dino"], dino.preprocess(imgs)) and torch.equal(pixels["siglip"], siglip.preprocess(imgs))
    assert not torch.equal(pixels["dino"], pixels["siglip"])                   # each tower its own mean/std
    with torch.no_grad():
        feats = fused(pixels)
        torch.testing.assert_close(feats, torch.cat([dino(pixels["dino"]), siglip(pixels["siglip"])], -1),
                                   rtol=0, atol=0)
    assert feats.shape == (2, 16, 80)
    with pytest.raises(ValueError, match="dict"):
        fused.preprocess(pixels["dino"])
    with pytest.raises(ValueError, match="keys"):
        fused.preprocess({"dino": pixels["dino"]})
    other = ViTTower("siglip", tiny_tower_model("siglip", image_size=70))
    with pytest.raises(ValueError, match="grid"):
        FusedViTTower({"dino": dino, "siglip": other})


def test_real_tower_widths_give_729_by_2176():
    """Cobra's channel count with the real widths (DINOv2-L 1024 + SigLIP-so400m 1152), 2 blocks each."""
    dino = random_vit_model("dinov2", image_size=384, patch_size=14, hidden_size=1024, num_hidden_layers=2,
                            num_attention_heads=16, num_register_tokens=4)
    siglip = random_vit_model("siglip", image_size=384, patch_size=14, hidden_size=1152, num_hidden_layers=2,
                              num_attention_heads=16, intermediate_size=4304, vision_use_head=False)
    fused = FusedViTTower({"dino": ViTTower("dinov2", dino), "siglip": ViTTower("siglip", siglip)})
    with torch.no_grad():
        feats = fused(fused.preprocess(make_image(5, (500, 375))))
    assert feats.shape == (1, 729, 2176) and fused.grid == (27, 27)
    assert torch.isfinite(feats).all()


# ------------------------------------------------------------------------------------------------ timm layout
def handwritten_timm(kind, model):
    """The timm state dict of a transformers tower, written out name by name (independent of the library)."""
    sd = model.state_dict()
    out = {}

    def qkv(h, p):
        return torch.cat([sd[f"{h}.q_proj.{p}"], sd[f"{h}.k_proj.{p}"], sd[f"{h}.v_proj.{p}"]])

    for i in range(model.config.num_hidden_layers):
        t = f"blocks.{i}"
        if kind == "dinov2":
            h = f"encoder.layer.{i}"
            pairs = {"norm1": "norm1", "attn.proj": "attention.o_proj", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
                     "mlp.fc2": "mlp.fc2"}
            out[f"{t}.ls1.gamma"] = sd[f"{h}.layer_scale1.lambda1"]
            out[f"{t}.ls2.gamma"] = sd[f"{h}.layer_scale2.lambda1"]
            att = f"{h}.attention"
        else:
            h = f"encoder.layers.{i}"
            pairs = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2",
                     "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
            att = f"{h}.self_attn"
        for p in ("weight", "bias"):
            out[f"{t}.attn.qkv.{p}"] = qkv(att, p)
            for tn, hn in pairs.items():
                out[f"{t}.{tn}.{p}"] = sd[f"{h}.{hn}.{p}"]
    if kind == "dinov2":
        pos = sd["embeddings.position_embeddings"]
        out.update({"cls_token": sd["embeddings.cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:],
                    "reg_token": sd["embeddings.register_tokens"],
                    "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
                    "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
                    "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]})
    elif kind == "siglip":
        d = model.config.hidden_size
        out.update({"pos_embed": sd["embeddings.position_embedding.weight"][None],
                    "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
                    "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
                    "norm.weight": sd["post_layernorm.weight"], "norm.bias": sd["post_layernorm.bias"],
                    "attn_pool.latent": sd["head.probe"],
                    "attn_pool.q.weight": sd["head.attention.in_proj_weight"][:d],
                    "attn_pool.kv.weight": sd["head.attention.in_proj_weight"][d:],
                    "attn_pool.q.bias": sd["head.attention.in_proj_bias"][:d],
                    "attn_pool.kv.bias": sd["head.attention.in_proj_bias"][d:]})
        for tn, hn in {"proj": "attention.out_proj", "norm": "layernorm", "mlp.fc1": "mlp.fc1",
                       "mlp.fc2": "mlp.fc2"}.items():
            for p in ("weight", "bias"):
                out[f"attn_pool.{tn}.{p}"] = sd[f"head.{hn}.{p}"]
    else:
        out.update({"cls_token": sd["embeddings.class_embedding"][None, None],
                    "pos_embed": sd["embeddings.position_embedding.weight"][None],
                    "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
                    "norm_pre.weight": sd["pre_layrnorm.weight"], "norm_pre.bias": sd["pre_layrnorm.bias"],
                    "norm.weight": sd["post_layernorm.weight"], "norm.bias": sd["post_layernorm.bias"]})
    return out


@pytest.mark.parametrize("kind", ["dinov2", "siglip", "clip"])
def test_timm_layout_maps_to_the_same_tower(kind):
    # timm's activations: exact GELU for DINOv2 and SigLIP (transformers' SigLIP default is the tanh one),
    # QuickGELU for CLIP
    act = {"dinov2": "gelu", "siglip": "gelu", "clip": "quick_gelu"}[kind]
    model = tiny_tower_model(kind, seed=7, hidden_act=act)
    timm = handwritten_timm(kind, model)
    loaded = model_from_timm(kind, timm, num_heads=4)
    assert loaded.config.hidden_act == act
    ref, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(ref)
    folded = {"embeddings.cls_token", "embeddings.position_embeddings", "embeddings.mask_token"}
    for k in ref:
        if kind == "dinov2" and k in folded:
            continue
        assert torch.equal(got[k], ref[k]), k
    if kind == "dinov2":   # timm folds the class position into cls_token; here it comes back with a zero position
        assert torch.equal(got["embeddings.cls_token"], timm["cls_token"])
        assert torch.equal(got["embeddings.position_embeddings"][:, 1:], ref["embeddings.position_embeddings"][:, 1:])
        assert not got["embeddings.position_embeddings"][:, 0].any()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, b = model(x, output_hidden_states=True), loaded(x, output_hidden_states=True)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(ha, hb, rtol=1e-5, atol=1e-5)
    if kind == "siglip":
        torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=1e-5, atol=1e-5)
    back = transformers_to_timm(kind, loaded.state_dict())
    assert set(back) == set(timm) and all(torch.allclose(back[k], timm[k], atol=1e-7) for k in timm)


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("blocks.1.attn.qkv.bias"), "blocks.1.attn.qkv.bias"),
    (lambda s: s.__setitem__("blocks.0.attn.extra", torch.zeros(1)), "blocks.0.attn.extra"),
    (lambda s: s.pop("norm_pre.weight"), "norm_pre.weight"),
])
def test_timm_layout_errors_name_the_key(edit, needle):
    timm = handwritten_timm("clip", tiny_tower_model("clip"))
    edit(timm)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        model_from_timm("clip", timm, num_heads=4)


def test_clip_projection_head_of_timm_weights_is_skipped():
    model = tiny_tower_model("clip")
    timm = handwritten_timm("clip", model)
    timm["head.weight"] = torch.randn(16, 32)
    loaded = model_from_timm("clip", timm, num_heads=4)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", ["dinov2", "siglip", "clip"])
def test_transformers_folders_load_every_tensor(kind, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_tower_model(kind, seed=11)
    save_vit_model(kind, model, tmp_path / "t")
    saved = load_file(tmp_path / "t" / "model.safetensors")
    if kind == "dinov2":   # the public layout, with the pre-v5 attention names
        assert "encoder.layer.0.attention.attention.query.weight" in saved
    else:                  # a dual-encoder folder: vision_model.* and a text half
        assert any(k.startswith("text_model.") for k in saved) and any(k.startswith("vision_model.") for k in saved)
    loaded = load_vit_model(kind, tmp_path / "t")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    key = next(k for k in saved if "mlp.fc1.bias" in k and ".1." in k)
    del saved[key]
    save_file(saved, tmp_path / "t" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing keys .*mlp.fc1.bias"):
        load_vit_model(kind, tmp_path / "t")
    data = (tmp_path / "t" / "model.safetensors").read_bytes()
    (tmp_path / "t" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot load the {kind} tower"):
        load_vit_model(kind, tmp_path / "t")


def test_transformers_folder_with_a_stray_vision_key_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    save_vit_model("siglip", tiny_tower_model("siglip"), tmp_path / "s")
    saved = load_file(tmp_path / "s" / "model.safetensors")
    saved["vision_model.encoder.extra.weight"] = torch.zeros(3)
    save_file(saved, tmp_path / "s" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected keys .*encoder.extra.weight"):
        load_vit_model("siglip", tmp_path / "s")


def test_timm_folder_and_file_load(tmp_path):
    from safetensors.torch import save_file

    model = tiny_tower_model("dinov2", seed=5, image_size=70)
    timm = {k: v.contiguous() for k, v in handwritten_timm("dinov2", model).items()}
    folder = tmp_path / "timm_dino"
    folder.mkdir()
    save_file(timm, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_large_patch14_reg4_dinov2",
                                                    "num_classes": 0, "model_args": {"num_heads": 4}}))
    loaded = load_vit_model("dinov2", folder, image_size=56)               # resampled 5 x 5 -> 4 x 4 positions
    reference = tiny_tower_model("dinov2", seed=5, image_size=70)
    resample_dinov2_positions_(reference, 56)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, reference(x).last_hidden_state, rtol=1e-5,
                                   atol=1e-5)
    save_file(timm, tmp_path / "dino.safetensors")
    from_file = load_vit_model("dinov2", tmp_path / "dino.safetensors", num_heads=4)
    assert all(torch.equal(from_file.state_dict()[k], v) for k, v in
               model_from_timm("dinov2", timm, num_heads=4).state_dict().items())
    save_vit_model("clip", tiny_tower_model("clip"), tmp_path / "c")
    with pytest.raises(ValueError, match="only DINOv2"):
        load_vit_model("clip", tmp_path / "c", image_size=70)
    with pytest.raises(CheckpointError, match="not found"):
        load_vit_model("clip", tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ MambaVLM
def test_prepare_puts_visual_tokens_first_and_no_bos():
    vlm = small_vlm()
    img, question = make_image(0), "What is in the image?"
    prep = vlm.prepare(img, question)
    prompt = "Q: What is in the image? A:"
    ids = vlm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert vlm.tokenizer(prompt)["input_ids"] == [EOS] + ids                # the tokenizer would add a BOS...
    assert prep.prompts == [prompt] and prep.text_ids == [ids]              # ...the model does not
    assert ids[0] != EOS
    nv = 16
    assert prep.num_visual == nv and prep.grid == (4, 4)
    assert prep.inputs_embeds.shape == (1, nv + len(ids), 32)
    assert prep.is_visual[0].tolist() == [True] * nv + [False] * len(ids)
    assert prep.attention_mask.all()
    with torch.no_grad():
        visual = vlm.projector(vlm.vision(vlm.vision.preprocess(img)))
        text = vlm.lm.backbone.embedding(torch.tensor(ids))
    torch.testing.assert_close(prep.inputs_embeds[0, :nv], visual[0], rtol=0, atol=0)
    torch.testing.assert_close(prep.inputs_embeds[0, nv:], text, rtol=0, atol=0)
    assert prep.images.shape == (1, 3, 56, 56) and 0 <= prep.images.min() and prep.images.max() <= 1


def test_positions_and_padding_seen_by_a_pruner():
    vlm = small_vlm()
    seen = []

    def record(seq):
        if seq.layer == -1:
            seen.append(seq)

    prep = vlm.prepare([make_image(0), make_image(1)], ["Is there a dog?", "How many people are in the picture?"])
    vlm.prefill(prep, pruner=record)
    seq = seen[0]
    assert prep.batch_size == 2
    short, long = len(prep.text_ids[0]), len(prep.text_ids[1])
    pad = long - short
    assert pad > 0 and prep.attention_mask[0].tolist() == [False] * pad + [True] * (16 + short)
    assert seq.positions[0].tolist() == [-1] * pad + list(range(16 + short))
    assert seq.positions[1].tolist() == list(range(16 + long))
    assert seq.is_visual[0].tolist() == [False] * pad + [True] * 16 + [False] * short
    assert (seq.positions[seq.is_visual] < 16).all()                       # visual token i is patch i


def test_batch_with_different_question_lengths_equals_one_by_one():
    vlm = small_vlm(seed=1)
    imgs = [make_image(5), make_image(6, (90, 140))]
    qs = ["Is there a dog?", "How many people are in the picture? Answer the question."]
    batch_ids = vlm.generate(imgs, qs, max_new_tokens=6, eos_token_id=None)
    prep = vlm.prepare(imgs, qs)
    logits = vlm.prefill(prep).logits
    for i in range(2):
        single = vlm.generate(imgs[i], qs[i], max_new_tokens=6, eos_token_id=None)
        assert single[0].tolist() == batch_ids[i].tolist()
        torch.testing.assert_close(vlm.prefill(vlm.prepare(imgs[i], qs[i])).logits[0], logits[i], rtol=1e-4,
                                   atol=1e-4)
    assert vlm.answer(imgs, qs) == [vlm.answer(imgs[0], qs[0]), vlm.answer(imgs[1], qs[1])]


def test_answer_with_a_keep_everything_pruner_is_unchanged():
    vlm = small_vlm(seed=2)
    img, q = make_image(7), "What color is the cup?"
    plain = vlm.answer(img, q)
    assert isinstance(plain, str)
    keep = KeepAll()
    assert vlm.answer(img, q, pruner=keep) == plain
    assert keep.starts == 1 and keep.calls == vlm.lm.config.n_layer + 1   # before layer 0 and after each layer
    assert vlm.answer(img, q, pruner=lambda seq: None) == plain
    torch.testing.assert_close(vlm.prefill(vlm.prepare(img, q), pruner=KeepAll()).logits,
                               vlm.prefill(vlm.prepare(img, q)).logits, rtol=0, atol=0)
    out = vlm.answer([img], [q])
    assert out == [plain]


def test_a_pruner_that_drops_visual_tokens_keeps_their_patch_positions():
    vlm = small_vlm(seed=3)

    def drop_odd_patches_after_layer_0(seq):
        if seq.layer == 0:
            return seq.select(~(seq.is_visual & (seq.positions % 2 == 1)))

    prep = vlm.prepare(make_image(8), "Is there a dog?")
    out = vlm.prefill(prep, pruner=drop_odd_patches_after_layer_0)
    n_text = len(prep.text_ids[0])
    assert out.tokens_per_layer == [16 + n_text, 8 + n_text, 8 + n_text]
    kept = out.sequence.positions[out.sequence.is_visual].tolist()
    assert kept == list(range(0, 16, 2))
    rows, cols = prep.grid
    assert [(p // cols, p % cols) for p in kept][:3] == [(0, 0), (0, 2), (1, 0)]


def test_generation_options_and_decoding():
    vlm = small_vlm(seed=4)
    img, q = make_image(9), "Is there a dog?"
    ids = vlm.generate(img, q, max_new_tokens=3, eos_token_id=None)
    assert ids.shape == (1, 3)
    with pytest.raises(ValueError, match="unknown generation option.*beams"):
        vlm.generate(img, q, beams=2)
    a, b = ids[0, 0].item(), ids[0, 1].item()
    text = vlm.decode(torch.tensor([[a, b, EOS, EOS, a]]))
    assert text == [vlm.tokenizer.decode([a, b], skip_special_tokens=True).strip()]
    assert vlm.spec.generation_defaults()["max_new_tokens"] == 5
    assert vlm.generate(img, q, eos_token_id=None).shape == (1, 5)       # the spec's budget


def test_bad_inputs_are_clear_errors():
    vlm = small_vlm()
    img = make_image(0)
    with pytest.raises(ValueError, match="2 image.*1 question"):
        vlm.prepare(vlm.vision.preprocess([img, img]), ["one question"])
    with pytest.raises(ValueError, match="one question goes with one image"):
        vlm.prepare([img, img], "one question")
    with pytest.raises(ValueError, match="questions must be"):
        vlm.prepare([img], [3])
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="projector gives 16"):
        MambaVLM(vlm.vision, MLPProjector(32, 16), vlm.lm, tok, SPEC)
    with pytest.raises(ValueError, match="projector takes 8"):
        MambaVLM(vlm.vision, MLPProjector(8, 32), vlm.lm, tok, SPEC)
    with pytest.raises(ValueError, match="no token '</s>'"):
        MambaVLM(vlm.vision, vlm.projector, vlm.lm, tok, VLMSpec(name="x", prompt_template="{question}",
                                                                 eos_token="</s>"))


def test_spec_prompts_and_budgets():
    spec = VLMSpec(name="x", prompt_template="Question:{question} Answer:", task_max_new_tokens={"pope": 2})
    assert spec.prompt("Is it {red}?") == "Question:Is it {red}? Answer:"
    assert VLMSpec(name="y", prompt_template=str.upper).prompt("abc") == "ABC"
    assert spec.max_new_tokens_for("pope") == 2 and spec.max_new_tokens_for("gqa") == 128
    with pytest.raises(ValueError, match="string"):
        spec.prompt(None)


# ------------------------------------------------------------------------------------------------ registry
def test_registry():
    assert {"cobra", "robomamba"} <= set(available_models())
    with pytest.raises(ValueError, match="unknown model 'nope'.*cobra"):
        load_model("nope")

    @register_model("toy-test-model")
    def build_toy(x, scale=1):
        return x * scale

    try:
        assert load_model("toy-test-model", 3, scale=2) == 6 and "toy-test-model" in available_models()
        with pytest.raises(ValueError, match="already registered"):
            register_model("toy-test-model")(lambda: None)
    finally:
        registry._LOADERS.pop("toy-test-model")
    with pytest.raises(ValueError, match="non-empty string"):
        register_model("")
