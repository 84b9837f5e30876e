"""LEGEND's equal-frequency binning of raw margins into ``k / M`` values.

Rows are ranked by margin (ties broken by row order, so the result is deterministic) and the ranks are cut into M
bins of equal size (sizes differ by at most one when M does not divide N). Bin ``k`` (1-based, lowest margins
first) gets the value ``k / M``, so margins lie in ``{1/M, ..., 1}``.

Example:
    >>> from hf_repalign.legend.binning import equal_frequency_bins
    >>> equal_frequency_bins([0.3, -1.0, 2.0, 0.1], num_bins=2)
    [1.0, 0.5, 1.0, 0.5]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def equal_frequency_bins(values: Sequence[float] | torch.Tensor, num_bins: int) -> list[float]:
    """Binned margins ``k / num_bins`` in the order of ``values``."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"`num_bins` must be a positive integer (or None for no binning), got {num_bins!r}.")
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = values.numel()
    if n == 0:
        return []
    if torch.isnan(values).any():
        rows = torch.nonzero(torch.isnan(values)).flatten()[:5].tolist()
        raise ValueError(f"margins are NaN at row(s) {rows}; cannot bin them.")
    if num_bins > 1 and bool((values == values[0]).all()):
        raise ValueError(
            f"all {n} margins are identical ({values[0].item():.6g}); equal-frequency binning would be arbitrary. "
            "Check the margin vector and the data, or pass num_bins=None to keep raw margins."
        )
    order = torch.from_numpy(values.numpy().argsort(kind="stable"))  # stable: ties keep row order
    ranks = torch.empty(n, dtype=torch.long)
    ranks[order] = torch.arange(n)
    bins = ranks * num_bins // n + 1
    return (bins.double() / num_bins).tolist()
