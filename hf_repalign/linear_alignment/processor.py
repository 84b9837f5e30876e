"""``LinearAlignmentProcessor``: Linear Alignment (Gao et al., ICML 2024) as a transformers ``LogitsProcessor``.

The aligned scores ``mup + alpha * (mup - mu0)`` are computed from the RAW logits of both branches, and every
processor and warper ``generate`` builds then acts on them as it would on a plain model's logits. Use it with
``custom_generate=paired_generate``, which does exactly that (and runs both branches as one forward):

Example:
    >>> from hf_repalign import LinearAlignmentProcessor, build_principle_inputs, paired_generate
    >>> plain, principle = build_principle_inputs(tokenizer, ["How do I pick a lock?"], "Be harmless.")
    >>> proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=1.0)
    >>> out = model.generate(**plain, logits_processor=[proc], custom_generate=paired_generate, max_new_tokens=64,
    ...                      repetition_penalty=1.1)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    PreTrainedModel,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
)
from transformers.generation.logits_process import EncoderNoRepeatNGramLogitsProcessor
from transformers.utils import logging

from ..models import context_length
from .forward import cached_step, check_context
from .rule import combine, combine_many, plausibility_mask

logger = logging.get_logger(__name__)

# Processors that only ever set scores to -inf and leave finite scores untouched: banning a token before or after
# the update rule gives the same scores, so the bare processor is exact behind them.
_BAN_ONLY = (
    NoRepeatNGramLogitsProcessor,
    EncoderNoRepeatNGramLogitsProcessor,
    NoBadWordsLogitsProcessor,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
)

# The authors' released decoding (Wizardcoast/Linear_Alignment, model.py + infer_hh.sh): the principle branch's
# top-0.8 nucleus at temperature 0.5, applied also when greedy; ratio 3 (HH) or 5 (personal preferences).
AUTHORS_PRESET = {"principle_top_p": 0.8, "principle_temperature": 0.5}


class LinearAlignmentProcessor(LogitsProcessor):
    r"""Shift next-token scores along the difference between a principle-conditioned and a plain context.

    At each step, with ``mu0`` the plain context's raw next-token logits and ``mup`` those of the
    principle-conditioned context continued with the same generated tokens, the model's scores become
    ``mup + alpha * (mup - mu0)`` (``alpha=0``: principle prompting, ``alpha=-1``: plain decoding). Every other
    processor and warper of ``generate`` (repetition penalty, sequence bias, length penalties, n-gram and word bans,
    temperature, top-k/top-p, ...) then acts on these aligned scores as it would on a plain model's logits.

    Pass ``custom_generate=paired_generate`` to ``generate`` (recommended): it aligns the raw logits before any
    processor runs and runs the plain and principle rows as one forward of 2B rows per step.

    On its own (no ``custom_generate``) the processor runs the principle branch as a second cached forward. It then
    only sees ``mu0`` after the processors ``generate`` runs before user processors, so it checks them: processors
    that only ban tokens (``no_repeat_ngram_size``, ``bad_words_ids``, ``min_new_tokens``, ``suppress_tokens``, ...)
    are exact; any processor that changes finite scores (``repetition_penalty``, also from the model's
    ``generation_config.json``, ``sequence_bias``, ``exponential_decay_length_penalty``, a custom processor listed
    before this one, ...) raises a ``ValueError`` pointing to ``paired_generate`` instead of silently turning the
    penalty into a boost. The bare processor also supports assisted decoding (``prompt_lookup_num_tokens``,
    ``assistant_model``) exactly: its principle cache is rolled back to the accepted tokens.

    Args:
        model: the causal LM that ``generate`` runs (the principle branch uses the same weights).
        principle_input_ids: (B, Lp) for each row of the batch, the principle-conditioned version of that row's
            prompt, left-padded like the plain prompts. B is the plain batch size; rows are repeated for
            ``num_return_sequences``. A list of such tensors composes several principles (``paired_generate``
            only): ``mu0 + sum_i (1 + alpha_i) (mu_i - mu0)``, in one forward of (k+1)B rows per step.
        principle_attention_mask: (B, Lp), defaults to all ones (a list with several principles).
        alpha: the step along ``mup - mu0`` (the authors' "ratio"). With ``normalize=True``, the length of the step.
            With several principles, one alpha per principle (a list) or one for all.
        normalize: the paper's Eq. 10 / Algorithm 1: ``mu0 + alpha * (mup - mu0) / ||mup - mu0||`` (plain base,
            unit-L2 step over the vocabulary). ``alpha`` is then in logit units along the whole vocabulary:
            ``alpha = ||mup - mu0||`` (typically tens to hundreds) reproduces principle prompting.
        principle_top_p: keep only the top-p nucleus of the principle distribution (the authors' plausibility
            mask); other tokens get ``-inf``.
        principle_temperature: temperature of the principle distribution the nucleus is taken from. ``None``
            (default): the generation temperature when sampling, 1 when greedy.
        check_prompts: refuse prompts the principle rows were not built for (each principle row must be its prompt
            with text inserted, as :func:`build_principle_inputs` builds them). Turn off only for principle rows
            laid out otherwise, e.g. ``system_mode="replace"``.

    Example:
        >>> proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=2.0)
        >>> model.generate(**plain, logits_processor=[proc], custom_generate=paired_generate, do_sample=True,
        ...                top_p=0.9, max_new_tokens=32)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        principle_input_ids: torch.Tensor | Sequence[torch.Tensor],
        principle_attention_mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        alpha: float | Sequence[float] = 1.0,
        normalize: bool = False,
        principle_top_p: float | None = None,
        principle_temperature: float | None = None,
        check_prompts: bool = True,
    ) -> None:
        _check_causal(model)
        several = isinstance(principle_input_ids, (list, tuple))
        id_list = list(principle_input_ids) if several else [principle_input_ids]
        if not id_list:
            raise ValueError("`principle_input_ids` is an empty list: give at least one principle.")
        masks = principle_attention_mask if several else [principle_attention_mask]
        masks = [None] * len(id_list) if masks is None else list(masks)
        alphas = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha] * len(id_list)
        if len(masks) != len(id_list) or len(alphas) != len(id_list):
            raise ValueError(
                f"got {len(id_list)} principle encodings, {len(masks)} attention masks and {len(alphas)} alphas: "
                "give one of each per principle."
            )
        name = "alphas" if several else "alpha"
        for value in alphas:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be finite numbers, got {value!r}.")
        self.branches = [_check_principle_rows(model, ids, mask, i if several else None)
                         for i, (ids, mask) in enumerate(zip(id_list, masks))]
        rows = {ids.shape[0] for ids, _ in self.branches}
        if len(rows) > 1:
            raise ValueError(f"the principles have different batch sizes {sorted(rows)}: give each one row per prompt.")
        if several and principle_top_p is not None:
            raise ValueError("`principle_top_p` (the plausibility mask) supports one principle, got several.")
        if principle_top_p is not None and not 0.0 < float(principle_top_p) <= 1.0:
            raise ValueError(f"`principle_top_p` must be in (0, 1], got {principle_top_p!r}.")
        if principle_temperature is not None and not float(principle_temperature) > 0.0:
            raise ValueError(f"`principle_temperature` must be > 0, got {principle_temperature!r}.")
        self.model = model
        self.principle_input_ids, self.principle_attention_mask = self.branches[0]
        self.alphas = [float(value) for value in alphas]
        self.alpha = self.alphas[0]
        self.check_prompts = bool(check_prompts)
        self.normalize = bool(normalize)
        self.principle_top_p = None if principle_top_p is None else float(principle_top_p)
        self.principle_temperature = None if principle_temperature is None else float(principle_temperature)
        self.reset()

    def __repr__(self) -> str:
        rows, length = self.principle_input_ids.shape
        mask = "" if self.principle_top_p is None else (
            f", principle_top_p={self.principle_top_p:g}, principle_temperature={self.principle_temperature}")
        model = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        return (f"{type(self).__name__}(alpha={self.alpha:g}, normalize={self.normalize}{mask}, "
                f"principle={rows} row(s) x {length} tokens, model={model!r})")

    @classmethod
    def authors_defaults(
        cls,
        model: PreTrainedModel,
        principle_input_ids: torch.Tensor,
        principle_attention_mask: torch.Tensor | None = None,
        alpha: float = 3.0,
    ) -> "LinearAlignmentProcessor":
        """The authors' released configuration: ``alpha`` ("ratio") 3 as in their HH script (5 for personal
        preferences), plausibility mask = top-0.8 nucleus of the principle branch at temperature 0.5, applied
        also when greedy (their scripts decode greedily). To sample as they do, add
        ``do_sample=True, temperature=0.5, top_k=0, top_p=1.0`` to ``generate``.

        Example:
            >>> proc = LinearAlignmentProcessor.authors_defaults(model, principle["input_ids"],
            ...                                                  principle["attention_mask"])
        """
        return cls(model, principle_input_ids, principle_attention_mask, alpha=alpha, **AUTHORS_PRESET)

    def reset(self) -> None:
        """Forget the principle branch's cache (done automatically when a new ``generate`` call starts)."""
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._prompt: torch.Tensor | None = None
        self._generated: torch.Tensor | None = None
        self._paired_principle: torch.Tensor | None = None

    def expanded_principle(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, branch: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Principle ids and mask with one row per row of ``input_ids`` (repeated for ``num_return_sequences``).

        Refuses (``check_prompts``) rows of ``input_ids`` that are not the principle rows with the principle text
        taken out: principle rows built for other prompts would steer towards answers to other questions.
        """
        principle_ids, principle_mask = self.branches[branch]
        rows, principle_rows = input_ids.shape[0], principle_ids.shape[0]
        ids, mask = principle_ids.to(input_ids.device), principle_mask.to(input_ids.device)
        if rows != principle_rows:
            repeats = rows // principle_rows
            grouped = rows % principle_rows == 0 and bool(
                (input_ids.view(principle_rows, repeats, -1) == input_ids.view(principle_rows, repeats, -1)[:, :1])
                .all()
            )
            if not grouped:
                raise ValueError(
                    f"principle batch size {principle_rows} does not match the plain batch size {rows} (after "
                    "num_return_sequences): give one principle-conditioned prompt per plain prompt."
                )
            ids, mask = ids.repeat_interleave(repeats, dim=0), mask.repeat_interleave(repeats, dim=0)
        if self.check_prompts:
            _check_rows_belong(input_ids, attention_mask, ids, mask)
        return ids, mask

    def align(self, plain_logits: torch.Tensor, principle_logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The aligned scores from the raw logits of both branches, before any processor (used by
        ``paired_generate``, which then hands ``principle_logits`` over with :meth:`feed`). With several
        principles, ``principle_logits`` is their list and the rule is :func:`~.rule.combine_many`."""
        if isinstance(principle_logits, torch.Tensor):
            principle_logits = [principle_logits]
        return combine_many(plain_logits, principle_logits, self.alphas, self.normalize)

    def feed(self, principle_logits: torch.Tensor) -> None:
        """Mark this step's scores as already aligned by :meth:`align`; the processor's own call then only applies
        the plausibility mask (used by ``paired_generate``)."""
        self._paired_principle = principle_logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        processors = _calling_list(self)
        if self._paired_principle is not None:
            principle_logits, self._paired_principle = self._paired_principle, None
            return self._plausible(scores, principle_logits, processors).to(scores.dtype)
        if len(self.branches) > 1:
            raise ValueError("several principles run only with custom_generate=paired_generate.")
        check_model(self, _generating_model())
        if processors is not None:
            self._check_upstream(processors)
        else:  # called outside a LogitsProcessorList: what ran before us cannot be checked, so say so once
            logger.warning_once(
                "LinearAlignmentProcessor was not called by generate's LogitsProcessorList, so it cannot check that "
                "no processor changed the scores before it; it assumes `scores` are the plain model's raw logits. "
                "Use custom_generate=paired_generate to be sure.")
        principle_logits = self._principle_logits(input_ids, scores)
        if principle_logits.shape != scores.shape:
            raise ValueError(
                f"vocab-size mismatch: generate's scores have shape {tuple(scores.shape)} but the principle branch "
                f"gives {tuple(principle_logits.shape)}; the processor's model must be the model that generates."
            )
        aligned = combine(scores, principle_logits, self.alpha, self.normalize)
        return self._plausible(aligned, principle_logits, processors).to(scores.dtype)

    def _plausible(self, scores: torch.Tensor, principle_logits: torch.Tensor, processors) -> torch.Tensor:
        if self.principle_top_p is None:
            return scores
        temperature = self.principle_temperature
        if temperature is None:
            temperature = _generation_temperature(self, processors)
        return plausibility_mask(scores, principle_logits, self.principle_top_p, temperature)

    def _check_upstream(self, processors: LogitsProcessorList) -> None:
        upstream = processors[: next(i for i, p in enumerate(processors) if p is self)]
        changing = [type(p).__name__ for p in upstream if type(p) not in _BAN_ONLY]
        if changing:
            raise ValueError(
                f"generate runs {changing} before LinearAlignmentProcessor. They change finite scores, and a bare "
                "logits processor only sees the plain scores after them: mup + alpha * (mup - mu0) would turn each "
                "penalty into a boost. Pass custom_generate=paired_generate to generate (it aligns the raw logits "
                "first, then runs every processor on the aligned scores), or, for your own processors, list "
                "LinearAlignmentProcessor first. Defaults from the model's generation_config.json count too."
            )
        if self.normalize and upstream:
            raise ValueError(
                f"normalize=True needs the raw plain logits over the whole vocabulary, but generate runs "
                f"{[type(p).__name__ for p in upstream]} before LinearAlignmentProcessor: pass "
                "custom_generate=paired_generate to generate."
            )

    @torch.no_grad()
    def _principle_logits(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Principle logits after the principle prompt + the tokens generated after the plain prompt.

        Kept in one cache that follows ``input_ids``: one new token per step, several at once or rolled back to
        the accepted prefix (assisted decoding), from scratch when a new prompt comes.
        """
        prompt = self._prompt
        continuing = (
            prompt is not None
            and input_ids.shape[0] == prompt.shape[0]
            and input_ids.shape[1] > prompt.shape[1]
            and torch.equal(input_ids[:, : prompt.shape[1]], prompt)
        )
        if not continuing:
            _check_not_log_probs(scores)
            ids, mask = self.expanded_principle(input_ids)
            self._prompt, self._generated, self._mask = input_ids, input_ids[:, :0], mask
            logits, self._cache = cached_step(self.model, ids, mask, None)
            return logits
        new = input_ids[:, prompt.shape[1]:]
        keep = min(_common_prefix(self._generated, new), new.shape[1] - 1)
        dropped = self._generated.shape[1] - keep
        if dropped:
            self._cache.crop(-dropped)
        principle_len = self._mask.shape[1] - self._generated.shape[1]
        tokens = new[:, keep:]
        self._mask = torch.cat([self._mask[:, : principle_len + keep], self._mask.new_ones(tokens.shape)], dim=1)
        check_context(self.model, self._mask, "principle")
        logits, self._cache = cached_step(self.model, tokens, self._mask, self._cache)
        self._generated = new
        return logits


def check_model(processor: LinearAlignmentProcessor, model) -> None:
    """Refuse a processor built on another model than the one that generates (even with the same vocabulary:
    the principle branch would run other weights)."""
    if model is None or model is processor.model:
        return
    # A wrapper (PeftModel, DDP) generates through the model it wraps: same embedding module, same model.
    if model.get_input_embeddings() is not processor.model.get_input_embeddings():
        raise ValueError(
            f"this LinearAlignmentProcessor was built on another model ({type(processor.model).__name__} at "
            f"{id(processor.model):#x}) than the one that generates ({type(model).__name__} at {id(model):#x}): "
            "build it with the model you call generate on."
        )


def _generating_model():
    """The model whose decoding loop (``_sample`` & co.) is calling the processors, or None."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, PreTrainedModel):
            # An assistant model drafting tokens runs the main model's processors: not ours to check.
            config = frame.f_locals.get("generation_config")
            return None if getattr(config, "is_assistant", False) else candidate
        frame = frame.f_back
    return None


def _check_principle_rows(model, principle_input_ids, principle_attention_mask, index: int | None):
    """(ids, mask) of one principle, validated against ``model``; ``index`` names it among several."""
    name = "principle_input_ids" if index is None else f"principle_input_ids[{index}]"
    ids = torch.as_tensor(principle_input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(f"`{name}` must be a (batch, length) tensor, got shape {tuple(ids.shape)}.")
    mask = torch.ones_like(ids) if principle_attention_mask is None else torch.as_tensor(principle_attention_mask)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != ids.shape:
        raise ValueError(f"the attention mask of `{name}` has shape {tuple(mask.shape)} but the ids have "
                         f"{tuple(ids.shape)}.")
    empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"`{name}` row(s) {empty} are empty (attention mask all zeros).")
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(
            f"`{name}` holds token id {int(ids.max())} but the model's vocabulary has {vocab} "
            "tokens: were the principle prompts encoded with another tokenizer?"
        )
    limit, lengths = context_length(model), mask.sum(dim=1)
    if limit is not None and int(lengths.max()) >= limit:
        row = int(lengths.argmax())
        raise ValueError(
            f"`{name}` row {row} has {int(lengths[row])} tokens but the model's context is {limit} "
            "(max_position_embeddings): no room is left to generate; shorten the principle or the prompt."
        )
    return ids, mask.long()


# Tokens a principle may change around the place it is inserted (BPE merges across the boundary).
_BOUNDARY_SLACK = 2


def _check_rows_belong(plain_ids, plain_mask, principle_ids, principle_mask) -> None:
    """Each plain row must be its principle row with the inserted principle text taken out."""
    for row in range(plain_ids.shape[0]):
        principle = principle_ids[row][principle_mask[row].bool()]
        if plain_mask is not None:
            plain = plain_ids[row][plain_mask[row].bool()]
        else:  # left padding unknown: the prompt starts where the principle row's first token first appears
            start = (plain_ids[row] == principle[0]).nonzero()
            plain = plain_ids[row][int(start[0]):] if len(start) else plain_ids[row]
        n = min(len(plain), len(principle))
        prefix = int((plain[:n] == principle[:n]).long().cumprod(0).sum())
        suffix = int((plain.flip(0)[:n] == principle.flip(0)[:n]).long().cumprod(0).sum())
        if prefix + suffix + _BOUNDARY_SLACK < len(plain):
            raise ValueError(
                f"prompt row {row} does not belong to this processor's principle rows: the principle row is not "
                "that prompt with the principle inserted (built for other prompts?). Build the processor for these "
                "prompts (build_principle_inputs), or give the principle as text: generate(..., principle='...', "
                "tokenizer=tokenizer) with the exported custom_generate method. check_prompts=False turns this off "
                "for principle rows laid out otherwise (system_mode='replace')."
            )


def _calling_list(processor: LinearAlignmentProcessor) -> LogitsProcessorList | None:
    """The ``LogitsProcessorList`` that is calling ``processor`` (generate's full list), or None.

    A logits processor is not told which other processors run; generate calls the list, the list calls us.
    """
    frame = sys._getframe(2)
    if frame.f_code is not LogitsProcessorList.__call__.__code__:
        return None
    processors = frame.f_locals.get("self")
    if not isinstance(processors, LogitsProcessorList) or not any(p is processor for p in processors):
        return None
    return processors


def _generation_temperature(processor: LinearAlignmentProcessor, processors: LogitsProcessorList | None) -> float:
    """The temperature warper generate runs after ``processor`` (sampling), else 1."""
    if processors is None:
        return 1.0
    after = processors[next(i for i, p in enumerate(processors) if p is processor) + 1:]
    return next((float(p.temperature) for p in after if isinstance(p, TemperatureLogitsWarper)), 1.0)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest prefix that every row of ``a`` shares with the same row of ``b``."""
    n = min(a.shape[1], b.shape[1])
    same = (a[:, :n] == b[:, :n]).all(dim=0)
    return int(same.long().cumprod(dim=0).sum())


_BEAM_ERROR = (
    "LinearAlignmentProcessor does not support beam search (beams reorder rows and hand over log-probabilities); "
    "use greedy decoding or sampling (num_beams=1)."
)


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
