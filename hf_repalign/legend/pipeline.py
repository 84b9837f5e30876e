"""The ``legend-margin`` pipeline: raw LEGEND margins of preference pairs, and whole-dataset annotation.

Registered with ``transformers.pipeline`` when ``hf_repalign`` is imported; without ``model=`` it uses the
embedded SmolLM2-135M-Instruct.

Example:
    >>> import hf_repalign
    >>> from transformers import pipeline
    >>> pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector="out/margin-vector")
    >>> pipe({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."})
    {'margin_raw': 0.42}
    >>> pipe.save_pretrained("out/annotator")  # model + tokenizer + margin_vector/
    >>> pipe = pipeline("legend-margin", model="out/annotator")  # all three reloaded
    >>> annotated = pipe.annotate("hh-rlhf/harmless-base/test.jsonl.gz", num_bins=10, output="out.jsonl")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

from ..formats import PreferenceFormatError, PreferenceTriplet, check_template, to_triplet
from ..models import context_length
from .embedding import TRUNCATIONS, check_causal, embed_pairs, embed_sequences, pair_embeddings
from .margin import margin_raw
from .vector import MarginVector

logger = logging.get_logger(__name__)

TASK = "legend-margin"
VECTOR_FOLDER = "margin_vector"  # where pipe.save_pretrained puts the vector, next to the model
_UNSET = object()


class _Row(NamedTuple):
    """A parsed row, carrying its index so preprocessing errors and truncations name it."""

    index: int
    triplet: PreferenceTriplet


def _as_row(example: Any, index: int) -> _Row:
    if isinstance(example, PreferenceTriplet):
        return _Row(index, example)
    if not isinstance(example, Mapping):
        raise PreferenceFormatError(
            f"row {index}: expected a preference row (a dict with `chosen` and `rejected`), got "
            f"{type(example).__name__}."
        )
    return _Row(index, to_triplet(example, index))


def _rows(inputs: Iterable) -> Iterator[_Row]:
    return (_as_row(example, i) for i, example in enumerate(inputs))


def load_vector(vector: MarginVector | str | os.PathLike) -> MarginVector:
    """A :class:`MarginVector`, or a folder / Hub repo id holding one."""
    if isinstance(vector, MarginVector):
        return vector
    if isinstance(vector, (str, os.PathLike)):
        return MarginVector.from_pretrained(vector)
    raise TypeError(f"`margin_vector` must be a MarginVector, a folder or a Hub repo id, got {type(vector).__name__}.")


class LegendMarginPipeline(Pipeline):
    """``{"margin_raw": (emb(prompt, chosen) - emb(prompt, rejected)) . direction}`` for each preference pair.

    Inputs are TRL preference rows (explicit ``prompt``/``chosen``/``rejected`` or implicit ``chosen``/``rejected``
    dialogues, strings or message lists): one row (a dict) gives one result; a list or a ``datasets.Dataset``
    gives a list; a generator or a torch ``Dataset`` (e.g. ``KeyDataset``) gives an iterator, as in every
    transformers pipeline. Parameters (at construction or per call):

    - ``margin_vector``: a :class:`MarginVector` fitted on this model, or its folder / Hub repo id (its layer,
      pooling and template are used). A model folder written by :meth:`save_pretrained` brings its own;
    - ``template``: override the vector's text template;
    - ``max_length``: longest sequence (default: the model's context length);
    - ``truncation``: ``"error"`` (default) refuses longer rows, ``"left"`` cuts their prompt from the left.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_causal(self.model)
        if self.tokenizer is None:
            raise ValueError("the legend-margin pipeline needs a tokenizer.")
        if self.tokenizer.pad_token is None:  # batching pads; the pad id is masked out anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if "margin_vector" not in self._forward_params:
            bundled = self._bundled_vector()
            if bundled is not None:
                self._preprocess_params["margin_vector"] = self._forward_params["margin_vector"] = bundled
        self.last_truncated_rows: list[int] = []
        self.last_dropped_rows: list[int] = []  # set by annotate(..., drop_invalid=True)
        self.last_diagnostics: dict[str, Any] = {}  # set by annotate()

    def __repr__(self) -> str:
        vector = self._forward_params.get("margin_vector")
        return (f"{type(self).__name__}(model={getattr(self.model.config, '_name_or_path', '') or '?'!r}, "
                f"device={self.device}, batch_size={self._batch_size}, margin_vector={vector!r})")

    def _bundled_vector(self) -> MarginVector | None:
        """The vector that :meth:`save_pretrained` stored next to this model, if the model came from such a folder."""
        folder = Path(str(getattr(self.model.config, "_name_or_path", "") or "")) / VECTOR_FOLDER
        if not (folder / "config.json").is_file():
            return None
        vector = MarginVector.from_pretrained(folder)
        vector.check_compatible(self.model, check_name=False)  # saved together with these very weights
        return vector

    def _sanitize_parameters(self, margin_vector=None, template=_UNSET, max_length=None, truncation=None, **kwargs):
        if kwargs:
            raise TypeError(f"unknown legend-margin pipeline argument(s): {sorted(kwargs)}.")
        preprocess, forward = {}, {}
        if margin_vector is not None:
            margin_vector = load_vector(margin_vector)
            margin_vector.check_compatible(self.model)
            preprocess["margin_vector"] = forward["margin_vector"] = margin_vector
        if template is not _UNSET:
            preprocess["template"] = check_template(template)
        if max_length is not None:
            preprocess["max_length"] = max_length
        if truncation is not None:
            if truncation not in TRUNCATIONS:
                raise ValueError(f"`truncation` must be one of {TRUNCATIONS}, got {truncation!r}.")
            preprocess["truncation"] = truncation
        return preprocess, forward, {}

    def __call__(self, inputs, **kwargs):
        """Margins of one pair, a list, a ``datasets.Dataset``, a generator or a torch ``Dataset`` of pairs.

        Lists and ``datasets.Dataset`` are checked row by row first (errors name the row) and give a list;
        generators and torch datasets stream and give an iterator, their rows checked as they come (and named).
        Rows whose prompt was cut (``truncation="left"``) are listed in ``last_truncated_rows``.
        """
        self.last_truncated_rows = []
        if isinstance(inputs, (Mapping, PreferenceTriplet)):
            return super().__call__(_as_row(inputs, 0), **kwargs)
        if _is_hf_dataset(inputs) or isinstance(inputs, (list, tuple)):
            return super().__call__(list(_rows(inputs)), **kwargs)
        # Streams (generators, torch map-style datasets such as KeyDataset, other iterables) stay lazy.
        if isinstance(inputs, torch.utils.data.Dataset) or (
            isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes))
        ):
            return super().__call__(_rows(inputs), **kwargs)
        raise TypeError(
            f"legend-margin takes a preference row (dict), a list, a datasets.Dataset, a generator or a torch "
            f"Dataset of rows, got {type(inputs).__name__}."
        )

    def encode(self, example: Mapping[str, Any] | PreferenceTriplet, row: int | None = None, **params):
        """``(model inputs, number of truncated sides)`` of one row; errors name ``row``."""
        return self.encode_rows([example], None if row is None else [row], **params)[0]

    def encode_rows(self, examples: Sequence[Mapping[str, Any] | PreferenceTriplet], rows: Sequence[int] | None = None,
                    margin_vector=None, template=_UNSET, max_length=None, truncation="error"):
        """:meth:`encode` over many rows with batched tokenization; errors name ``rows[i]``."""
        from .embedding import encode_triplets

        if margin_vector is None:
            raise ValueError("no `margin_vector`: pass one to pipeline(...) or to the call.")
        triplets = [ex if isinstance(ex, PreferenceTriplet) else to_triplet(ex, None if rows is None else rows[i])
                    for i, ex in enumerate(examples)]
        template = margin_vector.template if template is _UNSET else template
        max_length = max_length or context_length(self.model)
        return encode_triplets(self.tokenizer, triplets, template, max_length, truncation, rows)

    def preprocess(self, inputs, **preprocess_params):
        row, example = (inputs.index, inputs.triplet) if isinstance(inputs, _Row) else (0, inputs)
        item, truncated = self.encode(example, row, **preprocess_params)
        if truncated:
            self.last_truncated_rows.append(row)
            logger.warning(f"row {row}: cut the prompt from the left to fit max_length (truncation='left').")
        return item

    def _forward(self, model_inputs, margin_vector=None):
        if margin_vector is None:
            raise ValueError("no `margin_vector`: pass one to pipeline(...) or to the call.")
        chosen, rejected = pair_embeddings(
            self.model, model_inputs, margin_vector.layer, margin_vector.pooling, self.tokenizer.padding_side
        )
        return {"margin_raw": margin_raw(chosen, rejected, margin_vector.direction)}

    def postprocess(self, model_outputs):
        return {"margin_raw": float(model_outputs["margin_raw"].reshape(-1)[0])}

    def embed_items(self, items, views, batch_size: int, window: int | None = None, progress=None):
        """:func:`~hf_repalign.legend.embedding.embed_pairs` on this pipeline's model, device and inference mode."""

        def forward(sequences, resolved):
            with self.device_placement(), torch.inference_mode():
                return embed_sequences(self.model, sequences, resolved)

        return embed_pairs(self.model, items, views, batch_size, window, progress, forward=forward)

    def annotate(self, data, num_bins: int | None = 10, **kwargs):
        """Add ``margin_raw`` and binned ``margin`` columns to a dataset; see :func:`hf_repalign.legend.annotate`."""
        from .annotate import annotate_with

        return annotate_with(self, data, num_bins=num_bins, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the model, the tokenizer and the margin vector (in ``margin_vector/``), so that
        ``pipeline("legend-margin", model=save_directory)`` reloads all three."""
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"`save_directory` {save_directory} is a file, not a folder.")
        vector = self._forward_params.get("margin_vector")
        save_directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        self.tokenizer.save_pretrained(save_directory, **kwargs)
        if vector is not None:
            vector.save_pretrained(save_directory / VECTOR_FOLDER)
        else:
            logger.warning("this pipeline has no margin vector; saved only the model and the tokenizer.")


def _is_hf_dataset(inputs: Any) -> bool:
    try:
        from datasets import Dataset
    except ImportError:  # `datasets` is optional for the pipeline itself
        return False
    return isinstance(inputs, Dataset)


class _EmbeddedDefault(dict):
    """``pipeline("legend-margin")`` without a model: the embedded model's local folder, converted on first use
    (looked up only then, so importing hf_repalign never converts anything)."""

    def __getitem__(self, key):
        if key == "model":
            from ..models import embedded_model_path

            return str(embedded_model_path()), None
        return super().__getitem__(key)


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=LegendMarginPipeline, pt_model=AutoModelForCausalLM, type="text",
    default=_EmbeddedDefault(model=None),
)
