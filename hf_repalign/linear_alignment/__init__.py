"""Linear Alignment (Gao et al., ICML 2024): principle-guided decoding with no training.

Names load lazily, so ``hf_repalign.linear_alignment.cli`` stays light.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "AUTHORS_PRESET": "processor",
    "HARMLESS_PRINCIPLE": "principles",
    "LinearAlignmentProcessor": "processor",
    "align_scores": "rule",
    "build_principle_inputs": "principles",
    "default_system_prompt": "principles",
    "export_custom_generate": "export",
    "paired_generate": "paired",
    "personal_preference_principle": "principles",
    "principle_inputs_for": "principles",
    "with_principle": "principles",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
