"""Bookkeeping of a resumable ``annotate`` run: the output lock, the run fingerprint and the chunk checkpoints.

With ``output=out.jsonl`` a run holds ``.out.jsonl.lock`` and keeps finished chunks in ``.out.jsonl.parts/``
(a ``manifest.json`` with the run's fingerprint, then one ``chunk-NNNNNN.json`` per chunk). Everything read back
from there is checked against this run before it is used.

Example:
    >>> from hf_repalign.legend.checkpoints import OutputLock
    >>> with OutputLock(Path("out.jsonl")):
    ...     ...  # a second run on out.jsonl fails at once with OutputLockedError
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import PartialState

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from ..artifacts import atomic_write_text
from .data import PREFERENCE_FIELDS
from .embedding import EMBEDDING_VERSION
from .vector import MarginVector

if TYPE_CHECKING:
    from datasets import Dataset


def parts_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.parts")


def _lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


_LOCK_CONTENT = re.compile(rb"pid [0-9]{1,20}")


class OutputLockedError(RuntimeError):
    """Another annotate run holds the lock on the same output."""


class OutputLock:
    """An exclusive lock on one ``output`` (and its checkpoint folder): a second run on the same output fails at
    once, in one line, instead of both writing and one result being lost. Released on exit, even on errors.

    The lock file ``.<output>.lock`` is opened without following a symlink, and a file there that is not a lock of
    ours (a link, a folder, a file with other content or other hard links) is refused, never truncated.
    """

    def __init__(self, output: Path):
        self.path = _lock_path(output)
        self.fd: int | None = None

    def _refuse(self, why: str) -> OutputLockedError:
        return OutputLockedError(f"{self.path} {why}; it is not an annotate lock, so it is left alone. Move it away "
                                 "or choose another `output`.")

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # Windows: no advisory locks; runs on one output are not guarded there
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as err:  # ELOOP: a symlink; EISDIR: a folder
            raise self._refuse(f"cannot be opened as a lock ({err.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise self._refuse("is not a plain file" if not stat.S_ISREG(info.st_mode) else "has other hard links")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("utf-8", "replace").strip() or "another process"
                raise OutputLockedError(f"another annotate run ({holder}) is writing {self.path.name[1:-5]}; wait for "
                                        f"it or choose another `output` (lock: {self.path}).") from None
            content = os.pread(fd, 65, 0)
            if content and not _LOCK_CONTENT.fullmatch(content):
                raise self._refuse("holds something else")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # unlink only the file we hold, not one that replaced it
            if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()  # while still held: a waiting run then fails or retries cleanly
        os.close(self.fd)  # releases the lock
        self.fd = None


def _model_signature(model: torch.nn.Module) -> dict[str, str]:
    """What about the model changes a margin: its name, dtype and architecture (the weights are too costly to hash
    at every start; the name stands for them)."""
    config = model.config.to_json_string(use_diff=True) if hasattr(model.config, "to_json_string") else ""
    return {"model": str(getattr(model.config, "name_or_path", "")), "model_dtype": str(model.dtype),
            "model_config_sha256": hashlib.sha256(config.encode()).hexdigest()[:16]}


def run_fingerprint(dataset: Dataset, vector: MarginVector, model: torch.nn.Module,
                     settings: Mapping[str, Any]) -> dict:
    """Everything that changes a margin: the data, the vector, the model (name, dtype, config), the embedding
    code's version, the template / max_length / truncation and the chunk size."""
    digest = hashlib.sha256()
    fields = [f for f in PREFERENCE_FIELDS if f in dataset.column_names]
    for row in dataset.select_columns(fields):
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    fingerprint = {"rows": len(dataset), "data_sha256": digest.hexdigest(), "vector": vector.fingerprint(),
                   "embedding_version": EMBEDDING_VERSION, **_model_signature(model),
                   **{k: stable_repr(v) for k, v in settings.items()}}
    fingerprint["run"] = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return fingerprint


def stable_repr(value: Any) -> str:
    """``repr``, except that a callable (a template) is named by its qualified name and source, not its address,
    so a rerun in a new process matches its own checkpoints."""
    if not callable(value):
        return repr(value)
    name = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    try:
        source = inspect.getsource(value)
    except (OSError, TypeError):  # built in, or defined where the source is unavailable
        source = ""
    return f"<callable {name} {hashlib.sha256(source.encode()).hexdigest()[:12]}>"


def prepare_parts(parts: Path, fingerprint: dict, resume: bool, state: PartialState) -> None:
    manifest = parts / "manifest.json"
    if parts.is_symlink():  # a run's checkpoints are written only into a folder of its own
        raise ValueError(f"{parts} is a link; delete it and rerun (the checkpoints are kept in a folder there).")
    if state.is_main_process:
        if parts.is_dir() and resume and manifest.is_file():
            try:
                found = json.loads(manifest.read_text(encoding="utf-8"))
            except ValueError:  # damaged: reported as a different run, with the fix
                found = None
            if found != fingerprint:
                found = found if isinstance(found, dict) else {}
                changed = sorted(k for k in fingerprint if k != "run" and found.get(k) != fingerprint[k])
                raise ValueError(
                    f"resume=True but the checkpoints in {parts} come from a different run (differs in {changed}); "
                    "rerun with resume=False to start over."
                )
        else:
            if parts.is_dir():
                shutil.rmtree(parts)
            parts.mkdir(parents=True)
            atomic_write_text(manifest, json.dumps(fingerprint, indent=2, sort_keys=True))
    state.wait_for_everyone()


def read_chunk(path: Path, start: int, stop: int, run: str) -> dict:
    """A finished chunk's checkpoint, checked against the rows it must cover and the run that must have made it."""
    try:
        saved = json.loads(path.read_text())
        ok = (saved["start"], saved["stop"]) == (start, stop) and len(saved["margin_raw"]) == stop - start
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"resume=True: the checkpoint {path} does not hold rows {start}-{stop - 1}; it is damaged. "
                         "Delete it (that chunk is recomputed) or rerun with resume=False.")
    if saved.get("run") != run:
        raise ValueError(f"resume=True: the checkpoint {path} was written by another run (run {saved.get('run')!r}, "
                         f"this run {run!r}: other data, vector, model, dtype or settings). Delete it (that chunk "
                         "is recomputed) or rerun with resume=False.")
    return saved
