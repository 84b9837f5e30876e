"""``paired_generate``: a ``custom_generate`` decoding loop that runs the plain and the principle rows of each step
as ONE forward of 2B rows sharing one KV cache.

A bare ``LogitsProcessor`` cannot change generate's own forward, so its principle branch is a second forward per
step. Passing this loop to ``generate`` fuses the two; every other part of generate (input preparation, logits
processors and warpers, stopping criteria) works as usual and the tokens are the same. transformers (5.24) does
not hand ``streamer`` to ``custom_generate`` callables; the loop streams when it is given one directly.

Example:
    >>> from hf_repalign import LinearAlignmentProcessor, paired_generate
    >>> proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=1.0)
    >>> out = model.generate(**plain, logits_processor=[proc], custom_generate=paired_generate, max_new_tokens=64)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .forward import cached_step
from .processor import LinearAlignmentProcessor

# model_kwargs generate prepares that this loop replaces with its own (a fresh cache for the 2B rows).
_REPLACED_KWARGS = {
    "attention_mask", "position_ids", "cache", "past_key_values", "cache_position", "use_cache", "logits_to_keep"
}


def _find_processor(logits_processor: LogitsProcessorList) -> LinearAlignmentProcessor:
    found = [p for p in logits_processor if isinstance(p, LinearAlignmentProcessor)]
    if len(found) != 1:
        raise ValueError(
            f"custom_generate=paired_generate needs exactly one LinearAlignmentProcessor in `logits_processor`, "
            f"found {len(found)}."
        )
    return found[0]


def _left_pad(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return F.pad(ids, (extra, 0), value=pad_id), F.pad(mask, (extra, 0), value=0)


@torch.no_grad()
def paired_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
):
    """Greedy / sampling loop with the signature of ``GenerationMixin._sample``; see the module docstring."""
    if synced_gpus:
        raise NotImplementedError("paired_generate does not support synced_gpus (DeepSpeed ZeRO-3 / FSDP).")
    if generation_config.num_beams > 1:
        raise ValueError("paired_generate does not support beam search; use num_beams=1.")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise NotImplementedError("paired_generate cannot return attentions or hidden states.")
    user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if user_cache is not None and user_cache.get_seq_length() > 0:
        raise ValueError("paired_generate starts from the prompt: a pre-filled cache cannot be continued.")
    unexpected = sorted(k for k, v in model_kwargs.items() if k not in _REPLACED_KWARGS and v is not None)
    if unexpected:
        raise ValueError(f"paired_generate cannot pass these model inputs on: {unexpected}.")

    processor = _find_processor(logits_processor)
    processor.reset()
    rows, plain_len = input_ids.shape
    plain_mask = model_kwargs.get("attention_mask")
    if plain_mask is None:
        plain_mask = torch.ones_like(input_ids)
    principle_ids, principle_mask = processor.expanded_principle(input_ids)
    length = max(plain_len, principle_ids.shape[1])
    pad_id = int(generation_config._pad_token_tensor) if generation_config._pad_token_tensor is not None else 0
    plain_ids_p, plain_mask_p = _left_pad(input_ids, plain_mask.long(), length, pad_id)
    principle_ids_p, principle_mask_p = _left_pad(principle_ids, principle_mask, length, pad_id)
    step_ids = torch.cat([plain_ids_p, principle_ids_p])
    mask = torch.cat([plain_mask_p, principle_mask_p])

    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    pad_token = generation_config._pad_token_tensor
    has_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    cache = None
    try:
        while True:
            logits, cache = cached_step(model, step_ids, mask, cache)
            plain_logits, principle_logits = logits[:rows], logits[rows:]
            processor.feed(principle_logits)
            next_scores = logits_processor(input_ids, plain_logits)
            if scores is not None:
                scores += (next_scores,)
            if raw_logits is not None:
                raw_logits += (plain_logits,)
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
            step_ids = torch.cat([next_tokens, next_tokens])[:, None]
            mask = torch.cat([mask, mask.new_ones(2 * rows, 1)], dim=1)
    finally:
        processor.reset()
    if streamer is not None:
        streamer.end()
    if return_dict:
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits)
    return input_ids
