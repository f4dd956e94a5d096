"""Weights by name: Hugging Face repo ids resolved through a cache laid out by hand as huggingface_hub lays it out
(``models--owner--name/{refs,blobs,snapshots}``), offline; the Cobra, testbed and Mamba LM loaders by repo id."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from mambaprune.models import CheckpointError, HubError, load_model, resolve_folder
from mambaprune.models.hub import RepoRef, hub_cache_dir, parse_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hf_cache(cache: Path, repo_id: str, files: dict, revision: str = "main", commit: str = COMMIT) -> Path:
    """``files`` (repo path -> bytes or a local file) as huggingface_hub caches a download: the content in
    ``blobs/<sha256>``, ``snapshots/<commit>/<path>`` a relative symlink to it, ``refs/<revision>`` the commit
    hash (no newline). Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for rel, content in files.items():
        data = Path(content).read_bytes() if isinstance(content, (str, Path)) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = snapshot / rel
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def folder_files(folder: Path, prefix: str = "") -> dict:
    return {prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty cache in ``HF_HUB_CACHE`` with ``HF_HUB_OFFLINE=1``; the cache folder."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for name in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("text, ref", [
    ("han1997/cobra", RepoRef("han1997/cobra")),
    ("han1997/cobra/cobra+3b", RepoRef("han1997/cobra", None, "cobra+3b")),
    ("facebook/dinov2-with-registers-large", RepoRef("facebook/dinov2-with-registers-large")),
    ("acme/m.v2@v1.0/sub/dir", RepoRef("acme/m.v2", "v1.0", "sub/dir")),
    ("acme/m@" + COMMIT, RepoRef("acme/m", COMMIT)),
    ("/abs/owner/name", None), ("./owner/name", None), ("~user/name", None), ("single", None), ("a/b/", None),
    ("a//b", None), ("a/b/../c", None), ("a/b/./c", None), ("a--x/b", None), ("a/b..c", None), ("", None),
])
def test_parse_repo_id(text, ref):
    assert parse_repo_id(text) == ref
    if ref is not None:
        assert str(ref) == text


def test_cache_dir_follows_huggingface_hubs_variables(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub_cache_dir() == tmp_path / "new"


def test_offline_ids_resolve_to_the_cached_snapshot(offline):
    snap = lay_out_hf_cache(offline, "acme/tower", {"config.json": b"{}", "model.safetensors": b"x",
                                                    "run+1/config.json": b"{}"})
    assert resolve_folder("acme/tower") == snap
    assert resolve_folder("acme/tower/run+1") == snap / "run+1"
    assert resolve_folder("acme/tower/run+1/config.json", allow_patterns=()) == snap / "run+1" / "config.json"
    assert (snap / "config.json").is_symlink() and (snap / "config.json").read_bytes() == b"{}"
    other = lay_out_hf_cache(offline, "acme/tower", {"config.json": b"{ }"}, revision="v2", commit="f" * 40)
    assert resolve_folder("acme/tower@v2") == other
    assert resolve_folder("acme/tower@" + "f" * 40) == other
    assert resolve_folder("acme/tower") == snap                  # refs/main still names the first commit


def test_offline_id_not_in_the_cache_is_one_clear_line(offline):
    with pytest.raises(HubError) as e:
        resolve_folder("acme/missing", what="dino_dir")
    msg = str(e.value)
    assert msg.startswith("dino_dir: acme/missing is not an existing path") and "\n" not in msg
    assert f"is not in the Hugging Face cache {offline}" in msg and "offline (HF_HUB_OFFLINE is set)" in msg
    lay_out_hf_cache(offline, "acme/tower", {"config.json": b"{}"})
    with pytest.raises(HubError, match=r"acme/tower@v9 is not in the Hugging Face cache"):
        resolve_folder("acme/tower@v9")
    with pytest.raises(HubError, match=r"has no 'nope' \(offline"):
        resolve_folder("acme/tower/nope")
    with pytest.raises(HubError, match="give the file inside it"):
        resolve_folder("acme/tower", allow_patterns=())
    assert isinstance(e.value, CheckpointError) and isinstance(e.value, ValueError)


def test_an_existing_local_path_always_wins(offline, tmp_path, monkeypatch):
    lay_out_hf_cache(offline, "acme/tower", {"config.json": b"{}"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "tower").mkdir(parents=True)
    assert resolve_folder("acme/tower") == Path("acme/tower")
    assert resolve_folder(tmp_path / "acme" / "tower") == tmp_path / "acme" / "tower"
    # not a repo id: returned as it is, for the loader to report
    assert resolve_folder("no-such-folder") == Path("no-such-folder")
    assert resolve_folder(Path("acme/other")) == Path("acme/other")       # a Path object is never a repo id


def _recording(monkeypatch, fail_online: bool = False):
    """Record snapshot_download's calls; optionally fail every call that would go online (no network)."""
    import huggingface_hub

    real, calls = huggingface_hub.snapshot_download, []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        if fail_online and not kw.get("local_files_only"):
            raise ConnectionError("the network is unreachable")
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_only_the_files_a_loader_reads_are_asked_for(offline, monkeypatch):
    calls = _recording(monkeypatch)
    snap = lay_out_hf_cache(offline, "acme/lm", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    assert resolve_folder("acme/lm/", allow_patterns=["*.json"], weights=True) == Path("acme/lm/")   # not an id
    assert resolve_folder("acme/lm", allow_patterns=["*.json"], weights=True) == snap
    # no *.safetensors in the snapshot: the pickled weights are asked for instead
    assert [kw["allow_patterns"] for _, kw in calls] == [["*.json", "*.safetensors"], ["*.bin", "*.pt", "*.pth"]]
    assert all(kw["local_files_only"] and kw["cache_dir"] == str(offline) for _, kw in calls)
    calls.clear()
    lay_out_hf_cache(offline, "han1997/cobra", {"cobra+3b/config.json": b"{}"})
    resolve_folder("han1997/cobra/cobra+3b", allow_patterns=["config.json", "checkpoints/latest-checkpoint.pt"])
    assert calls == [("han1997/cobra", {"revision": None, "cache_dir": str(offline), "local_files_only": True,
                                        "allow_patterns": ["cobra+3b", "cobra+3b/config.json",
                                                           "cobra+3b/checkpoints/latest-checkpoint.pt"]})]


def test_a_failed_download_falls_back_to_the_cache(offline, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = _recording(monkeypatch, fail_online=True)
    snap = lay_out_hf_cache(offline, "acme/tower", {"config.json": b"{}"})
    with pytest.warns(UserWarning, match="could not download acme/tower .*using its cached snapshot"):
        assert resolve_folder("acme/tower") == snap
    assert [kw["local_files_only"] for _, kw in calls] == [False, True]
    with pytest.raises(HubError) as e:
        resolve_folder("acme/elsewhere")
    assert str(e.value).startswith("could not download acme/elsewhere (ConnectionError: the network is unreachable)")
    assert f"not in the Hugging Face cache {offline}" in str(e.value) and "\n" not in str(e.value)


# --- the loaders by repo id -----------------------------------------------------------------------------------------

def test_testbed_and_mamba_lm_by_repo_id(offline, tmp_path):
    from mambaprune.models import load_mamba_lm, save_mamba_lm
    from mambaprune.models.testbed import TESTBED_DIR, describe_testbed

    lay_out_hf_cache(offline, "acme/testbed", folder_files(TESTBED_DIR))
    shipped, named = load_model("testbed"), load_model("testbed", "acme/testbed")
    assert describe_testbed("acme/testbed") == describe_testbed()
    for (k, a), (k2, b) in zip(shipped.state_dict().items(), named.state_dict().items()):
        assert k == k2 and torch.equal(a, b)

    from conftest import hf_pair

    lm = hf_pair(seed=2)[1]
    save_mamba_lm(lm, tmp_path / "lm")
    lay_out_hf_cache(offline, "state-spaces/tiny-mamba-hf", folder_files(tmp_path / "lm"))
    again = load_mamba_lm("state-spaces/tiny-mamba-hf")
    ids = torch.tensor([[1, 5, 7, 2]])
    assert torch.equal(lm(ids).logits, again(ids).logits)
    with pytest.raises(HubError, match="state-spaces/absent is not in the Hugging Face cache"):
        load_mamba_lm("state-spaces/absent")


@pytest.fixture(scope="module")
def cobra_files(tmp_path_factory):
    """A small random Cobra written in the released layout (as tests/test_cobra.py does)."""
    pytest.importorskip("transformers")
    from mambaprune.models.cobra import random_cobra, save_cobra
    from test_vlm import make_lm, make_tokenizer

    cobra = random_cobra(make_lm(seed=5), make_tokenizer(), seed=1)
    root = tmp_path_factory.mktemp("cobra")
    dirs = {"run_dir": root / "cobra+3b", "dino_dir": root / "dino", "siglip_dir": root / "siglip",
            "tokenizer_dir": root / "tokenizer"}
    save_cobra(cobra, dirs["run_dir"], dino_dir=dirs["dino_dir"], siglip_dir=dirs["siglip_dir"],
               tokenizer_dir=dirs["tokenizer_dir"])
    return cobra, dirs


def test_cobra_loads_by_repo_ids_end_to_end(cobra_files, offline):
    cobra, dirs = cobra_files
    lay_out_hf_cache(offline, "han1997/cobra", {**folder_files(dirs["run_dir"], "cobra+3b/"),
                                                "README.md": b"# Cobra"})
    lay_out_hf_cache(offline, "facebook/dinov2-with-registers-large", folder_files(dirs["dino_dir"]))
    lay_out_hf_cache(offline, "google/siglip-so400m-patch14-384", folder_files(dirs["siglip_dir"]))
    lay_out_hf_cache(offline, "xiuyul/mamba-2.8b-zephyr", folder_files(dirs["tokenizer_dir"]))
    ids = dict(dino_dir="facebook/dinov2-with-registers-large", siglip_dir="google/siglip-so400m-patch14-384",
               tokenizer_dir="xiuyul/mamba-2.8b-zephyr")
    loaded = load_model("cobra", "han1997/cobra/cobra+3b", **ids)
    want = cobra.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert loaded.tokenizer("a cat").input_ids == cobra.tokenizer("a cat").input_ids

    # the repo itself instead of its run folder: the run folders inside it are named
    with pytest.raises(CheckpointError, match=r"no config.json; the run folders inside it: cobra\+3b"):
        load_model("cobra", "han1997/cobra", **ids)
    # a tower that is not in the cache: one line naming the argument, the repo and the cache
    shutil.rmtree(offline / "models--google--siglip-so400m-patch14-384")
    with pytest.raises(HubError) as e:
        load_model("cobra", "han1997/cobra/cobra+3b", **ids)
    assert str(e.value).startswith("cobra siglip_dir: google/siglip-so400m-patch14-384 is not an existing path")
    assert "not in the Hugging Face cache" in str(e.value)
