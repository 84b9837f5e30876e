"""Contrast data for fitting a margin vector: responses that show more of an attribute and responses that show less.

Two shapes are read, in TRL's vocabulary:

- **pairs**: preference rows (``prompt``/``chosen``/``rejected``, or implicit ``chosen``/``rejected`` dialogues):
  ``chosen`` is the positive side, ``rejected`` the negative one;
- **sets**: unpaired rows ``prompt``/``completion``/``label`` (``label`` true for the positive set), as TRL's
  unpaired preference format. The two sets may differ in size and in prompts.

From a ``datasets.Dataset``, a list of dicts, a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, or a
Hub dataset id (read with ``datasets.load_dataset``).

Example:
    >>> from hf_repalign.legend.contrast import read_contrast
    >>> contrast = read_contrast([{"prompt": "Hi", "completion": "Hello! How can I help?", "label": True},
    ...                           {"prompt": "Hi", "completion": "What.", "label": False}])
    >>> contrast.kind, len(contrast.positive), len(contrast.negative)
    ('sets', 1, 1)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats import PreferenceFormatError, Prompt, to_triplet
from ..text_files import read_csv, read_json, read_jsonl

TRUE_LABELS = (True, 1, "true", "True", "1", "yes")
FALSE_LABELS = (False, 0, "false", "False", "0", "no")


@dataclass
class Contrast:
    """``positive`` and ``negative`` ``(prompt, response)`` lists; for ``kind="pairs"`` row i of both is one pair."""

    positive: list[tuple[Prompt, str]]
    negative: list[tuple[Prompt, str]]
    kind: str  # "pairs" or "sets"
    source: str  # what it was read from, recorded in the vector's config and card

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "positive": len(self.positive),
                "negative": len(self.negative)}


def contrast_from_lists(prompts: Sequence[Prompt], positive: Sequence[str], negative: Sequence[str],
                        source: str = "lists") -> Contrast:
    """Pairs from three equally long lists (the i-th prompt with its positive and negative response)."""
    if not (len(prompts) == len(positive) == len(negative)) or not prompts:
        raise ValueError(
            f"`prompts`, the positive and the negative responses must be non-empty and of equal length, got "
            f"{len(prompts)}, {len(positive)} and {len(negative)}."
        )
    return _from_rows([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, positive, negative)],
                      source)


def read_contrast(data: Any, split: str = "train", what: str = "`data`") -> Contrast:
    """A :class:`Contrast` from a Dataset, a list of dicts, a local file or a Hub dataset id (or a Contrast)."""
    if isinstance(data, Contrast):
        return data
    if isinstance(data, (str, os.PathLike)):
        return _from_rows(_read_source(data, split, what), os.fspath(data))
    if isinstance(data, Mapping) or not isinstance(data, Sequence) and not hasattr(data, "column_names"):
        raise TypeError(f"{what} must be a datasets.Dataset, a list of dicts, a file or a Hub dataset id, got "
                        f"{type(data).__name__}.")
    name = getattr(getattr(data, "info", None), "dataset_name", None) or type(data).__name__
    return _from_rows(list(data), name)


def _read_source(data: str | os.PathLike, split: str, what: str) -> list:
    from ..hub import local_or_repo_id

    location = local_or_repo_id(data, what)
    if not isinstance(location, Path):
        from datasets import load_dataset

        return list(load_dataset(location, split=split))
    if not location.is_file():
        raise ValueError(f"{what}: {location} is a folder; give a .jsonl, .json, .csv or .parquet file.")
    suffix = location.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(location, what)
    if suffix == ".csv":
        return read_csv(location, what)
    if suffix == ".json":
        rows = read_json(location, what)
        if not isinstance(rows, list):
            raise ValueError(f"{what}: {location} holds a JSON {type(rows).__name__}, not a list of rows.")
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(location).to_pylist()
    raise ValueError(f"{what}: unsupported file {location}; use .jsonl, .json, .csv or .parquet.")


def _label(value: Any, row: int) -> bool:
    if isinstance(value, str):
        value = value.strip()
    if value in TRUE_LABELS and not isinstance(value, float):
        return True
    if value in FALSE_LABELS and not isinstance(value, float):
        return False
    raise PreferenceFormatError(f"row {row}, field `label`: expected true or false, got {value!r}.")


def _from_rows(rows: list, source: str) -> Contrast:
    if not rows:
        raise ValueError(f"the contrast data {source!r} has no rows.")
    positive, negative = [], []
    kind = None
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise PreferenceFormatError(f"row {i}: expected a dict, got {type(row).__name__}.")
        row_kind = "pairs" if "chosen" in row or "rejected" in row else "sets" if "completion" in row else None
        if row_kind is None:
            raise PreferenceFormatError(
                f"row {i}: expected `chosen`/`rejected` (pairs) or `prompt`/`completion`/`label` (two sets), got "
                f"the fields {sorted(row)}."
            )
        if kind is not None and row_kind != kind:
            raise PreferenceFormatError(f"row {i}: a {row_kind[:-1]} row among {kind} rows; use one shape.")
        kind = row_kind
        if kind == "pairs":
            triplet = to_triplet(row, i)
            positive.append((triplet.prompt, triplet.chosen))
            negative.append((triplet.prompt, triplet.rejected))
            continue
        if row.get("prompt") is None:
            raise PreferenceFormatError(f"row {i}: missing `prompt`; an unpaired row needs `prompt`, `completion` "
                                        "and `label`.")
        try:  # checked as a pair whose two sides are the completion: the same rules as for pairs
            triplet = to_triplet({"prompt": row["prompt"], "chosen": row["completion"],
                                  "rejected": row["completion"]}, i)
        except PreferenceFormatError as err:
            raise PreferenceFormatError(str(err).replace("`chosen`", "`completion`")) from None
        (positive if _label(row.get("label"), i) else negative).append((triplet.prompt, triplet.chosen))
    if not positive or not negative:
        raise ValueError(f"the contrast data {source!r} has {len(positive)} positive and {len(negative)} negative "
                         "responses; both sides need at least one.")
    return Contrast(positive, negative, kind, source)
