"""LEGEND: margin vectors (safety or any attribute) and the ``legend-margin`` pipeline that annotates datasets.

Names load lazily (``hf_repalign.legend.cli`` stays light); ``import hf_repalign`` registers the pipeline task.

Example:
    >>> import hf_repalign
    >>> from hf_repalign.legend import MarginVector
    >>> from transformers import pipeline
    >>> vec = MarginVector.induce(model, tokenizer, advbench_goals[:100])  # last token of the response, layer -1
    >>> pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec)
    >>> annotated = pipe.annotate(hh_rlhf, num_bins=10)  # + `margin_raw`, `margin` (read by trl.RewardTrainer)
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "Contrast": "contrast",
    "LegendMarginPipeline": "pipeline",
    "MarginVector": "vector",
    "add_margin_columns": "annotate",
    "annotate": "annotate",
    "equal_frequency_bins": "binning",
    "length_diagnostics": "diagnostics",
    "load_preference_data": "data",
    "margin_direction": "margin",
    "margin_raw": "margin",
    "read_contrast": "contrast",
    "usable_rows": "data",
    "write_dataset": "data",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
