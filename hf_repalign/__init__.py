"""hf_repalign: Linear Alignment, RAHF and LEGEND as native Hugging Face building blocks."""

__version__ = "0.1.0"
