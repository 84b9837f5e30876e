"""The length diagnostic of an annotation: how far ``margin_raw`` just follows the response-length difference.

Example:
    >>> from hf_repalign.legend.diagnostics import length_diagnostics
    >>> length_diagnostics([0.5, -0.2, 1.0], [-3, 4, -10])["spearman_margin_vs_length_diff"]
    -1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.utils import logging

from .binning import average_ranks

logger = logging.get_logger(__name__)

LENGTH_WARNING = 0.5  # |Spearman rho| above which the length difference is said to dominate the margins
LENGTH_WARNING_MIN_PAIRS = 20  # below this a rank correlation says little


def length_diagnostics(margins: Sequence[float], length_diff: Sequence[float],
                       warn: bool = True) -> dict[str, Any]:
    """How far ``margin_raw`` follows the response-length difference (chosen minus rejected, in tokens).

    Returns ``{"pairs", "pearson_margin_vs_length_diff", "spearman_margin_vs_length_diff",
    "length_dominates"}`` (correlations are None for fewer than 3 pairs or constant inputs), logs it, and warns
    when ``|spearman| >= 0.5`` over at least 20 pairs: then "the shorter response is safer" explains much of what
    the margins say, and a length-only baseline should be compared before trusting them. ``warn=False`` only
    computes.
    """
    out: dict[str, Any] = {"pairs": len(margins), "pearson_margin_vs_length_diff": None,
                           "spearman_margin_vs_length_diff": None, "length_dominates": False}
    if len(margins) >= 3:
        x = torch.tensor(list(margins), dtype=torch.float64)
        y = torch.tensor(list(length_diff), dtype=torch.float64)
        out["pearson_margin_vs_length_diff"] = _pearson(x, y)
        out["spearman_margin_vs_length_diff"] = _pearson(average_ranks(x), average_ranks(y))
    rho = out["spearman_margin_vs_length_diff"]
    out["length_dominates"] = bool(rho is not None and abs(rho) >= LENGTH_WARNING
                                   and len(margins) >= LENGTH_WARNING_MIN_PAIRS)
    if warn and out["length_dominates"]:
        logger.warning(
            f"margin_raw follows the response-length difference (Spearman {rho:+.2f} over {len(margins)} pairs): "
            "the margins may mostly say which response is shorter. Compare them with a length-only baseline "
            "before using them, or annotate with length_control=True (see docs/legend.md)."
        )
    elif warn:
        logger.info(f"length diagnostic: {out}")
    return out


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return None if denominator == 0 else round(float(x @ y) / denominator, 6)
