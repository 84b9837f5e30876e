"""``LinearAlignmentProcessor``: Linear Alignment (Gao et al., ICML 2024) as a transformers ``LogitsProcessor``.

Example:
    >>> from transformers import LogitsProcessorList
    >>> from hf_repalign import LinearAlignmentProcessor, build_principle_inputs
    >>> plain, principle = build_principle_inputs(tokenizer, ["How do I pick a lock?"], "Be harmless.")
    >>> proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=1.0)
    >>> out = model.generate(**plain, logits_processor=LogitsProcessorList([proc]), max_new_tokens=64)
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor, PreTrainedModel
from transformers.utils import logging

from .forward import cached_step
from .rule import align_scores

logger = logging.get_logger(__name__)


class LinearAlignmentProcessor(LogitsProcessor):
    r"""Shift next-token scores along the difference between a principle-conditioned and a plain context.

    At each step, with ``mu0`` the scores generate hands over (plain context) and ``mup`` the next-token logits of
    the principle-conditioned context continued with the same generated tokens, the output is
    ``mup + alpha * (mup - mu0)``. ``alpha=0`` is principle-prompted decoding, ``alpha=-1`` plain decoding.

    On its own the processor runs the principle branch of all rows as one batched forward per step, with its own
    KV cache. With ``custom_generate=paired_generate`` the plain and principle rows run as a single forward of
    2B rows instead (faster; same tokens).

    Args:
        model: the causal LM that ``generate`` runs (the principle branch uses the same weights).
        principle_input_ids: (B, Lp) for each row of the batch, the principle-conditioned version of that row's
            prompt, left-padded like the plain prompts. B is the plain batch size; rows are repeated for
            ``num_return_sequences``.
        principle_attention_mask: (B, Lp), defaults to all ones.
        alpha: the step along ``mup - mu0`` (the authors' "ratio").
        normalize: use the unit-L2 difference per row (paper Eq. 10).
        principle_top_p: keep only the top-p nucleus of the principle distribution (the authors' plausibility
            mask); other tokens get ``-inf``.

    Example:
        >>> proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=2.0)
        >>> model.generate(**plain, logits_processor=[proc], do_sample=True, top_p=0.9, max_new_tokens=32)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        principle_input_ids: torch.Tensor,
        principle_attention_mask: torch.Tensor | None = None,
        alpha: float = 1.0,
        normalize: bool = False,
        principle_top_p: float | None = None,
    ) -> None:
        _check_causal(model)
        ids = torch.as_tensor(principle_input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise ValueError(f"`principle_input_ids` must be a (batch, length) tensor, got shape {tuple(ids.shape)}.")
        mask = torch.ones_like(ids) if principle_attention_mask is None else torch.as_tensor(principle_attention_mask)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise ValueError(
                f"`principle_attention_mask` has shape {tuple(mask.shape)} but `principle_input_ids` has "
                f"{tuple(ids.shape)}."
            )
        empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"`principle_input_ids` row(s) {empty} are empty (attention mask all zeros).")
        vocab = model.get_input_embeddings().num_embeddings
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise ValueError(
                f"`principle_input_ids` holds token id {int(ids.max())} but the model's vocabulary has {vocab} "
                "tokens: were the principle prompts encoded with another tokenizer?"
            )
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"`alpha` must be a finite number, got {alpha!r}.")
        if principle_top_p is not None and not 0.0 < float(principle_top_p) <= 1.0:
            raise ValueError(f"`principle_top_p` must be in (0, 1], got {principle_top_p!r}.")
        self.model = model
        self.principle_input_ids = ids
        self.principle_attention_mask = mask.long()
        self.alpha = float(alpha)
        self.normalize = bool(normalize)
        self.principle_top_p = None if principle_top_p is None else float(principle_top_p)
        self.reset()

    def reset(self) -> None:
        """Forget the principle branch's cache (done automatically when a new ``generate`` call starts)."""
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        self._fed: torch.Tensor | None = None

    def expanded_principle(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Principle ids and mask with one row per row of ``input_ids`` (repeated for ``num_return_sequences``)."""
        rows, principle_rows = input_ids.shape[0], self.principle_input_ids.shape[0]
        ids = self.principle_input_ids.to(input_ids.device)
        mask = self.principle_attention_mask.to(input_ids.device)
        if rows == principle_rows:
            return ids, mask
        repeats = rows // principle_rows
        grouped = rows % principle_rows == 0 and bool(
            (input_ids.view(principle_rows, repeats, -1) == input_ids.view(principle_rows, repeats, -1)[:, :1]).all()
        )
        if not grouped:
            raise ValueError(
                f"principle batch size {principle_rows} does not match the plain batch size {rows} (after "
                "num_return_sequences): give one principle-conditioned prompt per plain prompt."
            )
        return ids.repeat_interleave(repeats, dim=0), mask.repeat_interleave(repeats, dim=0)

    def feed(self, principle_logits: torch.Tensor) -> None:
        """Hand over this step's principle logits, computed elsewhere (used by ``paired_generate``)."""
        self._fed = principle_logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._fed is not None:
            principle_logits, self._fed = self._fed, None
        else:
            principle_logits = self._principle_logits(input_ids, scores)
        if principle_logits.shape != scores.shape:
            raise ValueError(
                f"vocab-size mismatch: generate's scores have shape {tuple(scores.shape)} but the principle branch "
                f"gives {tuple(principle_logits.shape)}; the processor's model must be the model that generates."
            )
        out = align_scores(scores, principle_logits, self.alpha, self.normalize, self.principle_top_p)
        return out.to(scores.dtype)

    @torch.no_grad()
    def _principle_logits(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = self._seen
        continuing = (
            seen is not None
            and input_ids.shape == (seen.shape[0], seen.shape[1] + 1)
            and torch.equal(input_ids[:, :-1], seen)
        )
        if continuing:
            self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
            logits, self._cache = cached_step(self.model, input_ids[:, -1:], self._mask, self._cache)
        else:
            if seen is not None and input_ids.shape[1] == seen.shape[1] + 1 and _rows_permuted(input_ids, seen):
                raise ValueError(_BEAM_ERROR)
            _check_not_log_probs(scores)
            ids, self._mask = self.expanded_principle(input_ids)
            logits, self._cache = cached_step(self.model, ids, self._mask, None)
        self._seen = input_ids
        return logits


_BEAM_ERROR = (
    "LinearAlignmentProcessor does not support beam search (beams reorder rows and hand over log-probabilities); "
    "use greedy decoding or sampling (num_beams=1)."
)


def _rows_permuted(input_ids: torch.Tensor, seen: torch.Tensor) -> bool:
    prefixes = input_ids[:, :-1]
    if prefixes.shape[0] != seen.shape[0]:
        return False
    matches = (prefixes[:, None, :] == seen[None, :, :]).all(-1)
    return bool(matches.any(dim=1).all())


def _check_not_log_probs(scores: torch.Tensor) -> None:
    # Beam search normalises scores before processors run; plain logits almost never sum to probability 1.
    finite = torch.isfinite(scores).any(dim=-1)
    if bool(finite.all()) and bool((scores.float().logsumexp(dim=-1).abs() < 1e-5).all()):
        raise ValueError(_BEAM_ERROR)


def _check_causal(model) -> None:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not hasattr(model, "generate"):
        raise ValueError(
            f"LinearAlignmentProcessor needs a decoder-only causal LM (e.g. AutoModelForCausalLM), got "
            f"{type(model).__name__}."
        )
    if not callable(getattr(model, "can_generate", None)) or not model.can_generate():
        raise ValueError(f"{type(model).__name__} cannot generate: load the model with AutoModelForCausalLM.")
