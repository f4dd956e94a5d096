"""What a new user runs into, each as one line on stderr (``mambaprune <command>: error: ...``, exit status 2) and
no traceback: a policy contradicted by --method/--param, a missing data folder or annotation file, a device the
machine does not have, a model's folders left out or not there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mambaprune.cli import main
from mambaprune.models import CheckpointError, load_model

FORBIDDEN = "runner_fixture_model:load_forbidden"      # raises RuntimeError if the model is loaded


def one_line(capsys, command: str) -> str:
    """The single stderr line of a failed command, without its ``mambaprune <command>: error: `` prefix."""
    err = capsys.readouterr().err
    prefix = f"mambaprune {command}: error: "
    assert err.startswith(prefix) and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err[len(prefix):-1]


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"method": "dtp", "params": {"keep_ratio": 0.5, "early_layer": 2}}))
    return path


def eval_args(tmp_path, *flags):
    return ["eval", "--model", FORBIDDEN, "--data", "synthvqa", "--data-root", str(tmp_path),
            "--out", str(tmp_path / "run"), "--no-progress", *flags]


# --- (a) --policy with a contradicting --method / --param ------------------------------------------------------------

def test_policy_contradicted_by_method_is_an_error(tmp_path, capsys, policy):
    assert main(eval_args(tmp_path, "--method", "none", "--policy", str(policy))) == 2
    assert one_line(capsys, "eval") == (f"--method none contradicts --policy {policy}, whose method is 'dtp': give "
                                        "one of them")


def test_policy_contradicted_by_param_is_an_error(tmp_path, capsys, policy):
    assert main(eval_args(tmp_path, "--policy", str(policy), "--param", "keep_ratio=0.3")) == 2
    assert one_line(capsys, "eval") == (f"--param keep_ratio=0.3 (the policy has 0.5) contradicts --policy {policy}: "
                                        "leave the policy's parameters as planned, or give --method and --param "
                                        "without --policy")


def test_policy_with_agreeing_or_added_flags_is_fine(tmp_path, policy):
    import argparse

    from mambaprune.eval.cli import add_eval_arguments, config_from_args

    def config(*flags):
        args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
            ["--model", "m", "--data", "gqa", "--data-root", "/d", "--out", "/o", "--policy", str(policy), *flags])
        return config_from_args(args)

    assert (config().method, config().params) == ("dtp", {"keep_ratio": 0.5, "early_layer": 2})
    cfg = config("--method", "dtp", "--param", "keep_ratio=0.5", "--param", "seed=3")
    assert (cfg.method, cfg.params) == ("dtp", {"keep_ratio": 0.5, "early_layer": 2, "seed": 3})
    # a config file's method is not a flag: the policy replaces it, as before
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"method": "fastv", "params": {"layer": 2}}))
    cfg = config("--config", str(cfg_file))
    assert (cfg.method, cfg.params) == ("dtp", {"keep_ratio": 0.5, "early_layer": 2})


def test_the_console_command_exits_2_without_a_traceback(tmp_path, policy):
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(Path(__file__).parent)])}
    proc = subprocess.run([sys.executable, "-m", "mambaprune.cli", *eval_args(tmp_path, "--method", "none",
                                                                             "--policy", str(policy))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("mambaprune eval: error: --method none contradicts --policy")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mambaprune.cli", *eval_args(tmp_path, "--method", "none",
                                                                             "--policy", str(policy))],
                          capture_output=True, text=True, env={**env, "MAMBAPRUNE_TRACEBACK": "1"}, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError" in proc.stderr


# --- (b) a missing data folder or annotation file --------------------------------------------------------------------

def test_missing_data_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    flags = ["--model", FORBIDDEN, "--data", "pope", "--data-root", str(missing), "--out", str(tmp_path / "run"),
             "--no-progress"]
    assert main(["eval", *flags]) == 2
    line = one_line(capsys, "eval")
    assert line.startswith(f"data folder for 'pope' not found: {missing}")
    for command in ("calibrate", "analyze"):
        extra = ["--out", str(tmp_path / "figs")] if command == "analyze" else []
        assert main([command, "--data", "pope", "--data-root", str(missing), *extra]) == 2
        assert one_line(capsys, command) == line


def test_missing_annotation_file_names_the_files_expected(tmp_path, capsys):
    root = tmp_path / "pope"
    root.mkdir()
    assert main(["eval", "--model", FORBIDDEN, "--data", "pope", "--split", "random", "--data-root", str(root),
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    line = one_line(capsys, "eval")
    assert "coco_pope_random.json" in line and "not found" in line and str(root) in line


# --- (c) a device this machine does not have -------------------------------------------------------------------------

@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


CUDA_LINE = ("--device cuda: torch reports no CUDA device (torch.cuda.is_available() is False); use --device cpu")


def test_cuda_without_cuda_is_one_line_before_anything_loads(tmp_path, capsys, no_cuda):
    from mambaprune.data.synthvqa import SynthConfig, generate_synthvqa

    generate_synthvqa(tmp_path / "synth", SynthConfig(per_family=1, train_multiplier=1))
    assert main(["eval", "--model", FORBIDDEN, "--data", "synthvqa", "--data-root", str(tmp_path / "synth"),
                 "--out", str(tmp_path / "run"), "--device", "cuda", "--no-progress"]) == 2
    assert one_line(capsys, "eval") == CUDA_LINE
    assert not (tmp_path / "run").exists()
    for argv in (["calibrate", "--data", "synthvqa", "--data-root", str(tmp_path / "synth")],
                 ["analyze", "--data", "synthvqa", "--data-root", str(tmp_path / "synth"), "--out", str(tmp_path)],
                 ["flops"], ["plan", "--budget", "0.5", "--data-root", str(tmp_path / "synth")]):
        assert main([*argv, "--model", FORBIDDEN, "--device", "cuda"]) == 2
        assert one_line(capsys, argv[0]) == CUDA_LINE
    assert main(["flops", "--model", FORBIDDEN, "--device", "mps"]) == 2
    assert one_line(capsys, "flops") == ("--device mps: torch reports no MPS device "
                                         "(torch.backends.mps.is_available() is False); use --device cpu")
    assert main(["flops", "--model", FORBIDDEN, "--device", "gpu"]) == 2
    assert one_line(capsys, "flops").startswith("invalid device 'gpu'")


def test_a_cuda_index_beyond_the_devices(monkeypatch):
    from mambaprune.eval.config import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(ValueError, match=r"^--device cuda:2: torch reports 2 CUDA devices \(cuda:0 to cuda:1\)$"):
        check_device("cuda:2")
    check_device("cpu")
    check_device(None)


# --- (d) a model's folders left out or not there ---------------------------------------------------------------------

COBRA_NEEDS = ("cobra needs dino_dir, siglip_dir and tokenizer_dir: dino_dir = facebook/dinov2-with-registers-large "
               "or timm/vit_large_patch14_reg4_dinov2.lvd142m; siglip_dir = google/siglip-so400m-patch14-384; "
               "tokenizer_dir = the tokenizer of xiuyul/mamba-2.8b-zephyr (each a local copy or the Hugging Face "
               "repo id)")


def test_cobra_without_its_tower_folders(tmp_path, capsys):
    with pytest.raises(CheckpointError) as e:
        load_model("cobra", tmp_path)
    assert str(e.value) == COBRA_NEEDS
    assert main(["flops", "--model", "cobra", "--model-arg", f"run_dir={tmp_path}"]) == 2
    assert one_line(capsys, "flops") == COBRA_NEEDS
    with pytest.raises(CheckpointError, match=r"^cobra needs run_dir, dino_dir, siglip_dir and tokenizer_dir: "
                                              r"run_dir = the cobra\+3b/ folder of han1997/cobra"):
        load_model("cobra")
    with pytest.raises(CheckpointError, match=r"^cobra needs tokenizer_dir: tokenizer_dir = the tokenizer of "
                                              r"xiuyul/mamba-2\.8b-zephyr \(a local copy or the Hugging Face "
                                              r"repo id\)$"):
        load_model("cobra", tmp_path, dino_dir=tmp_path, siglip_dir=tmp_path)


def test_cobra_run_folder_not_there(tmp_path, capsys):
    missing = tmp_path / "weights" / "cobra+3b"
    towers = {"dino_dir": tmp_path, "siglip_dir": tmp_path, "tokenizer_dir": tmp_path}
    with pytest.raises(CheckpointError) as e:
        load_model("cobra", missing, **towers)
    assert str(e.value) == (f"cobra run_dir: Cobra run folder not found: {missing} (expected: the cobra+3b/ folder "
                            "of han1997/cobra, with config.json and checkpoints/latest-checkpoint.pt; a local copy, "
                            "or the Hugging Face repo id han1997/cobra/cobra+3b)")
    with pytest.raises(CheckpointError, match=r"^cobra dino_dir: DINOv2 tower folder not found: .*nope \(expected: "
                                              r"facebook/dinov2-with-registers-large or timm/"):
        load_model("cobra", tmp_path, **{**towers, "dino_dir": tmp_path / "nope"})
    with pytest.raises(CheckpointError, match=f"^{tmp_path} is not a Cobra run folder: no config.json"):
        load_model("cobra", tmp_path, **towers)


def test_robomamba_without_its_checkpoint_or_folders(tmp_path):
    with pytest.raises(CheckpointError, match=r"^robomamba needs checkpoint: checkpoint = the released \.pth file "
                                              r"linked from lmzpai/roboMamba's README \(CLIP224\+Mamba2\.8b\) \(a "
                                              r"local file, or owner/name/<file> for a file in a Hugging Face repo\)$"):
        load_model("robomamba")
    with pytest.raises(CheckpointError, match=r"^robomamba checkpoint: RoboMamba checkpoint not found: .*missing\.pth"):
        load_model("robomamba", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"^give tokenizer_dir or llm_dir \(RoboMamba's tokenizer is the one of "
                                         r"state-spaces/mamba-2.8b-hf"):
        load_model("robomamba", __file__)
    with pytest.raises(CheckpointError, match=r"^robomamba llm_dir: language-model folder not found: .*absent "
                                              r"\(expected: state-spaces/mamba-2.8b-hf"):
        load_model("robomamba", __file__, llm_dir=tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"^robomamba clip_dir: CLIP tower folder not found: .*absent "
                                              r"\(expected: openai/clip-vit-large-patch14"):
        load_model("robomamba", __file__, clip_dir=tmp_path / "absent", llm_dir=tmp_path)
