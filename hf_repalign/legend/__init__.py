"""LEGEND: safety margin vectors and the ``legend-margin`` pipeline that annotates preference datasets.

Example:
    >>> import hf_repalign
    >>> from hf_repalign.legend import MarginVector
    >>> from transformers import pipeline
    >>> vec = MarginVector.induce(model, tokenizer, advbench_goals[:100])  # last token of the response, layer -1
    >>> pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec)
    >>> annotated = pipe.annotate(hh_rlhf, num_bins=10)  # + `margin_raw`, `margin` (read by trl.RewardTrainer)
"""

from .annotate import (
    add_margin_columns,
    annotate,
    length_diagnostics,
    load_preference_data,
    usable_rows,
    write_dataset,
)
from .binning import equal_frequency_bins
from .margin import margin_direction, margin_raw
from .pipeline import LegendMarginPipeline
from .vector import MarginVector

__all__ = [
    "LegendMarginPipeline",
    "MarginVector",
    "add_margin_columns",
    "annotate",
    "equal_frequency_bins",
    "length_diagnostics",
    "load_preference_data",
    "margin_direction",
    "margin_raw",
    "usable_rows",
    "write_dataset",
]
