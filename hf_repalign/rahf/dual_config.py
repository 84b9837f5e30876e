"""``DualConfig``: the arguments of ``train_dual`` (RAHF step 1b), TRL's ``SFTConfig`` plus how rows are rendered.

Example:
    >>> from hf_repalign.rahf import DualConfig
    >>> args = DualConfig(output_dir="out/dual", max_steps=50, good_instruction="Be harmless.")
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from .step1_card import base_model_field
from .validation import require_training_numbers


def bf16_accelerator() -> bool:
    """Whether an accelerator that trains in bf16 is present (transformers' own check for ``bf16=True``)."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


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
        if self.bf16 is None and not self.fp16 and (self.use_cpu or not bf16_accelerator()):
            # TRL's default (bf16) is for bf16 GPUs: without one it fails, and on a CPU it is emulated, many times
            # slower; train in float32 (bf16=True still asks for it)
            self.bf16 = False
        super().__post_init__()
        require_training_numbers(self)
        if self.push_to_hub:
            raise ValueError("push_to_hub: train_dual writes two models (output_dir/good and output_dir/bad), each "
                             "saved Hub-ready with its card and tokenizer; upload each with `hf upload "
                             "user/name output_dir/good` (or PeftModel.push_to_hub) instead.")


def resume_each_side(value: str | bool | None) -> bool:
    """``resume_from_checkpoint`` of Dual: true resumes each side from its latest checkpoint; a folder is refused
    (two models train, each with its own checkpoints)."""
    if value is None or value is False or str(value).lower() in ("false", "none", ""):
        return False
    if value is True or str(value).lower() in ("true", "latest", "last"):
        return True
    raise ValueError(f"resume_from_checkpoint={value!r}: Dual trains two models, each with its own checkpoints "
                     "(output_dir/good_checkpoints, output_dir/bad_checkpoints); give true to resume both from "
                     "their latest.")
