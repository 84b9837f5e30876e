"""``paired_generate``: the recommended way to run Linear Alignment, as a ``custom_generate`` decoding loop.

Each step runs the plain and the principle rows as ONE forward of 2B rows sharing one KV cache, computes the
aligned scores ``mup + alpha * (mup - mu0)`` from the raw logits of both branches, and then runs every processor and
warper ``generate`` built (repetition penalty, sequence bias, length penalties, bans, temperature, top-k/top-p, the
model's ``generation_config.json`` defaults, ...) on the aligned scores, exactly as on a plain model's logits.
Stopping criteria, ``streamer``, ``output_scores``/``output_logits`` and the returned cache work as with ``_sample``.

Example:
    >>> from hf_repalign import LinearAlignmentProcessor, paired_generate
    >>> proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=1.0)
    >>> out = model.generate(**plain, logits_processor=[proc], custom_generate=paired_generate, max_new_tokens=64)
"""

from __future__ import annotations

import copy
import inspect
import sys

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.cache_utils import DynamicLayer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .forward import cached_step, check_context
from .processor import LinearAlignmentProcessor, check_model

# The generate output's cache: ``cache`` from transformers 5.24 on, ``past_key_values`` before.
OUTPUT_CACHE_FIELD = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"

# model_kwargs generate prepares that this loop replaces with its own (a fresh cache for the 2B rows).
_REPLACED_KWARGS = {
    "attention_mask", "position_ids", "cache", "past_key_values", "cache_position", "use_cache", "logits_to_keep"
}
_GENERATE_CODE = inspect.unwrap(GenerationMixin.generate).__code__


def _find_processor(logits_processor: LogitsProcessorList) -> LinearAlignmentProcessor:
    found = [p for p in logits_processor if isinstance(p, LinearAlignmentProcessor)]
    if len(found) != 1:
        raise ValueError(
            f"custom_generate=paired_generate needs exactly one LinearAlignmentProcessor in `logits_processor`, "
            f"found {len(found)}."
        )
    return found[0]


def _generate_arguments() -> dict:
    """The arguments of the ``generate`` call that is running this loop (``streamer``, ``assistant_model``,
    ``tokenizer``), or {}.

    transformers (5.17-5.25) hands ``custom_generate`` callables neither ``streamer``, ``assistant_model`` nor
    ``tokenizer``; it has already put the prompt into the streamer, so a consumer would wait forever for ``end()``
    unless we find it. ``tokenizer`` is only left in the keyword arguments of the wrappers around ``generate``.
    The exported ``custom_generate`` method receives all of them and passes them on, so this is only needed when
    ``paired_generate`` is given to ``generate`` directly.
    """
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _GENERATE_CODE:
        frame = frame.f_back
    if frame is None:
        return {}
    found = {key: frame.f_locals.get(key) for key in ("streamer", "assistant_model")}
    for _ in range(4):
        frame = frame.f_back
        kwargs = frame.f_locals.get("kwargs") if frame is not None else None
        if isinstance(kwargs, dict) and kwargs.get("tokenizer") is not None:
            found["tokenizer"] = kwargs["tokenizer"]
            break
    return found


def stop_string_criteria(stop_strings, tokenizer) -> StopStringCriteria:
    """``generate``'s stop-string criterion, with the error it gives when no tokenizer is at hand."""
    if tokenizer is None:
        raise ValueError(
            "`stop_strings` needs the model's tokenizer: pass `tokenizer=` to generate alongside `stop_strings`."
        )
    return StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)


def _left_pad(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return F.pad(ids, (extra, 0), value=pad_id), F.pad(mask, (extra, 0), value=0)


def _prefill(model, branches, length: int):
    """The first step, each branch on its own, then one cache for all rows (each branch's keys and values
    left-padded to ``length``): no work on the padding that would line a short branch up with a long one.

    Returns (logits, cache), or (None, None) when the cache layers are not ``DynamicLayer`` (the caller then runs
    all rows together).
    """
    logits, caches = [], []
    for index, (ids, mask) in enumerate(branches):
        shared = _shared_prefix(branches[0], (ids, mask)) if index else 0
        if shared:  # the tokens before the principle: their keys and values are the plain branch's
            start = copy.deepcopy(caches[0])
            for layer in start.layers:
                layer.keys, layer.values = layer.keys[..., :shared, :], layer.values[..., :shared, :]
            branch_logits, branch_cache = cached_step(model, ids[:, shared:], mask, start)
        else:
            branch_logits, branch_cache = cached_step(model, ids, mask, None)
        if not all(type(layer) is DynamicLayer for layer in branch_cache.layers):
            return None, None
        logits.append(branch_logits)
        caches.append(branch_cache)
    merged = caches[0]
    for index, layer in enumerate(merged.layers):
        parts = [cache.layers[index] for cache in caches]
        layer.keys = torch.cat([F.pad(p.keys, (0, 0, length - p.keys.shape[-2], 0)) for p in parts])
        layer.values = torch.cat([F.pad(p.values, (0, 0, length - p.values.shape[-2], 0)) for p in parts])
    return torch.cat(logits), merged


def _shared_prefix(plain: tuple[torch.Tensor, torch.Tensor], branch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """How many leading tokens every row of ``branch`` shares with its plain row (0 when either is padded: the
    positions would not line up), leaving at least one token of each to run."""
    (plain_ids, plain_mask), (ids, mask) = plain, branch
    if not (bool(plain_mask.all()) and bool(mask.all())):
        return 0
    n = min(plain_ids.shape[1], ids.shape[1]) - 1
    same = (plain_ids[:, :n] == ids[:, :n]).all(dim=0)
    return int(same.long().cumprod(dim=0).sum())


def _plain_rows_cache(cache, rows: int, extra: int):
    """The plain rows of the 2B-row cache without the left padding added to match the principle rows, so it
    continues ``sequences`` like the cache ``_sample`` returns; None for cache layers other than ``DynamicLayer``."""
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    cache.batch_select_indices(torch.arange(rows, device=cache.layers[0].keys.device))
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., extra:, :], layer.values[..., extra:, :]
    return cache


@torch.no_grad()
def paired_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer=None,
    stop_strings: str | list[str] | None = None,
    **model_kwargs,
):
    """Greedy / sampling loop with the signature of ``GenerationMixin._sample``; see the module docstring.

    ``stop_strings`` is a parameter here (transformers then passes it on instead of asking for a tokenizer it does
    not hand over); the tokenizer is the one given to ``generate``.
    """
    caller = _generate_arguments()
    streamer = streamer if streamer is not None else caller.get("streamer")
    if stop_strings is not None:
        stopping_criteria = StoppingCriteriaList(
            [*stopping_criteria, stop_string_criteria(stop_strings, caller.get("tokenizer"))])
    try:
        return _paired_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                            streamer, caller.get("assistant_model"), model_kwargs)
    finally:
        # Always end the stream: a TextIteratorStreamer consumer must not hang when generation fails.
        if streamer is not None:
            streamer.end()


def _paired_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
                 assistant_model, model_kwargs):
    if synced_gpus:
        raise NotImplementedError("paired_generate does not support synced_gpus (DeepSpeed ZeRO-3 / FSDP).")
    if generation_config.num_beams > 1:
        raise ValueError("paired_generate does not support beam search; use num_beams=1.")
    if assistant_model is not None or generation_config.prompt_lookup_num_tokens is not None:
        raise ValueError(
            "paired_generate does not run assisted decoding (assistant_model / prompt_lookup_num_tokens): drop one "
            "of the two. Without custom_generate, the bare LinearAlignmentProcessor runs assisted decoding exactly "
            "(it refuses processors that change finite scores, such as repetition_penalty)."
        )
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise NotImplementedError("paired_generate cannot return attentions or hidden states.")
    user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if user_cache is not None and user_cache.get_seq_length() > 0:
        raise ValueError("paired_generate starts from the prompt: a pre-filled cache cannot be continued.")
    unexpected = sorted(k for k, v in model_kwargs.items() if k not in _REPLACED_KWARGS and v is not None)
    if unexpected:
        raise ValueError(f"paired_generate cannot pass these model inputs on: {unexpected}.")

    processor = _find_processor(logits_processor)
    check_model(processor, model)
    processor.reset()
    rows, plain_len = input_ids.shape
    plain_mask = model_kwargs.get("attention_mask")
    if plain_mask is None:
        plain_mask = torch.ones_like(input_ids)
    branches = [(input_ids, plain_mask.long())] + [
        processor.expanded_principle(input_ids, plain_mask, branch) for branch in range(len(processor.branches))]
    length = max(ids.shape[1] for ids, _ in branches)
    pad_id = int(generation_config._pad_token_tensor) if generation_config._pad_token_tensor is not None else 0
    padded = [_left_pad(ids, branch_mask, length, pad_id) for ids, branch_mask in branches]
    step_ids = torch.cat([ids for ids, _ in padded])
    mask = torch.cat([branch_mask for _, branch_mask in padded])
    copies = len(padded)

    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    pad_token = generation_config._pad_token_tensor
    has_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    cache = None
    try:
        while True:
            check_context(model, mask[:rows], "plain")
            check_context(model, mask[rows:], "principle")
            if cache is None:
                logits, cache = _prefill(model, branches, length)
                if cache is None:
                    logits, cache = cached_step(model, step_ids, mask, None)
            else:
                logits, cache = cached_step(model, step_ids, mask, cache)
            plain_logits, *principle_logits = logits.split(rows)
            # The aligned scores are the model's scores: every processor, including those generate runs before
            # user processors, acts on them. The processor's own call then only applies its plausibility mask.
            aligned = processor.align(plain_logits, principle_logits)
            processor.feed(principle_logits[0])
            next_scores = logits_processor(input_ids, aligned)
            if scores is not None:
                scores += (next_scores,)
            if raw_logits is not None:
                raw_logits += (aligned,)
            if generation_config.do_sample:
                next_tokens = torch.multinomial(F.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_scores, dim=-1)
            if has_eos:
                next_tokens = torch.where(unfinished, next_tokens, pad_token)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores)
            if not bool(unfinished.any()):
                break
            step_ids = next_tokens.repeat(copies)[:, None]
            mask = torch.cat([mask, mask.new_ones(copies * rows, 1)], dim=1)
    finally:
        processor.reset()
    if return_dict:
        plain_cache = None
        if generation_config.use_cache:
            plain_cache = _plain_rows_cache(cache, rows, length - plain_len)
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits,
                                         **{OUTPUT_CACHE_FIELD: plain_cache})
    return input_ids
