"""LEGEND's two equations (the margin direction and the raw margin of a pair), and the length controls.

Example:
    >>> import torch
    >>> from hf_repalign.legend.margin import margin_direction, margin_raw
    >>> d = margin_direction(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]))  # tensor([1., 0.])
    >>> margin_raw(torch.tensor([[2.0, 5.0]]), torch.tensor([[1.0, 5.0]]), d)  # tensor([1.])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def margin_direction(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The Standard Margin Vector: ``mean(positive) - mean(negative)``, L2-normalised.

    ``positive`` and ``negative`` are ``(N, H)`` and ``(M, H)`` embeddings. For pairs (the same N prompts with a
    harmless and a harmful response, the paper's setting) this is ``mean_i(positive_i - negative_i)``.
    """
    if positive.ndim != 2 or negative.ndim != 2 or positive.shape[1] != negative.shape[1] \
            or 0 in (positive.shape[0], negative.shape[0]):
        raise ValueError(
            f"expected two (N, H) embedding matrices with the same H and at least one row each, got "
            f"{tuple(positive.shape)} and {tuple(negative.shape)}."
        )
    mean = positive.double().mean(dim=0) - negative.double().mean(dim=0)
    norm = mean.norm()
    if norm == 0:
        raise ValueError("positive and negative embeddings have the same mean; the direction is undefined.")
    return (mean / norm).float()


def margin_raw(chosen: torch.Tensor, rejected: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``(emb(prompt, chosen) - emb(prompt, rejected)) . direction`` for ``(N, H)`` embeddings -> ``(N,)``.

    Computed in float64 (then returned as float32 values exactly rounded once), so the sum over the hidden size
    does not depend on how the rows were batched.
    """
    return ((chosen.double() - rejected.double()) @ direction.double().to(chosen.device)).float()


def length_direction(groups: Sequence[torch.Tensor], lengths: Sequence[Sequence[float]]) -> torch.Tensor:
    """The unit direction along which embeddings move as the response gets longer.

    ``groups`` are ``(N_k, H)`` embeddings (e.g. the positive and the negative responses) and ``lengths`` their
    responses' token counts. Each group is centred on its own means, so the contrast between the groups (the
    attribute) is not mistaken for length; the direction is the least-squares slope of embedding on length.
    """
    numerator, denominator = None, 0.0
    for embeddings, length in zip(groups, lengths):
        x = torch.as_tensor(list(length), dtype=torch.float64)
        if x.numel() != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings but {x.numel()} lengths.")
        x = x - x.mean()
        slope = x @ (embeddings.double() - embeddings.double().mean(dim=0))
        numerator = slope if numerator is None else numerator + slope
        denominator += float(x @ x)
    if numerator is None or denominator == 0 or float(numerator.norm()) == 0:
        raise ValueError("the responses of each side all have the same length, so no length direction can be "
                         "estimated from them; give responses of varied lengths or turn length control off.")
    return (numerator / numerator.norm()).float()


def remove_direction(direction: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``direction`` with its component along the unit vector ``other`` projected out, L2-normalised."""
    d, u = direction.double(), other.double()
    rest = d - (d @ u) * u
    norm = rest.norm()
    if float(norm) < 1e-6:
        raise ValueError("the direction is the length direction itself; nothing is left once length is removed.")
    return (rest / norm).float()


def length_slope(margins: Sequence[float], length_diff: Sequence[float]) -> float:
    """Least-squares slope of margin on response-length difference (margin per token); 0 when lengths never vary."""
    y = torch.as_tensor(list(margins), dtype=torch.float64)
    x = torch.as_tensor(list(length_diff), dtype=torch.float64)
    x = x - x.mean()
    denominator = float(x @ x)
    return 0.0 if denominator == 0 else float(x @ (y - y.mean())) / denominator


def remove_length(margins: Sequence[float], length_diff: Sequence[float], slope: float) -> list[float]:
    """``margin - slope * length_diff``: a pair of equally long responses keeps its margin."""
    return [float(m) - slope * float(d) for m, d in zip(margins, length_diff)]
