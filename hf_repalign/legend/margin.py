"""LEGEND's two equations: the margin direction and the raw margin of a preference pair.

Example:
    >>> import torch
    >>> from hf_repalign.legend.margin import margin_direction, margin_raw
    >>> d = margin_direction(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]))  # tensor([1., 0.])
    >>> margin_raw(torch.tensor([[2.0, 5.0]]), torch.tensor([[1.0, 5.0]]), d)  # tensor([1.])
"""

from __future__ import annotations

import torch


def margin_direction(harmless: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
    """The Standard Margin Vector: ``mean_i(harmless_i - harmful_i)``, L2-normalised.

    ``harmless`` and ``harmful`` are ``(N, H)`` embeddings of the same N prompts with the two responses.
    """
    if harmless.shape != harmful.shape or harmless.ndim != 2 or harmless.shape[0] == 0:
        raise ValueError(
            f"expected two (N, H) embedding matrices of equal shape with N >= 1, got {tuple(harmless.shape)} "
            f"and {tuple(harmful.shape)}."
        )
    mean = (harmless.double() - harmful.double()).mean(dim=0)
    norm = mean.norm()
    if norm == 0:
        raise ValueError("harmless and harmful embeddings have the same mean; the direction is undefined.")
    return (mean / norm).float()


def margin_raw(chosen: torch.Tensor, rejected: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``(emb(prompt, chosen) - emb(prompt, rejected)) . direction`` for ``(N, H)`` embeddings -> ``(N,)``."""
    return (chosen.float() - rejected.float()) @ direction.float().to(chosen.device)
