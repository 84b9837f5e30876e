"""Checks on the outputs a command will write, made before any work: not a folder where a file is meant, not
under a file, not one of the inputs, writable.

Example:
    >>> from hf_repalign.outputs import check_output_file
    >>> check_output_file("out/annotated.jsonl", (".jsonl", ".json"), "--output", {"--dataset": "in.jsonl"})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .artifacts import check_not_under_a_file


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before any work, an output under a file, or whose folder (or nearest existing parent) cannot be
    written."""
    check_not_under_a_file(path, what)
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
