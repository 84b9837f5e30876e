"""The Linear Alignment update rule (Gao et al., ICML 2024), as one small function.

``mup + alpha * (mup - mu0)``: the base is the principle-conditioned branch and ``alpha`` the authors' "ratio",
so ``alpha=0`` is principle-prompted decoding and ``alpha=-1`` plain decoding.
"""

from __future__ import annotations

import torch


def align_scores(
    plain: torch.Tensor,
    principle: torch.Tensor,
    alpha: float,
    normalize: bool = False,
    principle_top_p: float | None = None,
) -> torch.Tensor:
    """Move next-token scores along the principle direction.

    Args:
        plain: ``mu0``, (B, V) scores of the plain context, as earlier processors left them. ``-inf`` entries
            (banned tokens) stay ``-inf``.
        principle: ``mup``, (B, V) next-token logits of the principle-conditioned context.
        alpha: step along ``mup - mu0``.
        normalize: use the unit-L2 difference per row, over the tokens that are not banned (paper Eq. 10).
        principle_top_p: keep only the top-p nucleus of the principle branch's distribution (over non-banned
            tokens); the rest become ``-inf``. The most likely token always survives.

    Returns:
        (B, V) float32 scores; never NaN or ``+inf``.

    Example:
        >>> align_scores(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), alpha=1.0)
        tensor([[ 2., -1.]])
    """
    plain = plain.float()
    principle = principle.float()
    banned = ~torch.isfinite(plain)
    plain_finite = plain.masked_fill(banned, 0.0)
    principle_finite = torch.nan_to_num(principle, nan=0.0, posinf=0.0, neginf=0.0)
    if normalize:
        diff = (principle_finite - plain_finite).masked_fill(banned, 0.0)
        norm = diff.norm(dim=-1, keepdim=True)
        diff = torch.where(norm > 0, diff / norm.clamp(min=torch.finfo(diff.dtype).tiny), diff)
        out = principle_finite + alpha * diff
    else:
        # (1 + a) * mup - a * mu0: bit-exact mup at a=0 and mu0 at a=-1.
        out = (1.0 + alpha) * principle_finite - alpha * plain_finite
    if principle_top_p is not None:
        out = out.masked_fill(~_nucleus(principle_finite.masked_fill(banned, float("-inf")), principle_top_p),
                              float("-inf"))
    out = out.masked_fill(banned, float("-inf"))
    return torch.nan_to_num(out, nan=float("-inf"), posinf=torch.finfo(out.dtype).max, neginf=float("-inf"))


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean (B, V) mask of the smallest set of tokens whose probability reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    keep_sorted = before < top_p
    keep_sorted[..., 0] = True
    keep_sorted &= torch.isfinite(sorted_logits) | (torch.arange(logits.shape[-1], device=logits.device) == 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
