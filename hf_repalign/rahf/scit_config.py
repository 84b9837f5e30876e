"""``SCITConfig``: the arguments of ``SCITTrainer`` (RAHF step 1a), apart from the trainer so that its fields can be
read without the trainer's imports.

Example:
    >>> from hf_repalign.rahf import SCITConfig
    >>> args = SCITConfig(output_dir="out/scit", per_device_train_batch_size=2, max_steps=10, label_smoothing=0.2)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .instructions import DISPREFERRED_INSTRUCTION, PREFERRED_INSTRUCTION
from .step1_card import base_model_field
from .validation import require_number, require_training_numbers


@dataclass
class SCITConfig(TrainingArguments):
    """``TrainingArguments`` plus SCIT's options (defaults: the paper's)."""

    preferred_instruction: str = field(default=PREFERRED_INSTRUCTION, metadata={"help": "p+ (paper App. A.1)."})
    dispreferred_instruction: str = field(default=DISPREFERRED_INSTRUCTION, metadata={"help": "p- (App. A.1)."})
    prompt_format: str | None = field(
        default=None,
        metadata={"help": "Format with {query}; default: the chat template, else 'Human: {query}\\n\\nAssistant: '."},
    )
    length_normalize: bool = field(default=False, metadata={"help": "Mean instead of sum of response log-probs."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Weight of the reversed contrastive direction."})
    sft_weight: float = field(default=1.0, metadata={"help": "Weight of the P (likelihood) term of Eq. 1."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Skip rows whose instructed prompt is longer than N tokens."})
    max_length: int | None = field(default=None, metadata={"help": "Cut responses so prompt+response <= N."})
    base_model: str | None = base_model_field()
    remove_unused_columns: bool = field(default=False, metadata={"help": "SCIT needs its own columns."})

    def __post_init__(self):
        super().__post_init__()
        require_number("label_smoothing", self.label_smoothing, low=0.0, high=0.5)
        require_number("sft_weight", self.sft_weight, low=0.0)
        require_training_numbers(self)
        for name in ("max_prompt_length", "max_length"):
            if getattr(self, name) is not None:
                require_number(name, getattr(self, name), low=1, integer=True)
