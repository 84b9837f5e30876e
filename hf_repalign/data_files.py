"""Readers for the public data files the project's examples, benchmarks and checks use (``../shared/data``).

Example:
    >>> from hf_repalign.data_files import shared_data_dir, read_advbench
    >>> goals = read_advbench(shared_data_dir() / "advbench" / "harmful_behaviors.csv")[:50]
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path


def shared_data_dir() -> Path:
    """``$HF_REPALIGN_DATA``, else ``shared/data`` beside the project checkout."""
    if os.environ.get("HF_REPALIGN_DATA"):
        return Path(os.environ["HF_REPALIGN_DATA"])
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"real data folder {path} not found; set HF_REPALIGN_DATA to its location.")
    return path


def read_advbench(path: str | os.PathLike) -> list[str]:
    """AdvBench ``harmful_behaviors.csv``: the ``goal`` column, in file order."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["goal"] for row in csv.DictReader(handle)]


def read_mt_bench(path: str | os.PathLike) -> list[str]:
    """MT-Bench ``question.jsonl``: the first-turn questions, in file order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["turns"][0] for line in handle if line.strip()]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """JSON lines, gzip-compressed when the name ends in ``.gz`` (HH-RLHF's ``test.jsonl.gz``)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_truthfulqa_mc(path: str | os.PathLike) -> list[dict]:
    """TruthfulQA ``mc_task.json``: ``{"question", "mc1_targets": {answer: 0/1}, "mc2_targets": ...}`` rows."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
