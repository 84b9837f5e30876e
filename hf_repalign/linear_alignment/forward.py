"""One cached decoder step with mask-derived positions, across transformers versions (>= 5.17)."""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from hf_repalign.hidden import position_ids_from_mask
from hf_repalign.models import context_length


@lru_cache(maxsize=None)
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the forward's KV-cache argument: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def cached_step(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache=None,
):
    """Run ``input_ids`` (the new tokens) on top of ``cache``; return (last-position logits (B, V), cache).

    ``attention_mask`` covers the cached and the new tokens; positions are read off it, so left padding is exact.
    """
    positions = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1]:]
    kwargs = {cache_argument(model): cache}
    if "logits_to_keep" in _forward_parameters(type(model)):
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **kwargs)
    new_cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    return out.logits[:, -1].float(), new_cache


def check_context(model: torch.nn.Module, attention_mask: torch.Tensor, branch: str) -> None:
    """Raise a clear error when a row of ``attention_mask`` holds more tokens than the model's context."""
    limit = context_length(model)
    longest = int(attention_mask.sum(dim=-1).max())
    if limit is not None and longest > limit:
        raise ValueError(
            f"the {branch} branch reached {longest} tokens but the model's context is {limit} "
            "(max_position_embeddings): use a shorter principle or prompt, or fewer max_new_tokens."
        )
