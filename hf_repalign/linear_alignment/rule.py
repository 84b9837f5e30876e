"""The Linear Alignment update rule (Gao et al., ICML 2024) and the authors' plausibility mask.

Default (the authors' released code): ``mup + alpha * (mup - mu0)``, the principle branch as the base and ``alpha``
their "ratio", so ``alpha=0`` is principle-prompted decoding and ``alpha=-1`` plain decoding.

``normalize=True`` (paper Eq. 10 / Algorithm 1): ``mu0 + alpha * (mup - mu0) / ||mup - mu0||``, the plain policy as
the base and a unit-L2 step, so ``alpha=0`` is plain decoding and ``alpha = ||mup - mu0||`` principle prompting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def align_scores(
    plain: torch.Tensor,
    principle: torch.Tensor,
    alpha: float,
    normalize: bool = False,
    principle_top_p: float | None = None,
    principle_temperature: float = 1.0,
) -> torch.Tensor:
    """Move next-token scores along the principle direction, then apply the plausibility mask (if any).

    Args:
        plain: ``mu0``, (B, V) plain-context logits. ``-inf`` entries (banned tokens) stay ``-inf``.
        principle: ``mup``, (B, V) next-token logits of the principle-conditioned context.
        alpha: step along ``mup - mu0``.
        normalize: the paper's Eq. 10 form (plain base, unit-L2 step over the tokens that are not banned).
        principle_top_p: keep only the top-p nucleus of the principle distribution; see :func:`plausibility_mask`.
        principle_temperature: temperature of the principle distribution the nucleus is taken from.

    Returns:
        (B, V) float32 scores; never NaN or ``+inf`` (an ``alpha`` so large that they would overflow is refused).

    Example:
        >>> align_scores(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), alpha=1.0)
        tensor([[ 2., -1.]])
    """
    out = combine(plain, principle, alpha, normalize)
    if principle_top_p is not None:
        out = plausibility_mask(out, principle, principle_top_p, principle_temperature)
    return out


def combine(plain: torch.Tensor, principle: torch.Tensor, alpha: float, normalize: bool = False) -> torch.Tensor:
    """The update rule alone (no mask): (B, V) float32 aligned scores; ``-inf`` in ``plain`` stays ``-inf``."""
    plain = plain.float()
    principle = principle.float()
    banned = ~torch.isfinite(plain)
    plain_finite = plain.masked_fill(banned, 0.0)
    principle_finite = torch.nan_to_num(principle, nan=0.0, posinf=0.0, neginf=0.0)
    if normalize:
        diff = (principle_finite - plain_finite).masked_fill(banned, 0.0)
        norm = diff.norm(dim=-1, keepdim=True)
        step = torch.where(norm > 0, diff / norm.clamp(min=torch.finfo(diff.dtype).tiny), diff)
        # Bit-exact mu0 at alpha=0.
        out = plain_finite + alpha * step
    else:
        # (1 + a) * mup - a * mu0: bit-exact mup at a=0 and mu0 at a=-1.
        out = (1.0 + alpha) * principle_finite - alpha * plain_finite
    if not bool(torch.isfinite(out).logical_or(banned).all()):
        raise ValueError(
            f"`alpha`={alpha!r} makes the aligned scores overflow float32 (|score| > 3.4e38), which would pick "
            "garbage tokens: use a smaller alpha (useful values are about -1 to 10; with normalize=True, up to a "
            "few hundred)."
        )
    return out.masked_fill(banned, float("-inf"))


def combine_many(
    plain: torch.Tensor, principles: Sequence[torch.Tensor], alphas: Sequence[float], normalize: bool = False
) -> torch.Tensor:
    """Several principles at once: ``mu0 + sum_i (combine(mu0, mu_i, a_i) - mu0)``.

    With the default rule that is ``mu0 + sum_i (1 + a_i) (mu_i - mu0)``; with ``normalize=True``,
    ``mu0 + sum_i a_i (mu_i - mu0) / ||mu_i - mu0||``. One principle gives exactly :func:`combine`; a principle with
    ``a_i = -1`` (``a_i = 0`` when normalized) drops out.
    """
    if len(principles) == 1:
        return combine(plain, principles[0], alphas[0], normalize)
    plain = plain.float()
    banned = ~torch.isfinite(plain)
    base = plain.masked_fill(banned, 0.0)
    out = base.clone()
    for principle, alpha in zip(principles, alphas):
        out += combine(plain, principle, alpha, normalize).masked_fill(banned, 0.0) - base
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"`alphas`={list(alphas)!r} make the aligned scores overflow float32: use smaller alphas.")
    return out.masked_fill(banned, float("-inf"))


def plausibility_mask(
    scores: torch.Tensor, principle: torch.Tensor, top_p: float, temperature: float = 1.0
) -> torch.Tensor:
    """``scores`` with every token outside the principle branch's top-p nucleus set to ``-inf``.

    The nucleus is that of ``softmax(principle / temperature)`` over the tokens ``scores`` has not banned (the
    authors: ``top_p=0.8`` at ``temperature=0.5``); its most likely token always survives.
    """
    banned = ~torch.isfinite(scores)
    principle = torch.nan_to_num(principle.float(), nan=0.0, posinf=0.0, neginf=0.0) / temperature
    keep = _nucleus(principle.masked_fill(banned, float("-inf")), top_p)
    return scores.float().masked_fill(~keep, float("-inf"))


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean (B, V) mask of the smallest set of tokens whose probability reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    keep_sorted = before < top_p
    keep_sorted[..., 0] = True
    keep_sorted &= torch.isfinite(sorted_logits) | (torch.arange(logits.shape[-1], device=logits.device) == 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
