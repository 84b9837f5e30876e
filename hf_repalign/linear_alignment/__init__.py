"""Linear Alignment (Gao et al., ICML 2024): principle-guided decoding with no training."""

from .paired import paired_generate
from .principles import (
    HARMLESS_PRINCIPLE,
    build_principle_inputs,
    personal_preference_principle,
    with_principle,
)
from .processor import LinearAlignmentProcessor
from .rule import align_scores

__all__ = [
    "HARMLESS_PRINCIPLE",
    "LinearAlignmentProcessor",
    "align_scores",
    "build_principle_inputs",
    "paired_generate",
    "personal_preference_principle",
    "with_principle",
]
