"""RAHF (Liu et al., 2024): SCIT or Dual instructed models, activity patterns, and representation alignment.

Example:
    >>> from hf_repalign.rahf import SCITConfig, SCITTrainer, RAHFConfig, RAHFTrainer
"""

from .dual import DualConfig, train_dual
from .instructions import DISPREFERRED_INSTRUCTION, PREFERRED_INSTRUCTION, PROMPT_FORMAT, instructed_template
from .patterns import activity_patterns, align_stimuli, default_target_layers, difference_vectors
from .scit import SCITConfig, SCITTrainer, scit_loss
from .trainer import RAHFConfig, RAHFTrainer, rahf_loss

__all__ = [
    "DISPREFERRED_INSTRUCTION",
    "PREFERRED_INSTRUCTION",
    "PROMPT_FORMAT",
    "DualConfig",
    "RAHFConfig",
    "RAHFTrainer",
    "SCITConfig",
    "SCITTrainer",
    "activity_patterns",
    "align_stimuli",
    "default_target_layers",
    "difference_vectors",
    "instructed_template",
    "rahf_loss",
    "scit_loss",
    "train_dual",
]
