"""RAHF (Liu et al., 2024): SCIT or Dual instructed models, activity patterns, and representation alignment.

Names load lazily, so ``hf_repalign.rahf.trainer`` works without ``trl``/``datasets`` (only Dual needs TRL).

Example:
    >>> from hf_repalign.rahf import SCITConfig, SCITTrainer, RAHFConfig, RAHFTrainer
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "DualConfig": "dual_config",
    "train_dual": "dual",
    "DISPREFERRED_INSTRUCTION": "instructions",
    "PREFERRED_INSTRUCTION": "instructions",
    "PROMPT_FORMAT": "instructions",
    "instructed_template": "instructions",
    "activity_patterns": "patterns",
    "align_stimuli": "patterns",
    "default_target_layers": "patterns",
    "difference_vectors": "patterns",
    "SCITConfig": "scit_config",
    "SCITTrainer": "scit",
    "scit_loss": "scit",
    "stack_adapters": "stack",
    "RAHFConfig": "rahf_config",
    "RAHFTrainer": "trainer",
    "rahf_loss": "trainer",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
