"""Weights by name: a Hugging Face repo id where a loader expects a local folder.

Every model argument that names a folder (Cobra's ``run_dir``, ``dino_dir``, ``siglip_dir``, ``tokenizer_dir``;
RoboMamba's ``clip_dir``, ``llm_dir``; ML-Mamba's ``checkpoint``; the testbed's ``folder``; :func:`~mambaprune.models.checkpoints.load_mamba_lm`'s
and :func:`~mambaprune.models.vision.load_vit_model`'s) goes through :func:`resolve_folder` first:

* an existing local path always wins (it is returned as it is);
* otherwise a string ``owner/name``, ``owner/name/sub/folder`` or ``owner/name@revision[/sub/folder]`` is a repo id
  of the Hugging Face Hub (e.g. ``han1997/cobra/cobra+3b``: Cobra's run folder is a sub-folder of its repo), read
  through huggingface_hub's cache: ``snapshot_download(repo_id, allow_patterns=...)`` fetches only the files the
  loader reads (into the cache, ``HF_HUB_CACHE``, default ``$HF_HOME/hub``) and returns the snapshot folder; with
  ``HF_HUB_OFFLINE=1`` nothing is downloaded and the cached snapshot is used; when a download fails the cached
  snapshot is used too, if there is one;
* anything else is returned as a path, and the loader reports it missing.

A repo id that cannot be resolved is a :class:`HubError` (a :class:`~mambaprune.models.checkpoints.CheckpointError`)
of one line naming the id, the cache and why (offline and not in the cache; not on the Hub; no such revision or
sub-folder).
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

__all__ = ["HubError", "RepoRef", "TOKENIZER_FILES", "WEIGHT_FOLDER", "check_given", "hub_cache_dir", "is_offline",
           "parse_repo_id", "resolve_argument", "resolve_folder"]

#: What a folder of weights needs besides the weights themselves (configs, sharding indexes, timm's
#: ``config.json``); the weights follow the rule of ``resolve_folder(..., weights=True)``.
WEIGHT_FOLDER = ("*.json", "*.txt")
#: The files of a transformers tokenizer (what ``AutoTokenizer.from_pretrained`` reads from a folder).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model")

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
_REPO_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[A-Za-z0-9_.\-]+))?(?:/(?P<sub>.+))?")


class HubError(CheckpointError):
    """A repo id that cannot be resolved to a local snapshot; the message (one line) says why."""


@dataclass(frozen=True)
class RepoRef:
    """A parsed repo id: ``repo_id`` (``owner/name``), ``revision`` (None: the default branch) and ``subfolder``
    (a path inside the repo, ``""`` for its root)."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + \
            (f"/{self.subfolder}" if self.subfolder else "")


def parse_repo_id(value) -> RepoRef | None:
    """``RepoRef`` of a string of the form ``owner/name[@revision][/sub/folder]``, else None (an absolute or
    ``./``-relative path, a single name, a ``..`` or empty part, anything that is not a string)."""
    if not isinstance(value, str):
        return None
    m = _REPO_ID.fullmatch(value)
    if m is None:
        return None
    sub = m["sub"] or ""
    parts = sub.split("/") if sub else []
    if any(p in ("", ".", "..") for p in parts) or ".." in m["repo"] or "--" in m["repo"]:
        return None
    return RepoRef(m["repo"], m["revision"], sub)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_offline() -> bool:
    """Whether to stay offline: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, read now
    (huggingface_hub reads its own copy once, when it is imported)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hub_cache_dir() -> Path:
    """The cache huggingface_hub reads and writes, from the environment now, with huggingface_hub's precedence:
    ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``,
    ``~/.cache/huggingface/hub``."""
    def expand(path: str) -> str:
        return os.path.expandvars(os.path.expanduser(path))

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(expand(os.environ[name]))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(expand(home)) / "hub"


def _glob_escape(text: str) -> str:
    """``text`` as a literal fnmatch pattern."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _patterns(ref: RepoRef, allow_patterns) -> list[str] | None:
    if allow_patterns is None:
        return [_glob_escape(ref.subfolder), _glob_escape(ref.subfolder) + "/*"] if ref.subfolder else None
    if isinstance(allow_patterns, str):
        allow_patterns = [allow_patterns]
    if not ref.subfolder:
        return list(allow_patterns)
    sub = _glob_escape(ref.subfolder)
    return [sub] + [f"{sub}/{p}" for p in allow_patterns]


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


def _download(ref: RepoRef, patterns, cache: Path, offline: bool) -> Path:
    """The snapshot folder of ``ref`` with the files matching ``patterns``: downloaded unless ``offline``; from
    the cache when offline or when the download fails."""
    from huggingface_hub import snapshot_download

    def snapshot(local_only: bool) -> Path:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=str(cache),
                                      allow_patterns=patterns, local_files_only=local_only))

    try:
        return snapshot(offline)
    except Exception as first:  # no network, not on the Hub, gated, no such revision, a failed transfer
        if not offline:
            try:
                folder = snapshot(True)
            except Exception:
                pass
            else:
                warnings.warn(f"could not download {ref.repo_id} ({_short(first)}); using its cached snapshot "
                              f"{folder}", stacklevel=3)
                return folder
        raise _hub_error(ref, cache, offline, first) from first


def _hub_error(ref: RepoRef, cache: Path, offline: bool, err: Exception) -> HubError:
    name = type(err).__name__
    where = f"the Hugging Face cache {cache}"
    get = (f"download it where there is network (`hf download {ref.repo_id}` with HF_HUB_CACHE={cache}) or give "
           f"a local folder")
    if offline:
        partly = " completely" if name == "IncompleteSnapshotError" else ""
        return HubError(f"{ref} is not an existing path, and the repo {ref.repo_id}"
                        f"{'@' + ref.revision if ref.revision else ''} is not{partly} in {where} and this machine "
                        f"is offline (HF_HUB_OFFLINE is set); {get}")
    if name == "RevisionNotFoundError":
        return HubError(f"{ref}: the repo {ref.repo_id} has no revision {ref.revision!r} on the Hub and none is in "
                        f"{where}")
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return HubError(f"{ref} is neither an existing path nor a Hugging Face repo that can be downloaded "
                        f"({_short(err)}), and it is not in {where}")
    return HubError(f"could not download {ref.repo_id} ({_short(err)}), and it is not in {where}; {get}")


def resolve_folder(value, *, allow_patterns=None, weights: bool = False, what: str | None = None) -> Path:
    """The local folder (or file) ``value`` names: an existing path as it is, else a Hugging Face repo id
    ``owner/name[@revision][/sub/folder]`` resolved to its snapshot in the cache (see the module docstring).

    Args:
        value: a path (str or :class:`os.PathLike`) or a repo id (str).
        allow_patterns: the files the loader reads, as fnmatch patterns relative to the sub-folder (None: all of
            it); only those are downloaded. ``()``: the sub-path itself only (a file in the repo).
        weights: also the weights of a folder: its ``*.safetensors`` files, or, when it has none, its ``*.bin``,
            ``*.pt`` and ``*.pth`` files (so a repo holding both formats is downloaded once).
        what: the argument's name, put in front of an error message (e.g. ``"dino_dir"``).

    Returns the path (not checked further when ``value`` is not a repo id: the loader says what is missing).
    Raises :class:`HubError` when ``value`` is a repo id that cannot be resolved.
    """
    path = Path(value)
    ref = None if path.exists() else parse_repo_id(value)      # a Path object is never a repo id
    if ref is None:
        return path
    try:
        if allow_patterns is not None and len(allow_patterns) == 0 and not ref.subfolder:
            raise HubError(f"{ref} names a repo; give the file inside it: {ref.repo_id}/<path of the file>")
        cache, offline = hub_cache_dir(), is_offline()
        patterns = _patterns(ref, (list(allow_patterns or []) + ["*.safetensors"]) if weights else allow_patterns)
        folder = _download(ref, patterns, cache, offline)
        target = folder / ref.subfolder if ref.subfolder else folder
        if weights and target.is_dir() and not any(target.glob("*.safetensors")):
            target_patterns = _patterns(ref, ["*.bin", "*.pt", "*.pth"])
            folder = _download(ref, target_patterns, cache, offline)
            target = folder / ref.subfolder if ref.subfolder else folder
        if not target.exists():
            why = " (offline: HF_HUB_OFFLINE is set, nothing is downloaded)" if offline else ""
            raise HubError(f"{ref}: the snapshot {folder} of {ref.repo_id} has no {ref.subfolder!r}{why}")
    except HubError as e:
        if what:
            raise HubError(f"{what}: {e}") from e.__cause__
        raise
    return target


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


_HOW = "a local copy or the Hugging Face repo id"


def check_given(model: str, folders: dict[str, tuple], given: dict) -> None:
    """A :class:`CheckpointError` naming every argument of ``folders`` that ``given`` leaves None, with the public
    weights each takes. ``folders[arg]`` is ``(what it is, the public weights it holds[, how to name them])``; the
    third part (default: a local copy or the repo id) is for a path that is not simply a repo's id."""
    missing = [arg for arg in folders if given.get(arg) is None]
    if missing:
        parts = [f"{arg} = {folders[arg][1]}" + (f" ({folders[arg][2]})" if len(folders[arg]) > 2 else "")
                 for arg in missing]
        plain = [arg for arg in missing if len(folders[arg]) == 2]
        how = f" ({'each ' if len(plain) > 1 else ''}{_HOW})" if plain else ""
        raise CheckpointError(f"{model} needs {_listing(missing)}: {'; '.join(parts)}{how}")


def resolve_argument(model: str, arg: str, value, folders: dict[str, tuple], *, allow_patterns=None,
                     weights: bool = False) -> Path:
    """``resolve_folder(value)`` for the loader argument ``arg`` of ``model``; a path that is not there is a
    :class:`CheckpointError` saying what it is and which public weights it should hold (``folders[arg]``, as
    for :func:`check_given`)."""
    spec = folders[arg]
    path = resolve_folder(value, allow_patterns=allow_patterns, weights=weights, what=f"{model} {arg}")
    if not path.exists():
        raise CheckpointError(f"{model} {arg}: {spec[0]} not found: {path} (expected: {spec[1]}; "
                              f"{spec[2] if len(spec) > 2 else _HOW})")
    return path
