"""hf_repalign: Linear Alignment, RAHF and LEGEND as native Hugging Face building blocks."""

# Importing the legend subpackage registers the "legend-margin" pipeline with transformers.
from .legend import LegendMarginPipeline, MarginVector

__version__ = "0.1.0"

__all__ = ["LegendMarginPipeline", "MarginVector"]
