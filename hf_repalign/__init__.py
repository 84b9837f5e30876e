"""hf_repalign: Linear Alignment, RAHF and LEGEND as native Hugging Face building blocks.

``import hf_repalign`` registers the ``"legend-margin"`` pipeline task with transformers; every public name loads
its module on first use.
"""

import logging as _logging
import os
import sys

from ._lazy import lazy_exports


def _drop_deepspeed_cpu_notice(record: _logging.LogRecord) -> bool:
    # When DeepSpeed is installed, accelerate imports it to unwrap every model a Trainer sees, and DeepSpeed then
    # prints "Setting accelerator to CPU..." to stdout on machines without a GPU, also in runs that never use it.
    return not record.getMessage().startswith("Setting accelerator to CPU.")


# The filter stays on DeepSpeed's logger when DeepSpeed configures it later; its other messages are untouched.
_logging.getLogger("DeepSpeed").addFilter(_drop_deepspeed_cpu_notice)

__version__ = "0.1.0"

_EXPORTS = {
    "LegendMarginPipeline": "legend",
    "MarginVector": "legend",
    "HARMLESS_PRINCIPLE": "linear_alignment",
    "LinearAlignmentProcessor": "linear_alignment",
    "align_scores": "linear_alignment",
    "build_principle_inputs": "linear_alignment",
    "paired_generate": "linear_alignment",
    "personal_preference_principle": "linear_alignment",
    "load_model_and_tokenizer": "models",
    # RAHF: Dual needs TRL, which a bare inference install may lack.
    "DualConfig": "rahf",
    "RAHFConfig": "rahf",
    "RAHFTrainer": "rahf",
    "SCITConfig": "rahf",
    "SCITTrainer": "rahf",
    "train_dual": "rahf",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


def register_pipeline() -> None:
    """Register the ``"legend-margin"`` task with transformers' pipeline registry (idempotent)."""
    from .legend import pipeline  # noqa: F401  (registers on import)


# The `repalign` console script imports this package first; its `--help` must not pay for torch and transformers'
# pipelines (seconds), so it registers the task itself, only for the commands that run.
if os.path.basename(getattr(sys, "argv", [""])[0] or "") not in ("repalign", "repalign.exe"):
    register_pipeline()
