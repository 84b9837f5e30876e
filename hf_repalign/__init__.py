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

# RAHF names load on first use: Dual needs TRL, which a bare inference install may lack.
_RAHF_NAMES = ("DualConfig", "RAHFConfig", "RAHFTrainer", "SCITConfig", "SCITTrainer", "train_dual")


def __getattr__(name: str):
    if name in _RAHF_NAMES:
        from . import rahf

        return getattr(rahf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    *_RAHF_NAMES,
]
