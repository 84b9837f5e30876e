"""hf_repalign: Linear Alignment, RAHF and LEGEND as native Hugging Face building blocks."""

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
    "LinearAlignmentProcessor",
    "align_scores",
    "build_principle_inputs",
    "load_model_and_tokenizer",
    "paired_generate",
    "personal_preference_principle",
]
