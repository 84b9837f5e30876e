"""LEGEND's equal-frequency binning of raw margins into ``k / M`` values.

Rows are ranked by margin and the ranks are cut into M bins of equal size. Tied margins share the average of
their ranks (the rank-average rule), so equal margins always get the same bin, whatever their position; bins are
still ``k / M`` and their sizes differ by at most one when there are no ties (a tie group moves together, so its
bin can be larger). Bin ``k`` (1-based, lowest margins first) gets the value ``k / M``.

Example:
    >>> from hf_repalign.legend.binning import equal_frequency_bins
    >>> equal_frequency_bins([0.3, -1.0, 2.0, 0.1], num_bins=2)
    [1.0, 0.5, 1.0, 0.5]
    >>> equal_frequency_bins([1.0, 1.0, 1.0, 5.0], num_bins=2)  # the three ties share rank 1: bin 1
    [0.5, 0.5, 0.5, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based ranks of ``values``; ties share the mean of their ranks (as Spearman's correlation needs)."""
    ordered, order = values.sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = (starts + (counts - 1) / 2).double()[inverse]
    return ranks


def equal_frequency_bins(values: Sequence[float] | torch.Tensor, num_bins: int) -> list[float]:
    """Binned margins ``k / num_bins`` in the order of ``values``; equal values get equal bins."""
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
    # floor(rank * M / n) in exact integer arithmetic: ranks are multiples of 1/2.
    twice = (2 * average_ranks(values)).round().long()
    bins = twice * num_bins // (2 * n) + 1
    return (bins.double() / num_bins).tolist()
