"""Atomic saving of our artifacts into users' folders, and reading them back without changing anything.

Saving follows the ``save_pretrained`` contract: it writes *into* the folder, replaces only the files of the
artifact and keeps every other file (a ``thesis.tex``, ``checkpoint-*`` folders). It refuses a folder holding
something else (a model's weights, a foreign ``README.md``) unless ``overwrite=True``.

Each save is atomic per artifact. The new files are written into a hidden staging folder inside the target, with a
list of the old files the save removes (an old shard). Renaming that folder to ``.repalign-commit`` is the commit
point; its files are then renamed into place (config files last) and the old ones removed. A kill or a full disk
before the commit point leaves the old artifact; after it, a load reads the committed files where they are (and so
changes nothing, read-only media included) and the next save completes the renames first. Concurrent saves to one
folder are serialised by a lock on the folder. Files and folders get the user's umask.

A folder may come from anyone, so what is in it is data, never instructions: a commit folder is completed only when
it is exactly what a save writes (plain files named by its own listing, old-file names the saved kind owns), links
are replaced and never written through, a link out of a local folder is not read, and anything else is refused in
one line naming the path and the fix.

Example:
    >>> from hf_repalign.artifacts import save_folder, read_folder
    >>> save_folder("out/vec", VECTOR_KIND, tensors={"direction": d}, config={"format": ...}, card="# my card")
    >>> tensors, config = read_folder("out/vec")
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

HIDDEN_PREFIX = ".repalign-"  # our temp files and staging folders: ".repalign-<host>-<pid>-<random>..."
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
    return f"{HIDDEN_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}{stem}"


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
            if entry.name.startswith(HIDDEN_PREFIX) and _writer_is_dead(entry.name):
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
    files, stale = _pending_commit(folder, _any_kind_owns) or ([], [])
    path = folder / _COMMIT / name if name in files else folder / name
    if local and path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{path} is a link to {path.resolve()}, outside the folder; copy the file into the folder.")
    if not path.is_file() or name in stale:
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


def check_not_under_a_file(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse a path that cannot be created because one of its parents is a file (``notes.txt/out``)."""
    path = Path(path).expanduser().absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what}: {parent} is a file, so {path} cannot be created under it; give "
                                         "a path inside a folder.")
            return


def check_target(save_directory: str | os.PathLike, kind: ArtifactKind, overwrite: bool = False) -> Path:
    """Refuse, before any work, a target that is a file or a folder holding something other than a ``kind``.

    Writing into a folder of unrelated files (``thesis.tex``) is fine: they are kept. Files that saving would
    overwrite (another artifact's weights or config, a tokenizer, a ``README.md`` we did not write) need
    ``overwrite=True``; even then, only the files of the new artifact are replaced.
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ArtifactConflictError(f"{target} is a file; a {kind.name} is saved as a folder. Give a folder path.")
    check_not_under_a_file(target, kind.name)
    if overwrite or not target.is_dir() or kind.marker(target):
        return target
    clash = []
    for entry in sorted(target.iterdir()):
        if not entry.is_file() or entry.name.startswith(HIDDEN_PREFIX):
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


def _commit(target: Path, staging: Path, kind: ArtifactKind) -> None:
    """Under the folder lock: name the stale files, then rename ``staging`` to the commit folder (the commit point)
    and move its files into place."""
    files = sorted(p.name for p in staging.iterdir())
    bad = [n for n in files if not (staging / n).is_file() or (staging / n).is_symlink()
           or not _PLAIN_NAME.fullmatch(n) or not kind.owned(n)]
    if bad:  # a commit holds only what completing it may move in
        raise ValueError(f"a {kind.name} is a flat folder of the plain files it owns; the save wrote {bad}.")
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


def read_folder(folder: str | os.PathLike, local: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of :func:`save_folder`: ``(tensors, config)``, read without changing the folder. ``local=False``
    for a Hub snapshot, whose files link into the HF cache."""
    from safetensors.torch import load_file

    folder = Path(folder)
    with _locked(folder, shared=True) if os.access(folder, os.W_OK) else contextlib.nullcontext():
        config_path, weights_path = (artifact_file(folder, name, local) for name in (CONFIG_NAME, WEIGHTS_NAME))
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object, not {type(config).__name__}.")
        return load_file(str(weights_path)), config
