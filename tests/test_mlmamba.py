"""ML-Mamba: the released checkpoint layout written small and loaded back; the bidirectional Mamba-2 connector
against a sequential forward-plus-flipped computation written here; Cobra's prompt and 729-token layout; pruning."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from mambaprune.models import CheckpointError, available_models, load_model  # noqa: E402
from mambaprune.models.bimamba2 import BidirectionalMamba2, bimamba2_config  # noqa: E402
from mambaprune.models.checkpoints import mamba2_config_from_mixer, mamba_config_from_state  # noqa: E402
from mambaprune.models.cobra import cobra_vqa_prompt  # noqa: E402
from mambaprune.models.mamba_lm import MambaConfig, MambaLM  # noqa: E402
from mambaprune.models.mlmamba import (MLMAMBA_SPEC, load_mlmamba, random_mlmamba,  # noqa: E402
                                       save_mlmamba)
from mambaprune.pruning import build  # noqa: E402
from test_hub import folder_files, lay_out_hf_cache, offline  # noqa: E402,F401  (offline: a fixture)
from test_vlm import make_image, make_tokenizer  # noqa: E402

QUESTION = "What is the man holding?"


# ------------------------------------------------------------------------------------------ the reference
def _conv_loop(x, weight, bias):
    """Depthwise causal conv, one output step at a time: y_t = b + sum_j w_j x_{t-(k-1)+j} (x = 0 before 0)."""
    k, L = weight.shape[-1], x.shape[1]
    y = torch.zeros_like(x)
    for t in range(L):
        y[:, t] = bias
        for j in range(k):
            s = t - (k - 1) + j
            if s >= 0:
                y[:, t] += weight[:, 0, j] * x[:, s]
    return y


def _direction_loop(zxbcdt, z, mixer, suffix, dims):
    """One direction of mamba2.py's v2 forward (WenjunHuang94/mamba ``mamba_ssm/modules/mamba2.py`` l.202-245; the
    backward one on the whole in_proj output flipped, l.224; the two averaged, l.243), in its own time order, as a
    loop over time and heads:
    conv + SiLU, h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t^T, y_t = h_t C_t + D x_t, then norm(y * silu(z))."""
    d_inner, g, n, h, p = dims
    conv = getattr(mixer, "conv1d" + suffix)
    xBC = zxbcdt[..., d_inner:2 * d_inner + 2 * g * n]
    dt = zxbcdt[..., 2 * d_inner + 2 * g * n:]
    xBC = F.silu(_conv_loop(xBC, conv.weight.double(), conv.bias.double()))
    x, B, C = xBC[..., :d_inner], xBC[..., d_inner:d_inner + g * n], xBC[..., d_inner + g * n:]
    A = -torch.exp(getattr(mixer, "A_log" + suffix).double())
    D = getattr(mixer, "D" + suffix).double()
    dt_bias = getattr(mixer, "dt_bias" + suffix).double()
    b, L = x.shape[:2]
    y = torch.zeros(b, L, h, p, dtype=torch.float64)
    state = torch.zeros(b, h, p, n, dtype=torch.float64)
    for t in range(L):
        for head in range(h):
            grp = head // (h // g)
            delta = F.softplus(dt[:, t, head] + dt_bias[head])                        # (b,)
            xt = x[:, t, head * p:(head + 1) * p]                                      # (b, p)
            Bt, Ct = B[:, t, grp * n:(grp + 1) * n], C[:, t, grp * n:(grp + 1) * n]     # (b, n)
            state[:, head] = (torch.exp(delta * A[head])[:, None, None] * state[:, head]
                              + delta[:, None, None] * xt[:, :, None] * Bt[:, None, :])
            y[:, t, head] = (state[:, head] * Ct[:, None, :]).sum(-1) + D[head] * xt
    gated = y.reshape(b, L, h * p) * F.silu(z)
    size = d_inner // g
    out = torch.cat([part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5)
                     for part in gated.split(size, dim=-1)], dim=-1)
    return out * mixer.norm.weight.double()


def _mixer_loop(mixer, u, cfg):
    d_inner = cfg.expand * cfg.d_model
    dims = (d_inner, cfg.ngroups, cfg.d_state, d_inner // cfg.headdim, cfg.headdim)
    zxbcdt = u @ mixer.in_proj.weight.double().T
    z = zxbcdt[..., :d_inner]
    forward = _direction_loop(zxbcdt, z, mixer, "", dims)
    backward = _direction_loop(zxbcdt.flip(1), z.flip(1), mixer, "_b", dims).flip(1)
    return ((forward + backward) / 2) @ mixer.out_proj.weight.double().T


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * norm.weight.double() + norm.bias.double()


def _stack_loop(stack, u):
    """Bidirectional_Mamba (WenjunHuang94/mamba ``mamba_ssm/models/mixer_seq_simple.py`` l.232-316): per block
    h + mixer(h) (no norm first), then h + w3(silu(w1 n) * w2 n), n = LN(h) (``modules/block.py`` l.61-64,
    92-96); a final LayerNorm (l.288)."""
    h = u.double()
    for block in stack.layers:
        h = h + _mixer_loop(block.mixer, h, stack.config)
        n = _layer_norm(h, block.norm)
        mlp = block.mlp
        lin = [(w.weight.double(), w.bias.double()) for w in (mlp.w1, mlp.w2, mlp.w3)]
        h = h + (F.silu(n @ lin[0][0].T + lin[0][1]) * (n @ lin[1][0].T + lin[1][1])) @ lin[2][0].T + lin[2][1]
    return _layer_norm(h, stack.norm_f)


def _random_stack(seed, **fields):
    cfg = bimamba2_config(**{"d_model": 16, "d_state": 4, "headdim": 8, "chunk_size": 4, **fields})
    torch.manual_seed(seed)
    stack = BidirectionalMamba2(cfg)
    with torch.no_grad():
        for name, p in stack.named_parameters():                      # every tensor away from its initial value
            if name.endswith(("A_log", "A_log_b")):
                p.copy_(torch.empty_like(p).uniform_(0.0, 1.5))
            elif name.endswith(("dt_bias", "dt_bias_b")):
                p.copy_(torch.empty_like(p).uniform_(-3.0, 0.5))
            else:
                p.add_(torch.randn_like(p) * 0.3)
    return stack.eval()


@pytest.mark.parametrize("ngroups, length", [(1, 11), (2, 9)])
def test_bidirectional_mamba2_equals_the_sequential_forward_plus_flipped_computation(ngroups, length):
    stack = _random_stack(3, ngroups=ngroups)
    u = torch.randn(2, length, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = stack(u)
    torch.testing.assert_close(got.double(), _stack_loop(stack, u), rtol=1e-4, atol=1e-5)


def test_swapping_the_two_directions_mirrors_the_output_in_time():
    """With the forward and backward parameters exchanged, the stack run on the reversed sequence gives the
    reversed output (the directions are summed symmetrically, and each sees its own order)."""
    stack = _random_stack(5)
    mirror = _random_stack(5)
    with torch.no_grad():
        for src, dst in zip(stack.layers, mirror.layers):
            for a, b in (("conv1d", "conv1d_b"), ("dt_bias", "dt_bias_b"), ("A_log", "A_log_b"), ("D", "D_b")):
                for x, y in ((a, b), (b, a)):
                    target, source = getattr(dst.mixer, y), getattr(src.mixer, x)
                    if isinstance(target, torch.nn.Conv1d):
                        target.weight.copy_(source.weight)
                        target.bias.copy_(source.bias)
                    else:
                        target.copy_(source)
        u = torch.randn(1, 10, 16)
        torch.testing.assert_close(mirror(u.flip(1)), stack(u).flip(1), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(stack(u.flip(1)), stack(u).flip(1), atol=1e-3)   # the directions differ


def test_released_connector_shapes():
    """The mamba2-2.7b config makes the released tensor shapes (read from mamba2.py / block.py, on the meta device)."""
    with torch.device("meta"):
        stack = BidirectionalMamba2(bimamba2_config(d_model=2560))
    shapes = {k: tuple(v.shape) for k, v in stack.state_dict().items()}
    assert shapes["layers.1.mixer.in_proj.weight"] == (2 * 5120 + 2 * 128 + 80, 2560)
    assert shapes["layers.1.mixer.conv1d_b.weight"] == (5120 + 2 * 128, 1, 4)
    assert shapes["layers.0.mixer.A_log_b"] == (80,) and shapes["layers.0.mixer.norm.weight"] == (5120,)
    assert shapes["layers.0.mixer.out_proj.weight"] == (2560, 5120) and shapes["layers.0.mlp.w2.weight"] == (2560, 2560)
    assert shapes["norm_f.bias"] == (2560,) and len(stack.layers) == 2
    back = mamba2_config_from_mixer(stack.state_dict(), "layers.0.mixer.", "meta", n_layer=2)
    assert (back.d_model, back.d_state, back.headdim, back.ngroups, back.expand, back.d_conv) == \
        (2560, 128, 64, 1, 2, 4)


def test_the_mamba2_llm_shape_is_read_from_its_tensors():
    """mamba2-2.7b's tensors (on the meta device, tied lm_head left out as a state may leave it) give its config."""
    with torch.device("meta"):
        lm = MambaLM(MambaConfig(layer="Mamba2", d_model=2560, n_layer=64, vocab_size=50277, d_state=128,
                                 pad_vocab_size_multiple=16))
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    assert state["backbone.embedding.weight"].shape == (50288, 2560)
    assert state["backbone.layers.63.mixer.in_proj.weight"].shape == (10576, 2560)
    cfg = mamba_config_from_state(state, "meta")
    assert (cfg.layer, cfg.d_model, cfg.n_layer, cfg.d_state, cfg.headdim, cfg.ngroups, cfg.expand, cfg.d_ssm,
            cfg.padded_vocab_size, cfg.tie_embeddings) == ("Mamba2", 2560, 64, 128, 64, 1, 2, None, 50288, True)


# ------------------------------------------------------------------------------------------ the model
def make_mamba2_lm(seed=4, layers=3, width=32):
    """A random Mamba-2 LM (vocabulary 304, a multiple of 16 as mamba2's padding) with the tokenizer's ids."""
    torch.manual_seed(seed)
    lm = MambaLM(MambaConfig(layer="Mamba2", d_model=width, n_layer=layers, vocab_size=304, d_state=8, headdim=8,
                             chunk_size=16, pad_vocab_size_multiple=16))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(0.0, 1.5))
            elif p.dim() == 1 and not name.endswith("dt_bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return lm.eval()


@pytest.fixture(scope="module")
def mlmamba():
    """A random ML-Mamba at the released resolution (384 px, 27 x 27 patches), 32 wide."""
    return random_mlmamba(make_mamba2_lm(), make_tokenizer(), seed=1)


@pytest.fixture(scope="module")
def files(mlmamba, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlmamba")
    dirs = {"checkpoint": root / "ML-Mamba", "dino_dir": root / "dinov2-with-registers-large",
            "siglip_dir": root / "siglip-so400m-patch14-384", "tokenizer_dir": root / "tokenizer"}
    save_mlmamba(mlmamba, dirs["checkpoint"], dino_dir=dirs["dino_dir"], siglip_dir=dirs["siglip_dir"],
                 tokenizer_dir=dirs["tokenizer_dir"])
    return dirs


def load(files, **changes):
    args = {**files, **changes}
    return load_mlmamba(args.pop("checkpoint"), **args)


def _bimamba_keys(n_layer=2):
    """The state-dict names of the fork's Bidirectional_Mamba (mixer_seq_simple.py, block.py, mamba2.py v2)."""
    mixer = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "conv1d_b.weight",
             "conv1d_b.bias", "dt_bias_b", "A_log_b", "D_b", "norm.weight", "out_proj.weight"]
    keys = {"norm_f.weight", "norm_f.bias"}
    for i in range(n_layer):
        keys |= {f"layers.{i}.norm.weight", f"layers.{i}.norm.bias"}
        keys |= {f"layers.{i}.mixer.{k}" for k in mixer}
        keys |= {f"layers.{i}.mlp.w{j}.{p}" for j in (1, 2, 3) for p in ("weight", "bias")}
    return keys


def test_checkpoint_has_the_released_layout(files):
    ckpt = torch.load(files["checkpoint"] / "latest-checkpoint.pt", weights_only=True)
    assert list(ckpt) == ["model"] and list(ckpt["model"]) == ["llm_backbone", "mlp", "bidirectional_mamba",
                                                              "projector"]
    parts = ckpt["model"]
    assert set(parts["mlp"]) == {"0.weight", "0.bias"} and parts["mlp"]["0.weight"].shape == (32, 80)
    assert set(parts["projector"]) == {f"projector.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert parts["projector"]["projector.0.weight"].shape == (128, 32)            # 4 x the LLM width
    assert set(parts["bidirectional_mamba"]) == _bimamba_keys()
    llm = set(parts["llm_backbone"])
    assert {"backbone.embedding.weight", "lm_head.weight", "backbone.norm_f.weight", "backbone.layers.0.norm.weight",
            "backbone.layers.2.mixer.dt_bias", "backbone.layers.2.mixer.norm.weight"} <= llm
    assert all(k.startswith(("backbone.", "lm_head.")) for k in llm)


def test_load_puts_every_tensor_in_place_and_answers_the_same(mlmamba, files):
    loaded = load_model("mlmamba", files["checkpoint"], dino_dir=files["dino_dir"], siglip_dir=files["siglip_dir"],
                        tokenizer_dir=files["tokenizer_dir"])
    parts = torch.load(files["checkpoint"] / "latest-checkpoint.pt", weights_only=True)["model"]
    connector = loaded.projector
    for part, module, strip in (("llm_backbone", loaded.lm, ""), ("mlp", connector.mlp, ""),
                                ("bidirectional_mamba", connector.bidirectional_mamba, ""),
                                ("projector", connector.projector, "projector.")):
        state = module.state_dict()
        assert len(state) == len(parts[part]), part
        for key, value in parts[part].items():
            assert torch.equal(state[key[len(strip):]], value), (part, key)
    fields = ("layer", "d_model", "n_layer", "d_state", "headdim", "ngroups", "expand", "d_conv", "padded_vocab_size",
              "tie_embeddings")
    assert [getattr(loaded.lm.config, f) for f in fields] == [getattr(mlmamba.lm.config, f) for f in fields]
    assert loaded.projector.bidirectional_mamba.config.headdim == 8 and loaded.projector.projector.hidden_dim == 128
    for name in ("dino", "siglip"):
        got, ref = loaded.vision.towers[name].model.state_dict(), mlmamba.vision.towers[name].model.state_dict()
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), name
    img = make_image(1, (300, 400))
    answer = loaded.answer(img, QUESTION, max_new_tokens=5)
    assert isinstance(answer, str) and answer == mlmamba.answer(img, QUESTION, max_new_tokens=5)


@pytest.mark.parametrize("layout", ["file", "run_folder", "llm_prefix"])
def test_other_checkpoint_forms_load_the_same_tensors(mlmamba, files, tmp_path, layout):
    src = files["checkpoint"] / "latest-checkpoint.pt"
    if layout == "file":
        target = tmp_path / "model.pt"
        shutil.copy(src, target)
    elif layout == "run_folder":
        target = tmp_path / "run"
        save_mlmamba(mlmamba, target, run_folder=True)
        cfg = json.loads((target / "config.json").read_text())["model"]
        assert (cfg["model_id"], cfg["llm_backbone_id"], cfg["arch_specifier"]) == \
            ("mlmamba+3b", "mamba2-2.7b", "no-align+fused-gelu-mlp")
        assert (target / "checkpoints" / "latest-checkpoint.pt").is_file()
    else:
        target = tmp_path / "prefixed.pt"
        obj = torch.load(src, weights_only=True)
        obj["model"]["llm_backbone"] = {f"llm.{k}": v for k, v in obj["model"]["llm_backbone"].items()}
        torch.save(obj, target)
    loaded = load(files, checkpoint=target)
    ref = mlmamba.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def _edited(files, tmp_path, edit):
    obj = torch.load(files["checkpoint"] / "latest-checkpoint.pt", weights_only=True)
    edit(obj["model"])
    path = tmp_path / "latest-checkpoint.pt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["llm_backbone"].pop("backbone.layers.1.mixer.D"), r"missing keys \['backbone\.layers\.1\.mixer\.D'\]"),
    (lambda m: m["llm_backbone"].__setitem__("backbone.layers.0.mixer.extra", torch.zeros(2)),
     r"unexpected keys \['backbone\.layers\.0\.mixer\.extra'\]"),
    (lambda m: m["bidirectional_mamba"].pop("layers.1.mixer.A_log_b"),
     r"bidirectional_mamba\).*missing keys \['layers\.1\.mixer\.A_log_b'\]"),
    (lambda m: m["bidirectional_mamba"].__setitem__("layers.0.mixer.D_b", torch.zeros(3)),
     r"mis-shaped tensors \['layers\.0\.mixer\.D_b: checkpoint \(3,\) vs model \(8,\)'\]"),
    (lambda m: m["bidirectional_mamba"].__setitem__("layers.0.mlp.w4.weight", torch.zeros(2)),
     r"unexpected keys \['layers\.0\.mlp\.w4\.weight'\]"),
    (lambda m: m["mlp"].pop("0.bias"), r"model\.mlp\).*missing keys \['0\.bias'\]"),
    (lambda m: m["projector"].pop("projector.4.bias"), r"missing keys \['4\.bias'\]"),
    (lambda m: m.pop("bidirectional_mamba"), "missing part 'bidirectional_mamba'"),
    (lambda m: m["mlp"].update({"0.weight": torch.zeros(16, 80), "0.bias": torch.zeros(16)}),
     r"the mlp gives 16 channels, the bidirectional Mamba-2 takes 32 and the projector 32"),
])
def test_bad_checkpoint_contents_name_the_problem_in_one_line(files, tmp_path, edit, needle):
    with pytest.raises(CheckpointError, match=needle) as info:
        load(files, checkpoint=_edited(files, tmp_path, edit))
    assert "\n" not in str(info.value)


def test_missing_arguments_and_files_say_what_goes_there(files, tmp_path):
    with pytest.raises(CheckpointError, match=r"mlmamba needs checkpoint.*huangwenjun1994/ML-Mamba"):
        load_mlmamba(dino_dir=files["dino_dir"], siglip_dir=files["siglip_dir"], tokenizer_dir=files["tokenizer_dir"])
    with pytest.raises(CheckpointError, match=r"holds no ML-Mamba checkpoint.*latest-checkpoint\.pt"):
        load(files, checkpoint=tmp_path)
    cobra_like = _edited(files, tmp_path, lambda m: [m.pop(k) for k in ("mlp", "bidirectional_mamba")])
    with pytest.raises(CheckpointError, match="missing part 'mlp'"):
        load(files, checkpoint=cobra_like)


def test_registered_without_importing_the_module():
    code = "from mambaprune.models import available_models; print(available_models())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'mlmamba'" in out and "mlmamba" in available_models()


def test_bf16_model_runs_close_to_fp32(mlmamba, files):
    loaded = load(files, dtype=torch.bfloat16)
    assert loaded.projector.bidirectional_mamba.layers[1].mixer.D_b.dtype == torch.bfloat16
    prep = loaded.prepare(make_image(4), QUESTION)
    out = loaded.prefill(prep)
    assert torch.isfinite(out.logits.float()).all()
    with torch.no_grad():
        features = mlmamba.vision(prep.pixels)
        ref = mlmamba.projector.bidirectional_mamba(mlmamba.projector.mlp(features))
        got = loaded.projector.bidirectional_mamba(loaded.projector.mlp(features.bfloat16()))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.1)


def test_sequence_layout_729_visual_tokens_then_cobras_prompt(mlmamba):
    prep = mlmamba.prepare(make_image(0, (500, 333)), QUESTION)
    ids = mlmamba.tokenizer(cobra_vqa_prompt(QUESTION), add_special_tokens=False)["input_ids"]
    assert MLMAMBA_SPEC.prompt(QUESTION) == cobra_vqa_prompt(QUESTION) and MLMAMBA_SPEC.protocol == "cobra"
    assert prep.grid == (27, 27) and prep.num_visual == 729 and mlmamba.vision.dim == 80
    assert prep.text_ids == [ids] and prep.inputs_embeds.shape == (1, 729 + len(ids), 32)
    assert prep.is_visual[0, :729].all() and not prep.is_visual[0, 729:].any()
    assert ids.count(0) == 1                          # the <|endoftext|> inside the template, no BOS in front
    with torch.no_grad():
        features = mlmamba.vision(prep.pixels)
        visual = mlmamba.projector(features)             # mlp -> bidirectional Mamba-2 -> projector
    torch.testing.assert_close(prep.inputs_embeds[0, :729], visual[0])


def test_generate_with_dtp_prunes_inside_the_mamba2_llm(mlmamba):
    img = make_image(2)
    n_text = len(mlmamba.prepare(img, QUESTION).text_ids[0])
    timings = {}
    ids = mlmamba.generate(img, QUESTION, pruner=build("dtp", keep_ratio=0.5, early_layer=0, late_layer=2),
                           timings=timings, max_new_tokens=4, eos_token_id=None)
    assert ids.shape == (1, 4) and int(ids.max()) < 304
    assert timings["tokens_per_layer"] == [729 + n_text, math.floor(729 * 0.5 + 0.5) + n_text, n_text]
    keep_all = build("dtp", keep_ratio=1.0, early_layer=0, late_pruning=False)
    assert mlmamba.answer(img, QUESTION, pruner=keep_all, max_new_tokens=4) == \
        mlmamba.answer(img, QUESTION, max_new_tokens=4)


def test_loads_by_repo_ids_from_the_hub_cache(mlmamba, files, offline):
    """``huangwenjun1994/ML-Mamba`` holds ``latest-checkpoint.pt`` at its root (what ``mlmamba.load`` downloads)."""
    lay_out_hf_cache(offline, "huangwenjun1994/ML-Mamba", {**folder_files(files["checkpoint"]),
                                                          "README.md": b""})
    lay_out_hf_cache(offline, "facebook/dinov2-with-registers-large", folder_files(files["dino_dir"]))
    lay_out_hf_cache(offline, "google/siglip-so400m-patch14-384", folder_files(files["siglip_dir"]))
    lay_out_hf_cache(offline, "xiuyul/mamba-2.8b-zephyr", folder_files(files["tokenizer_dir"]))
    loaded = load_model("mlmamba", "huangwenjun1994/ML-Mamba", dino_dir="facebook/dinov2-with-registers-large",
                        siglip_dir="google/siglip-so400m-patch14-384", tokenizer_dir="xiuyul/mamba-2.8b-zephyr")
    want, got = mlmamba.state_dict(), loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
