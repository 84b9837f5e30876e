"""Reading, checking and writing preference datasets for LEGEND annotation.

Lists and files are checked row by row before they become a ``datasets.Dataset``, so a bad row is reported by
number and field rather than as an Arrow type error; the annotated dataset is written through a temp file and an
atomic rename.

Example:
    >>> from hf_repalign.legend.data import load_preference_data, usable_rows
    >>> rows, errors = usable_rows(rows)  # drop HH-RLHF's few empty responses yourself
    >>> ds = load_preference_data("harmless-base/test.jsonl.gz")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

from ..formats import PreferenceFormatError, to_triplet
from ..artifacts import atomic_file
from ..text_files import has_lone_surrogate, read_json, read_jsonl

if TYPE_CHECKING:  # `datasets` is imported lazily: the pipeline itself runs without it
    from datasets import Dataset

logger = logging.get_logger(__name__)

OUTPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def load_preference_data(
    data: Dataset | Sequence[Mapping[str, Any]] | str | os.PathLike, drop_invalid: bool = False
) -> Dataset:
    """A ``datasets.Dataset`` from a Dataset, a list of dicts, or a jsonl / json / parquet / ``.jsonl.gz`` path.

    Lists and files are checked row by row before conversion, so a bad row is reported by number rather than as
    an Arrow type error. ``drop_invalid=True`` drops rows that are not valid preference triplets instead, with a
    warning that counts and names them.
    """
    return load_data(data, drop_invalid)[0]


def load_data(data, drop_invalid: bool) -> tuple[Dataset, dict[int, str]]:
    """The dataset and, with ``drop_invalid``, the dropped rows' original indices and errors."""
    from datasets import Dataset

    if isinstance(data, (str, os.PathLike)):
        data = _read_file(Path(data))
        if isinstance(data, Dataset):
            return _drop(data, drop_invalid)
    if isinstance(data, Dataset):
        return _drop(data, drop_invalid)
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise TypeError(f"`dataset` must be a datasets.Dataset, a list of dicts or a path, got {type(data).__name__}.")
    invalid = invalid_rows(data, stop_at_first=not drop_invalid)
    if invalid and not drop_invalid:
        raise PreferenceFormatError(next(iter(invalid.values())))
    kept = [i for i in range(len(data)) if i not in invalid]
    _warn_dropped(invalid, len(data))
    # Dataset.from_list keeps only row 0's keys; gather every row's columns so none is lost.
    columns = list(dict.fromkeys(key for i in kept for key in data[i]))
    try:
        return Dataset.from_dict({key: [data[i].get(key) for i in kept] for key in columns}), invalid
    except Exception as err:  # Arrow's type errors name neither the row nor the column
        raise conversion_error([data[i] for i in kept], kept, columns) or err from err


def _kind(value: Any) -> str:
    """A coarse Arrow-level type: rows of one column must agree on it (None fits any)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "dict with keys " + str(sorted(value))
    if isinstance(value, (list, tuple)):
        kinds = {_kind(v) for v in value if v is not None}
        return f"list of {kinds.pop() if len(kinds) == 1 else 'mixed values' if kinds else 'nothing'}"
    return type(value).__name__


def conversion_error(rows: Sequence[Mapping[str, Any]], indices: Sequence[int], columns: Sequence[str]):
    """The first row that stops a list of dicts from becoming one Arrow table, as a :class:`PreferenceFormatError`
    naming the row and the column (``None`` if no cause is found)."""
    first: dict[str, tuple[int, str]] = {}
    for index, row in zip(indices, rows):
        for key in columns:
            value = row.get(key)
            if value is None:
                continue
            if has_lone_surrogate(value):
                return PreferenceFormatError(f"row {index}, column `{key}`: the text holds a lone surrogate, which "
                                             "is not valid Unicode.")
            kind = _kind(value)
            if key not in first:
                first[key] = (index, kind)
            elif first[key][1] != kind:
                return PreferenceFormatError(
                    f"row {index}, column `{key}`: {kind}, but row {first[key][0]} has {first[key][1]}; a column "
                    "must hold one type in every row (e.g. all prompts as strings, or all as message lists)."
                )
    return None


def _read_file(path: Path):
    """A parquet file as a Dataset; json / jsonl (optionally gzipped) as a list of rows."""
    from datasets import Dataset

    if not path.is_file():
        raise FileNotFoundError(f"`dataset`: {path} does not exist.")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        from datasets.table import InMemoryTable

        return Dataset(InMemoryTable(pq.read_table(path)))
    if not name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        raise ValueError(f"`dataset`: unsupported file {path}; use .jsonl, .json, .parquet or .jsonl.gz.")
    if name.endswith((".json", ".json.gz")):
        return read_json(path)
    return read_jsonl(path)


def _drop(dataset: Dataset, drop_invalid: bool) -> tuple[Dataset, dict[int, str]]:
    """A Dataset is checked lazily by the pipeline unless invalid rows are to be dropped up front."""
    if not drop_invalid:
        return dataset, {}
    invalid = invalid_rows(dataset)
    _warn_dropped(invalid, len(dataset))
    if invalid:
        dataset = dataset.select([i for i in range(len(dataset)) if i not in invalid])
    return dataset, invalid


def _warn_dropped(invalid: Mapping[int, str], n: int) -> None:
    if invalid:
        first = "; ".join(list(invalid.values())[:5])
        logger.warning(f"drop_invalid=True: dropped {len(invalid)} of {n} rows that are not valid preference pairs. "
                       f"First: {first}")


def invalid_rows(rows: Sequence[Mapping[str, Any]] | Dataset, stop_at_first: bool = False) -> dict[int, str]:
    """``{row index: error}`` for the rows that do not form a valid preference triplet."""
    invalid = {}
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, Mapping):
                raise PreferenceFormatError(f"row {i}: expected a dict, got {type(row).__name__}.")
            to_triplet(row, i)
        except PreferenceFormatError as err:
            invalid[i] = str(err)
            if stop_at_first:
                break
    return invalid


def usable_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """Split rows into those that form a valid preference triplet and the errors of the others.

    ``annotate`` refuses bad rows unless ``drop_invalid=True``; use this to drop them yourself (e.g. HH-RLHF's few
    empty responses) and keep the messages for your report.
    """
    invalid = invalid_rows(rows)
    return [row for i, row in enumerate(rows) if i not in invalid], list(invalid.values())


def write_dataset(dataset: Dataset, path: str | os.PathLike) -> Path:
    """Write ``dataset`` to ``path`` (.jsonl, .json or .parquet) through a temp file and an atomic rename.

    The file gets the user's umask, like any file a plain ``open()`` creates; the temp file is removed on failure
    (and, if the process was killed, by the next write into the folder).
    """
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"`output`: unsupported suffix {path.suffix!r} in {path}; use one of {OUTPUT_SUFFIXES}.")
    with atomic_file(path) as tmp:
        if path.suffix == ".parquet":
            dataset.to_parquet(str(tmp))
        else:  # json.dumps keeps floats exact (pandas' writer rounds to 15 digits)
            with open(tmp, "w", encoding="utf-8") as handle:
                rows = (json.dumps(row, ensure_ascii=False) for row in dataset)
                if path.suffix == ".jsonl":
                    handle.writelines(line + "\n" for line in rows)
                else:
                    handle.write("[" + ",\n".join(rows) + "]\n")
    return path
