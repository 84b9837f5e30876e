"""Reading the text files users hand us (JSON lines, CSV, plain lines, JSON), with errors that name file and line.

Every data entry point reads through here, so all of them accept a UTF-8 byte-order mark, refuse bytes that are not
UTF-8 and lone surrogates (``"\\ud800"`` escapes in JSON) with the file and line, and refuse a JSON-lines row that is
not an object. Imports nothing heavy: the CLI uses it before torch is loaded.

Example:
    >>> from hf_repalign.text_files import read_jsonl
    >>> rows = read_jsonl("pairs.jsonl")      # [{"prompt": ..., "chosen": ..., "rejected": ...}, ...]
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from typing import Any

_BOM = "\ufeff"


class TextFileError(ValueError):
    """A data file that cannot be read as UTF-8 text of the expected shape; the message names file and line."""


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The whole file as text: UTF-8 (an optional byte-order mark is dropped), gzip-compressed when named ``*.gz``."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextFileError(
            f"{what} {os.fspath(path)}, line {_line_of(data, err.start)}: byte {data[err.start]:#04x} is not valid "
            "UTF-8; save the file as UTF-8."
        ) from None
    return text[1:] if text.startswith(_BOM) else text


def has_lone_surrogate(value: Any) -> bool:
    """Whether a string, or any key or value of nested dicts, lists and tuples, holds a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_lone_surrogate(v) for v in value)
    return False


def _parse_json(text: str, where: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise TextFileError(f"{where}: not valid JSON ({err.msg}, column {err.colno}).") from None
    if has_lone_surrogate(value):
        raise TextFileError(f"{where}: holds a lone surrogate escape (such as \\ud800), which is not valid Unicode.")
    return value


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[dict]:
    """JSON lines; every non-blank line must be one JSON object (the error names the file and line)."""
    return _jsonl_rows(read_text(path, what), path, what)


def read_rows(path: str | os.PathLike, what: str = "file") -> list[dict]:
    """Rows of a JSON list of objects (``[{...}, ...]``) or of JSON lines, whatever the suffix (as
    ``datasets.load_dataset("json")`` reads them); the error names the file and the line or row."""
    text = read_text(path, what)
    if not text.lstrip().startswith("["):
        return _jsonl_rows(text, path, what)
    rows = _parse_json(text, f"{what} {os.fspath(path)}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TextFileError(f"{what} {os.fspath(path)}, row {index}: expected a JSON object ({{...}}), got "
                                f"{type(row).__name__}.")
    return rows


def _jsonl_rows(text: str, path: str | os.PathLike, what: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{what} {os.fspath(path)}, line {number}"
        row = _parse_json(line, where)
        if not isinstance(row, dict):
            raise TextFileError(f"{where}: expected a JSON object ({{...}}) per line, got {type(row).__name__}.")
        rows.append(row)
    return rows


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """One JSON document."""
    return _parse_json(read_text(path, what), f"{what} {os.fspath(path)}")


def read_csv(path: str | os.PathLike, what: str = "file") -> list[dict[str, str]]:
    """CSV rows as dicts keyed by the header."""
    return list(csv.DictReader(io.StringIO(read_text(path, what), newline="")))


def read_lines(path: str | os.PathLike, what: str = "file") -> list[str]:
    """The non-blank lines of a plain text file."""
    return [line for line in read_text(path, what).splitlines() if line.strip()]
