"""``DualConfig``: the arguments of ``train_dual`` (RAHF step 1b), TRL's ``SFTConfig`` plus how rows are rendered.

Example:
    >>> from hf_repalign.rahf import DualConfig
    >>> args = DualConfig(output_dir="out/dual", max_steps=50, good_instruction="Be harmless.")
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from .step1_card import base_model_field
from .validation import require_number


@dataclass
class DualConfig(SFTConfig):
    """``SFTConfig`` plus how the preference rows are rendered; ``output_dir/good`` and ``output_dir/bad`` get the
    two models."""

    good_instruction: str = field(default="", metadata={"help": "Instruction in the good model's prompts."})
    bad_instruction: str = field(default="", metadata={"help": "Instruction in the bad model's prompts."})
    prompt_format: str | None = field(default=None, metadata={"help": "Format with {query}; default as SCIT."})
    base_model: str | None = base_model_field()
    completion_only_loss: bool | None = field(default=True, metadata={"help": "Loss on response tokens only."})

    def __post_init__(self):
        super().__post_init__()
        require_number("learning_rate", self.learning_rate, low=0.0)
