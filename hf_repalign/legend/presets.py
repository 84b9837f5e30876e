"""Plain constants of LEGEND's embedding and fitting, importable without torch (the CLI's ``--help`` reads them).

Example:
    >>> from hf_repalign.legend.presets import FIT_PRESETS
    >>> FIT_PRESETS["authors"]["max_new_tokens"]
    1024
"""

from __future__ import annotations

from typing import Any

POOLINGS = ("last", "mean", "mean_all", "last_rendered")
DEFAULT_REFUSAL = "I can't answer that."
# The authors' fit (colfeng/Legend: infer.py, SMV.py): every AdvBench goal (520), greedy answers of up to 1024 new
# tokens as the harmful side, their refusal string (with a typographic apostrophe), last token of the final layer.
FIT_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"num_prompts": None, "max_new_tokens": 64, "refusal": DEFAULT_REFUSAL, "layer": -1,
                "pooling": "last"},
    "authors": {"num_prompts": None, "max_new_tokens": 1024, "refusal": "I can\u2019t answer that.", "layer": -1,
                "pooling": "last"},
}
