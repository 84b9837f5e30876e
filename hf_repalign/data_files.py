"""The public data sets the examples, benchmarks and tests use: HH-RLHF, AdvBench, TruthfulQA MC and MT-Bench.

Each ``load_*`` function takes its rows from the first of:

1. ``data=`` (a folder holding the public files in the layout of ``hf_repalign/sample_data``:
   ``hh-rlhf/harmless-base/test.jsonl.gz``, ``advbench/harmful_behaviors.csv``, ``truthfulqa/mc_task.json``,
   ``mt_bench/question.jsonl``), else ``$HF_REPALIGN_DATA``; a file missing there is an error, never a fallback;
2. the public set on the Hugging Face Hub, through ``datasets.load_dataset`` (a set downloaded once is also served
   from the ``datasets`` cache when offline);
3. the few dozen rows shipped in ``hf_repalign/sample_data`` (see its ``SOURCES.md``), with a one-line warning.

Rows come back in the shapes of the original files, whichever source they come from.

Example:
    >>> from hf_repalign.data_files import load_advbench, load_hh_rlhf
    >>> goals = load_advbench()[:50]                       # the Hub's walledai/AdvBench, or the sample offline
    >>> pairs = load_hh_rlhf("harmless-base", data="/data")  # /data/hh-rlhf/harmless-base/test.jsonl.gz
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .text_files import read_csv, read_json, read_jsonl

logger = logging.get_logger(__name__)

SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data"
DATA_ENV = "HF_REPALIGN_DATA"
_hub_unreachable: list[bool] = []  # set on a connection failure: later sets skip the Hub's retries (~25 s each)


class DataNotFoundError(FileNotFoundError):
    """An explicitly given data folder, or a file inside it, does not exist (the message is one line)."""


def read_advbench(path: str | os.PathLike) -> list[str]:
    """AdvBench ``harmful_behaviors.csv``: the ``goal`` column, in file order."""
    return [row["goal"] for row in read_csv(path)]


def read_mt_bench(path: str | os.PathLike) -> list[str]:
    """MT-Bench ``question.jsonl``: the first-turn questions, in file order."""
    return [row["turns"][0] for row in read_jsonl(path)]


def read_truthfulqa_mc(path: str | os.PathLike) -> list[dict]:
    """TruthfulQA ``mc_task.json``: ``{"question", "mc1_targets": {answer: 0/1}, "mc2_targets": ...}`` rows."""
    return read_json(path)


def _truthfulqa_from_hub(dataset: Any) -> list[dict]:
    # The Hub stores each target set as {"choices": [...], "labels": [...]}; mc_task.json as {answer: label}.
    def targets(column: dict) -> dict:
        return dict(zip(column["choices"], column["labels"]))

    return [{"question": row["question"], "mc1_targets": targets(row["mc1_targets"]),
             "mc2_targets": targets(row["mc2_targets"])} for row in dataset]


@dataclass(frozen=True)
class PublicSet:
    """Where one public set lives: its file in a data folder and its Hub id, with a reader for each."""

    file: str
    read: Callable[[Path], list]
    hub_id: str
    from_hub: Callable[[Any], list]
    hub_kwargs: dict = field(default_factory=dict)


def _hh(subset: str) -> PublicSet:
    return PublicSet(f"hh-rlhf/{subset}/test.jsonl.gz", read_jsonl, "Anthropic/hh-rlhf",
                     lambda dataset: [dict(row) for row in dataset], {"data_dir": subset, "split": "test"})


PUBLIC_SETS: dict[str, PublicSet] = {
    "hh-rlhf/harmless-base": _hh("harmless-base"),
    "hh-rlhf/helpful-base": _hh("helpful-base"),
    "advbench": PublicSet("advbench/harmful_behaviors.csv", read_advbench, "walledai/AdvBench",
                          lambda dataset: [row["prompt"] for row in dataset], {"split": "train"}),
    "truthfulqa": PublicSet("truthfulqa/mc_task.json", read_truthfulqa_mc, "truthfulqa/truthful_qa",
                            _truthfulqa_from_hub, {"name": "multiple_choice", "split": "validation"}),
    "mt_bench": PublicSet("mt_bench/question.jsonl", read_mt_bench, "HuggingFaceH4/mt_bench_prompts",
                          lambda dataset: [row["prompt"][0] for row in dataset], {"split": "train"}),
}


def data_folder(data: str | os.PathLike | None = None) -> Path | None:
    """The explicit data folder: ``data``, else ``$HF_REPALIGN_DATA``, else ``None``."""
    source = f"`{DATA_ENV}`" if data is None else "`data`"
    data = data if data is not None else os.environ.get(DATA_ENV) or None
    if data is None:
        return None
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(f"data folder {folder} (from {source}) does not exist.")
    return folder


def find_data_file(folder: Path, relative: str) -> Path:
    """``folder/relative``, or the same file stored uncompressed (``.gz`` dropped), as in ``sample_data``."""
    candidates = [folder / relative] + ([folder / relative[: -len(".gz")]] if relative.endswith(".gz") else [])
    for path in candidates:
        if path.is_file():
            return path
    raise DataNotFoundError(f"{relative} not found in the data folder {folder} (expected the layout of "
                            f"{SAMPLE_DATA}).")


def load_public(name: str, data: str | os.PathLike | None = None) -> list:
    """Rows of the public set ``name`` (a key of :data:`PUBLIC_SETS`) from ``data`` / ``$HF_REPALIGN_DATA``,
    else the Hub, else the shipped sample (see the module docstring)."""
    if name not in PUBLIC_SETS:
        raise ValueError(f"unknown public set {name!r}; choose one of {sorted(PUBLIC_SETS)}.")
    spec = PUBLIC_SETS[name]
    folder = data_folder(data)
    if folder is not None:
        return spec.read(find_data_file(folder, spec.file))
    try:
        if _hub_unreachable:
            raise ConnectionError("the Hub was unreachable for an earlier set in this process")
        from datasets import load_dataset

        dataset = load_dataset(spec.hub_id, **spec.hub_kwargs)
    except Exception as err:  # offline, Hub down, set moved: any failure of the download falls back the same way
        reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"
        if isinstance(err, ConnectionError) and not _hub_unreachable:
            _hub_unreachable.append(True)
        rows = spec.read(find_data_file(SAMPLE_DATA, spec.file))
        logger.warning(f"{name}: could not load {spec.hub_id} from the Hub ({reason}); using the {len(rows)}-row "
                       f"sample shipped with hf_repalign. Pass --data PATH or set {DATA_ENV} for the full set.")
        return rows
    return spec.from_hub(dataset)


def load_hh_rlhf(subset: str = "harmless-base", data: str | os.PathLike | None = None) -> list[dict]:
    """HH-RLHF test pairs ``{"chosen", "rejected"}`` of ``subset`` (``"harmless-base"`` or ``"helpful-base"``)."""
    return load_public(f"hh-rlhf/{subset}", data)


def load_advbench(data: str | os.PathLike | None = None) -> list[str]:
    """AdvBench harmful-behaviour goals, in file order."""
    return load_public("advbench", data)


def load_truthfulqa_mc(data: str | os.PathLike | None = None) -> list[dict]:
    """TruthfulQA multiple-choice rows ``{"question", "mc1_targets": {answer: 0/1}, "mc2_targets": {...}}``."""
    return load_public("truthfulqa", data)


def load_mt_bench(data: str | os.PathLike | None = None) -> list[str]:
    """MT-Bench first-turn questions, in file order."""
    return load_public("mt_bench", data)


def _existing_folder(value: str) -> Path:
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"data folder {folder} does not exist")
    return folder


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """``--data PATH`` for scripts that read the public sets (see the module docstring for the fallbacks)."""
    parser.add_argument(
        "--data", type=_existing_folder, default=None, metavar="PATH",
        help=f"folder with the public data files (layout of hf_repalign/sample_data); default: ${DATA_ENV}, else "
             "the sets on the Hugging Face Hub, else the small shipped sample (with a warning)",
    )
