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
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from transformers.utils.logging import tqdm  # honours disable_progress_bar() and HF_HUB_DISABLE_PROGRESS_BARS
from transformers.utils import logging

from ..artifacts import atomic_write_text
from ..formats import PreferenceFormatError
from .binning import equal_frequency_bins
from .checkpoints import OutputLock, parts_dir, prepare_parts, read_chunk, run_fingerprint
from .data import OUTPUT_SUFFIXES, load_data, write_dataset
from .diagnostics import length_diagnostics
from .embedding import response_length
from .margin import length_slope, margin_raw, remove_length
from .vector import MarginVector

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.get_logger(__name__)


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
    length_control: bool = False,
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

    ``length_control=True`` removes what the margins share with the response-length difference: the least-squares
    slope of ``margin_raw`` on the length difference (tokens, chosen minus rejected) over this dataset is
    subtracted, ``margin_length_controlled = margin_raw - slope * length_diff`` (a pair of equally long responses
    keeps its margin), and ``margin`` bins that column. The slope and the correlations after control are in the
    diagnostics (``"length_control"``).
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
        controlled, control = None, None
        if length_control:
            slope = length_slope(margins, lengths)
            controlled = remove_length(margins, lengths, slope)
            control = {"slope_per_token": slope, **length_diagnostics(controlled, lengths, warn=False)}
        annotated = add_margin_columns(dataset, margins, num_bins, controlled)
        if output is not None:
            if state.is_main_process:
                write_dataset(annotated, output)
            state.wait_for_everyone()
            if state.is_main_process:
                shutil.rmtree(parts_dir(Path(output)), ignore_errors=True)
    pipe.last_diagnostics = length_diagnostics(margins, lengths)
    if control is not None:
        pipe.last_diagnostics["length_control"] = control
    return (annotated, pipe.last_diagnostics) if with_diagnostics else annotated


def _annotate_rows(pipe, data, output, resume, batch_size, window, checkpoint_every, progress, drop_invalid, state,
                   call_kwargs):
    """``(dataset, margin_raw per row, response-length difference per row)``, gathered over all processes."""
    dataset, dropped = load_data(data, drop_invalid)
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
        parts = parts_dir(Path(output))
        settings = {"chunk": checkpoint_every, **{k: v for k, v in preprocess_params.items() if k != "margin_vector"}}
        fingerprint = run_fingerprint(dataset, vector, pipe.model, settings)
        run = fingerprint["run"]
        prepare_parts(parts, fingerprint, resume, state)

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
                saved = read_chunk(chunk_file(c), start, stop, run)
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



def add_margin_columns(dataset: Dataset, margins: Sequence[float], num_bins: int | None,
                       controlled: Sequence[float] | None = None) -> Dataset:
    """``dataset`` plus ``margin_raw`` and ``margin`` (binned, or raw when ``num_bins=None``), rows in order.

    With ``controlled`` (length-controlled margins) that column is added as ``margin_length_controlled`` and is
    what ``margin`` bins.
    """
    scored = list(margins) if controlled is None else list(controlled)
    binned = scored if num_bins is None else equal_frequency_bins(scored, num_bins)
    existing = [c for c in ("margin_raw", "margin_length_controlled", "margin") if c in dataset.column_names]
    if existing:
        logger.warning(f"replacing the existing column(s) {existing} with new LEGEND margins.")
        dataset = dataset.remove_columns(existing)
    dataset = dataset.add_column("margin_raw", [float(m) for m in margins])
    if controlled is not None:
        dataset = dataset.add_column("margin_length_controlled", [float(m) for m in controlled])
    return dataset.add_column("margin", [float(m) for m in binned])


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
