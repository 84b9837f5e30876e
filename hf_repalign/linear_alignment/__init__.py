"""Linear Alignment (Gao et al., ICML 2024): principle-guided decoding with no training."""

from .paired import paired_generate
from .principles import (
    HARMLESS_PRINCIPLE,
    build_principle_inputs,
    default_system_prompt,
    personal_preference_principle,
    with_principle,
)
from .processor import AUTHORS_PRESET, LinearAlignmentProcessor
from .rule import align_scores

__all__ = [
    "AUTHORS_PRESET",
    "HARMLESS_PRINCIPLE",
    "LinearAlignmentProcessor",
    "align_scores",
    "build_principle_inputs",
    "default_system_prompt",
    "paired_generate",
    "personal_preference_principle",
    "with_principle",
]
