"""The ``legend-margin`` pipeline: raw LEGEND margins of preference pairs, and whole-dataset annotation.

Registered with ``transformers.pipeline`` when ``hf_repalign`` is imported.

Example:
    >>> import hf_repalign
    >>> from transformers import pipeline
    >>> pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, batch_size=16)
    >>> pipe([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    [{'margin_raw': 0.42}]
    >>> annotated = pipe.annotate("hh-rlhf/harmless-base/test.jsonl.gz", num_bins=10, output="out.jsonl")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

from ..formats import PreferenceTriplet, to_triplet
from .embedding import TRUNCATIONS, encode_triplets, pair_embeddings
from .margin import margin_raw
from .vector import MarginVector

logger = logging.get_logger(__name__)

TASK = "legend-margin"
_UNSET = object()


class _Row(NamedTuple):
    """A parsed row of a list input, carrying its index so preprocessing errors and truncations name it."""

    index: int
    triplet: PreferenceTriplet


def context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class LegendMarginPipeline(Pipeline):
    """``{"margin_raw": (emb(prompt, chosen) - emb(prompt, rejected)) . direction}`` for each preference pair.

    Inputs are TRL preference rows (explicit ``prompt``/``chosen``/``rejected`` or implicit ``chosen``/``rejected``
    dialogues, strings or message lists). Parameters (at construction or per call):

    - ``margin_vector``: a :class:`MarginVector` fitted on this model (its layer, pooling and template are used);
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
        if self.tokenizer is None:
            raise ValueError("the legend-margin pipeline needs a tokenizer.")
        if self.tokenizer.pad_token is None:  # batching pads; the pad id is masked out anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.last_truncated_rows: list[int] = []
        self.last_dropped_rows: list[int] = []  # set by annotate(..., drop_invalid=True)

    def _sanitize_parameters(self, margin_vector=None, template=_UNSET, max_length=None, truncation=None, **kwargs):
        if kwargs:
            raise TypeError(f"unknown legend-margin pipeline argument(s): {sorted(kwargs)}.")
        preprocess, forward = {}, {}
        if margin_vector is not None:
            if not isinstance(margin_vector, MarginVector):
                raise TypeError(f"`margin_vector` must be a MarginVector, got {type(margin_vector).__name__}.")
            margin_vector.check_compatible(self.model)
            preprocess["margin_vector"] = forward["margin_vector"] = margin_vector
        if template is not _UNSET:
            preprocess["template"] = template
        if max_length is not None:
            preprocess["max_length"] = max_length
        if truncation is not None:
            if truncation not in TRUNCATIONS:
                raise ValueError(f"`truncation` must be one of {TRUNCATIONS}, got {truncation!r}.")
            preprocess["truncation"] = truncation
        return preprocess, forward, {}

    def __call__(self, inputs, **kwargs):
        """Margins of one pair (a dict) or of a list of pairs; every row is checked first, errors name the row.

        Rows whose prompt was cut (``truncation="left"``) are listed in ``last_truncated_rows`` (0 for a single pair).
        """
        self.last_truncated_rows = []
        if isinstance(inputs, list):
            inputs = [_Row(i, ex if isinstance(ex, PreferenceTriplet) else to_triplet(ex, i))
                      for i, ex in enumerate(inputs)]
        return super().__call__(inputs, **kwargs)

    def encode(self, example: Mapping[str, Any] | PreferenceTriplet, row: int | None = None, **params):
        """``(model inputs, number of truncated sides)`` of one row; errors name ``row``."""
        return self.encode_rows([example], None if row is None else [row], **params)[0]

    def encode_rows(self, examples: Sequence[Mapping[str, Any] | PreferenceTriplet], rows: Sequence[int] | None = None,
                    margin_vector=None, template=_UNSET, max_length=None, truncation="error"):
        """:meth:`encode` over many rows with batched tokenization; errors name ``rows[i]``."""
        if margin_vector is None:
            raise ValueError("no `margin_vector`: pass one to pipeline(...) or to the call.")
        triplets = [ex if isinstance(ex, PreferenceTriplet) else to_triplet(ex, None if rows is None else rows[i])
                    for i, ex in enumerate(examples)]
        template = margin_vector.template if template is _UNSET else template
        max_length = max_length or context_length(self.model)
        return encode_triplets(self.tokenizer, triplets, template, max_length, truncation, rows)

    def preprocess(self, inputs, **preprocess_params):
        row, example = (inputs.index, inputs.triplet) if isinstance(inputs, _Row) else (None, inputs)
        item, truncated = self.encode(example, row, **preprocess_params)
        if truncated:
            self.last_truncated_rows.append(row or 0)
            logger.warning(f"row {row or 0}: cut the prompt from the left to fit max_length (truncation='left').")
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

    def annotate(self, data, num_bins: int | None = 10, **kwargs):
        """Add ``margin_raw`` and binned ``margin`` columns to a dataset; see :func:`hf_repalign.legend.annotate`."""
        from .annotate import annotate_with

        return annotate_with(self, data, num_bins=num_bins, **kwargs)


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=LegendMarginPipeline, pt_model=AutoModelForCausalLM, type="text"
)
