"""hf_repalign: Linear Alignment, RAHF and LEGEND as native Hugging Face building blocks."""

# Importing the legend subpackage registers the "legend-margin" pipeline with transformers.
from .legend import LegendMarginPipeline, MarginVector
from .linear_alignment import (
    HARMLESS_PRINCIPLE,
    LinearAlignmentProcessor,
    align_scores,
    build_principle_inputs,
    paired_generate,
    personal_preference_principle,
)
from .models import load_model_and_tokenizer

__version__ = "0.1.0"

__all__ = [
    "HARMLESS_PRINCIPLE",
    "LegendMarginPipeline",
    "LinearAlignmentProcessor",
    "MarginVector",
    "align_scores",
    "build_principle_inputs",
    "load_model_and_tokenizer",
    "paired_generate",
    "personal_preference_principle",
]
