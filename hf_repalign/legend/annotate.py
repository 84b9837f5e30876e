"""Annotate a whole preference dataset with LEGEND margins: batched, resumable, data-parallel.

Rows are processed in fixed-size chunks (``checkpoint_every`` rows). Under ``accelerate launch`` each process takes
a contiguous run of chunks, and the results are gathered back in row order. With ``output=...`` every finished
chunk is checkpointed next to the output, so ``resume=True`` skips it after an interruption; the output file
itself only appears, by an atomic rename, once the whole dataset is done.

Example:
    >>> from hf_repalign.legend import annotate
    >>> ds = annotate("harmless-base/test.jsonl.gz", margin_vector=vec, model=model, tokenizer=tokenizer,
    ...               output="harmless_margins.jsonl", resume=True)
    >>> ds.column_names  # ['chosen', 'rejected', 'margin_raw', 'margin']
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import PartialState

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
from accelerate.utils import gather_object, parse_flag_from_env
from transformers.utils.logging import tqdm  # honours disable_progress_bar() and HF_HUB_DISABLE_PROGRESS_BARS
from transformers.utils import logging

from ..text_files import read_jsonl
from ..formats import PreferenceFormatError, to_triplet
from ..hub import atomic_write_text
from .binning import equal_frequency_bins
from .embedding import EMBEDDING_VERSION, response_length
from .margin import margin_raw
from .vector import MarginVector

if TYPE_CHECKING:  # `datasets` is imported lazily: the pipeline itself runs without it
    from datasets import Dataset

logger = logging.get_logger(__name__)

OUTPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


# --------------------------------------------------------------------------------------------------- input / output
def load_preference_data(
    data: Dataset | Sequence[Mapping[str, Any]] | str | os.PathLike, drop_invalid: bool = False
) -> Dataset:
    """A ``datasets.Dataset`` from a Dataset, a list of dicts, or a jsonl / json / parquet / ``.jsonl.gz`` path.

    Lists and files are checked row by row before conversion, so a bad row is reported by number rather than as
    an Arrow type error. ``drop_invalid=True`` drops rows that are not valid preference triplets instead, with a
    warning that counts and names them.
    """
    return _load(data, drop_invalid)[0]


def _load(data, drop_invalid: bool) -> tuple[Dataset, dict[int, str]]:
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


def _surrogate_in(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, Mapping):
        return any(_surrogate_in(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_surrogate_in(v) for v in value)
    return False


def conversion_error(rows: Sequence[Mapping[str, Any]], indices: Sequence[int], columns: Sequence[str]):
    """The first row that stops a list of dicts from becoming one Arrow table, as a :class:`PreferenceFormatError`
    naming the row and the column (``None`` if no cause is found)."""
    first: dict[str, tuple[int, str]] = {}
    for index, row in zip(indices, rows):
        for key in columns:
            value = row.get(key)
            if value is None:
                continue
            if _surrogate_in(value):
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
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            return json.load(handle)
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
    """Write ``dataset`` to ``path`` (.jsonl, .json or .parquet) through a temp file and an atomic rename."""
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"`output`: unsupported suffix {path.suffix!r} in {path}; use one of {OUTPUT_SUFFIXES}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if path.suffix == ".parquet":
            os.close(fd)
            dataset.to_parquet(tmp)
        else:  # json.dumps keeps floats exact (pandas' writer rounds to 15 digits)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                rows = (json.dumps(row, ensure_ascii=False) for row in dataset)
                if path.suffix == ".jsonl":
                    handle.writelines(line + "\n" for line in rows)
                else:
                    handle.write("[" + ",\n".join(rows) + "]\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------------- checkpoints
def _parts_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.parts")


def _lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


class OutputLockedError(RuntimeError):
    """Another annotate run holds the lock on the same output."""


class OutputLock:
    """An exclusive lock on one ``output`` (and its checkpoint folder): a second run on the same output fails at
    once, in one line, instead of both writing and one result being lost. Released on exit, even on errors."""

    def __init__(self, output: Path):
        self.path = _lock_path(output)
        self.handle = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # Windows: no advisory locks; runs on one output are not guarded there
            return self
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputLockedError(f"another annotate run ({holder}) is writing {self.path.name[1:-5]}; wait for it "
                                    f"or choose another `output` (lock: {self.path}).") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is None:
            return
        self.path.unlink(missing_ok=True)  # unlinked while still held: a waiting run then fails or retries cleanly
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _model_signature(model: torch.nn.Module) -> dict[str, str]:
    """What about the model changes a margin: its name, dtype and architecture (the weights are too costly to hash
    at every start; the name stands for them)."""
    config = model.config.to_json_string(use_diff=True) if hasattr(model.config, "to_json_string") else ""
    return {"model": str(getattr(model.config, "name_or_path", "")), "model_dtype": str(model.dtype),
            "model_config_sha256": hashlib.sha256(config.encode()).hexdigest()[:16]}


def _run_fingerprint(dataset: Dataset, vector: MarginVector, model: torch.nn.Module,
                     settings: Mapping[str, Any]) -> dict:
    """Everything that changes a margin: the data, the vector, the model (name, dtype, config), the embedding
    code's version, the template / max_length / truncation and the chunk size."""
    digest = hashlib.sha256()
    fields = [f for f in PREFERENCE_FIELDS if f in dataset.column_names]
    for row in dataset.select_columns(fields):
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    fingerprint = {"rows": len(dataset), "data_sha256": digest.hexdigest(), "vector": vector.fingerprint(),
                   "embedding_version": EMBEDDING_VERSION, **_model_signature(model),
                   **{k: _stable_repr(v) for k, v in settings.items()}}
    fingerprint["run"] = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return fingerprint


def _stable_repr(value: Any) -> str:
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


def _prepare_parts(parts: Path, fingerprint: dict, resume: bool, state: PartialState) -> None:
    manifest = parts / "manifest.json"
    if state.is_main_process:
        if parts.is_dir() and resume and manifest.is_file():
            found = json.loads(manifest.read_text())
            if found != fingerprint:
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


def _read_chunk(path: Path, start: int, stop: int, run: str) -> dict:
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


def _sync_error(state: PartialState, error: Exception | None) -> None:
    """Raise the first process's input error on every process, so none waits forever at the next gather."""
    messages = gather_object([None if error is None else f"{type(error).__name__}: {error}"])
    if error is not None:
        raise error
    failed = [m for m in messages if m is not None]
    if failed:
        raise PreferenceFormatError(f"another process failed: {failed[0]}")


# --------------------------------------------------------------------------------------------------- annotation
def distributed_state() -> PartialState:
    """The ``accelerate`` process state; CPU-only launches (no accelerator, or ``--cpu``) use the gloo backend."""
    no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or no_accelerator)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and state.num_processes != world:
        raise RuntimeError(
            f"launched with WORLD_SIZE={world} but accelerate's state has {state.num_processes} process(es): a "
            "PartialState() was created before annotate() without cpu=True on a machine without an accelerator; "
            "create it with hf_repalign.legend.annotate.distributed_state() instead."
        )
    return state


def annotate_with(
    pipe,
    data: Dataset | Sequence[Mapping[str, Any]] | str | os.PathLike,
    num_bins: int | None = 10,
    output: str | os.PathLike | None = None,
    resume: bool = False,
    batch_size: int | None = None,
    window: int | None = None,
    checkpoint_every: int = 512,
    progress: bool = True,
    drop_invalid: bool = False,
    with_diagnostics: bool = False,
    **call_kwargs,
) -> Dataset | tuple[Dataset, dict[str, Any]]:
    """Annotate ``data`` with ``pipe`` (a :class:`LegendMarginPipeline`).

    Returns the dataset with every input column in the original order plus ``margin_raw`` (float) and ``margin``:
    equal-frequency bins ``k / num_bins``, or ``margin_raw`` itself when ``num_bins=None``. ``call_kwargs`` are the
    pipeline's parameters (``margin_vector``, ``template``, ``max_length``, ``truncation``). Rows that had their
    prompt cut (``truncation="left"``) are counted in a warning and listed in ``pipe.last_truncated_rows``.
    Rows that are not valid preference pairs are an error naming the row and field, unless ``drop_invalid=True``:
    then they are left out of the result, counted in a warning and listed (original indices) in
    ``pipe.last_dropped_rows``. Margins that come out NaN or infinite (e.g. float16 overflow) are an error.

    ``batch_size`` counts pairs; a forward takes ``2 * batch_size`` sides of similar length. The length diagnostic
    (:func:`length_diagnostics`: how far ``margin_raw`` just follows the response-length difference) is logged,
    kept in ``pipe.last_diagnostics``, and returned as ``(dataset, diagnostics)`` with ``with_diagnostics=True``.
    With ``output=``, the output holds an exclusive lock for the whole run (a second run on it fails at once).
    """
    if num_bins is not None and (isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1):
        raise ValueError(f"`num_bins` must be a positive integer or None, got {num_bins!r}.")
    if checkpoint_every < 1:
        raise ValueError(f"`checkpoint_every` must be >= 1, got {checkpoint_every}.")
    if resume and output is None:
        raise ValueError("resume=True needs `output`: checkpoints are kept next to the output file.")
    if output is not None and Path(output).suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"`output`: unsupported suffix in {output}; use one of {OUTPUT_SUFFIXES}.")
    state = distributed_state()
    lock = OutputLock(Path(output)) if output is not None and state.is_main_process else contextlib.nullcontext()
    with lock:
        dataset, margins, lengths = _annotate_rows(pipe, data, output, resume, batch_size, window, checkpoint_every,
                                                   progress, drop_invalid, state, call_kwargs)
        annotated = add_margin_columns(dataset, margins, num_bins)
        if output is not None:
            if state.is_main_process:
                write_dataset(annotated, output)
            state.wait_for_everyone()
            if state.is_main_process:
                shutil.rmtree(_parts_dir(Path(output)), ignore_errors=True)
    pipe.last_diagnostics = length_diagnostics(margins, lengths)
    return (annotated, pipe.last_diagnostics) if with_diagnostics else annotated


def _annotate_rows(pipe, data, output, resume, batch_size, window, checkpoint_every, progress, drop_invalid, state,
                   call_kwargs):
    """``(dataset, margin_raw per row, response-length difference per row)``, gathered over all processes."""
    dataset, dropped = _load(data, drop_invalid)
    pipe.last_dropped_rows = sorted(dropped)
    preprocess_params, forward_params, _ = pipe._sanitize_parameters(**call_kwargs)
    preprocess_params = {**pipe._preprocess_params, **preprocess_params}
    forward_params = {**pipe._forward_params, **forward_params}
    vector = forward_params.get("margin_vector")
    if vector is None:
        raise ValueError("no `margin_vector`: pass one to pipeline(...) or to annotate(...).")
    batch_size = batch_size or pipe._batch_size or 8
    view = (vector.layer, vector.pooling)

    n = len(dataset)
    chunks = [(start, min(start + checkpoint_every, n)) for start in range(0, n, checkpoint_every)]
    with state.split_between_processes(list(range(len(chunks)))) as mine:
        mine = list(mine)
    parts, run = None, None
    if output is not None:
        parts = _parts_dir(Path(output))
        settings = {"chunk": checkpoint_every, **{k: v for k, v in preprocess_params.items() if k != "margin_vector"}}
        fingerprint = _run_fingerprint(dataset, vector, pipe.model, settings)
        run = fingerprint["run"]
        _prepare_parts(parts, fingerprint, resume, state)

    def chunk_file(index: int) -> Path:
        return parts / f"chunk-{index:06d}.json"

    # Encode every row this process still has to compute before any forward, so bad input fails fast.
    todo = [c for c in mine if not (parts is not None and chunk_file(c).is_file())]
    encoded: dict[int, list] = {}
    error = None
    try:
        for c in todo:
            start, stop = chunks[c]
            encoded[c] = pipe.encode_rows(dataset.select(range(start, stop)), range(start, stop), **preprocess_params)
    except (PreferenceFormatError, ValueError) as err:
        error = err
    _sync_error(state, error)

    results = []
    total = sum(chunks[c][1] - chunks[c][0] for c in mine)
    where = f" (process {state.process_index + 1}/{state.num_processes})" if state.num_processes > 1 else ""
    bar = tqdm(total=total, desc=f"legend-margin{where}", unit="pair", disable=not (progress and state.is_main_process))
    with bar:
        for c in mine:
            start, stop = chunks[c]
            if c not in encoded:
                saved = _read_chunk(chunk_file(c), start, stop, run)
                results.append((c, saved["margin_raw"], saved["truncated_rows"], saved["length_diff"]))
                bar.update(stop - start)
                continue
            pairs = encoded.pop(c)
            items = [item for item, _ in pairs]
            truncated = [start + i for i, (_, sides) in enumerate(pairs) if sides]
            lengths = [response_length(item, "chosen") - response_length(item, "rejected") for item in items]
            embedded = pipe.embed_items(items, [view], batch_size, window, bar)[view]
            margins = margin_raw(embedded[:, 0], embedded[:, 1], vector.direction).tolist()
            if parts is not None:
                atomic_write_text(chunk_file(c), json.dumps({
                    "run": run, "start": start, "stop": stop, "margin_raw": margins, "truncated_rows": truncated,
                    "length_diff": lengths}))
            results.append((c, margins, truncated, lengths))
    gathered = sorted(gather_object(results), key=lambda r: r[0])
    margins = [m for _, chunk_margins, _, _ in gathered for m in chunk_margins]
    truncated = [row for _, _, rows, _ in gathered for row in rows]
    lengths = [d for _, _, _, chunk_lengths in gathered for d in chunk_lengths]
    if len(margins) != n:
        raise RuntimeError(f"gathered {len(margins)} margins for {n} rows; the processes disagree on the data.")
    not_finite = [i for i, m in enumerate(margins) if not math.isfinite(m)]
    if not_finite:
        raise ValueError(
            f"margin_raw is NaN or infinite in {len(not_finite)} of {n} rows (first: {not_finite[:10]}): the model's "
            "hidden states overflowed; run the model in float32 or bfloat16 rather than float16."
        )
    pipe.last_truncated_rows = truncated
    if truncated:
        logger.warning(
            f"cut the prompt from the left in {len(truncated)} of {n} rows to fit max_length (truncation='left'); "
            f"first rows: {truncated[:10]}."
        )
    return dataset, margins, lengths


LENGTH_WARNING = 0.5  # |Spearman rho| above which the length difference is said to dominate the margins
LENGTH_WARNING_MIN_PAIRS = 20  # below this a rank correlation says little


def length_diagnostics(margins: Sequence[float], length_diff: Sequence[float]) -> dict[str, Any]:
    """How far ``margin_raw`` follows the response-length difference (chosen minus rejected, in tokens).

    Returns ``{"pairs", "pearson_margin_vs_length_diff", "spearman_margin_vs_length_diff",
    "length_dominates"}`` (correlations are None for fewer than 3 pairs or constant inputs), logs it, and warns
    when ``|spearman| >= 0.5`` over at least 20 pairs: then "the shorter response is safer" explains much of what
    the margins say, and a length-only baseline should be compared before trusting them.
    """
    out: dict[str, Any] = {"pairs": len(margins), "pearson_margin_vs_length_diff": None,
                           "spearman_margin_vs_length_diff": None, "length_dominates": False}
    if len(margins) >= 3:
        x = torch.tensor(list(margins), dtype=torch.float64)
        y = torch.tensor(list(length_diff), dtype=torch.float64)
        out["pearson_margin_vs_length_diff"] = _pearson(x, y)
        out["spearman_margin_vs_length_diff"] = _pearson(_ranks(x), _ranks(y))
    rho = out["spearman_margin_vs_length_diff"]
    if rho is not None and abs(rho) >= LENGTH_WARNING and len(margins) >= LENGTH_WARNING_MIN_PAIRS:
        out["length_dominates"] = True
        logger.warning(
            f"margin_raw follows the response-length difference (Spearman {rho:+.2f} over {len(margins)} pairs): "
            "the margins may mostly say which response is shorter. Compare them with a length-only baseline "
            "before using them (see docs/legend.md)."
        )
    else:
        logger.info(f"length diagnostic: {out}")
    return out


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    ordered, order = values.sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(values)
    ranks[order] = (starts + (counts - 1) / 2).to(values.dtype)[inverse]
    return ranks


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return None if denominator == 0 else round(float(x @ y) / denominator, 6)


def add_margin_columns(dataset: Dataset, margins: Sequence[float], num_bins: int | None) -> Dataset:
    """``dataset`` plus ``margin_raw`` and ``margin`` (binned, or raw when ``num_bins=None``), rows in order."""
    binned = list(margins) if num_bins is None else equal_frequency_bins(margins, num_bins)
    existing = [c for c in ("margin_raw", "margin") if c in dataset.column_names]
    if existing:
        logger.warning(f"replacing the existing column(s) {existing} with new LEGEND margins.")
        dataset = dataset.remove_columns(existing)
    return dataset.add_column("margin_raw", [float(m) for m in margins]).add_column("margin", binned)


def annotate(
    data: Dataset | Sequence[Mapping[str, Any]] | str | os.PathLike,
    margin_vector: MarginVector | str | os.PathLike,
    model: Any = None,
    tokenizer: Any = None,
    num_bins: int | None = 10,
    batch_size: int = 8,
    device: str | int | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    **kwargs,
) -> Dataset:
    """One-call annotation: builds the ``legend-margin`` pipeline and runs :meth:`LegendMarginPipeline.annotate`.

    ``model`` is a loaded model (give ``tokenizer`` too), a path / Hub id, or ``None`` for the embedded model;
    ``dtype`` applies when it is loaded here (e.g. ``"bfloat16"``). Under ``accelerate launch`` each process runs
    on its own device.
    ``margin_vector`` is a :class:`MarginVector` or its folder / Hub repo id.
    """
    from transformers import pipeline

    from ..models import load_model_and_tokenizer

    if model is None or isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model_and_tokenizer(model, dtype=dtype)
    elif dtype is not None:
        raise ValueError("`dtype` applies only to a model loaded by annotate(); convert a loaded model yourself.")
    elif tokenizer is None:
        raise ValueError("`tokenizer` is required when `model` is a loaded model.")
    state = distributed_state()
    if device is None:
        device = state.device if state.num_processes > 1 else model.device
    model.to(device)
    if isinstance(margin_vector, (str, os.PathLike)):
        margin_vector = MarginVector.from_pretrained(margin_vector)
    pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=margin_vector,
                    batch_size=batch_size, device=device)
    return pipe.annotate(data, num_bins=num_bins, **kwargs)
