"""hf_repalign: Linear Alignment, RAHF and LEGEND as native Hugging Face building blocks."""

import logging as _logging


def _drop_deepspeed_cpu_notice(record: _logging.LogRecord) -> bool:
    # When DeepSpeed is installed, accelerate imports it to unwrap every model a Trainer sees, and DeepSpeed then
    # prints "Setting accelerator to CPU..." to stdout on machines without a GPU, also in runs that never use it.
    return not record.getMessage().startswith("Setting accelerator to CPU.")


# The filter stays on DeepSpeed's logger when DeepSpeed configures it later; its other messages are untouched.
_logging.getLogger("DeepSpeed").addFilter(_drop_deepspeed_cpu_notice)

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
