"""Hidden states of chosen layers only, with early exit after the highest layer needed.

Layer indices follow ``output_hidden_states``: index 0 is the embedding output, index ``i`` (``1 <= i < L``) the
output of decoder layer ``i``, and index ``L`` (or ``-1``) the final-norm output. Shared by LEGEND and RAHF.

Example:
    >>> from hf_repalign.hidden import hidden_states_at
    >>> states = hidden_states_at(model, input_ids, attention_mask, layers=[10, 12])  # {10: (B, T, H), 12: ...}
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "decoder_layers",
    "num_hidden_layers",
    "resolve_layers",
    "position_ids_from_mask",
    "hidden_states_at",
    "pool_last",
    "pool_mean",
]


class _EarlyExit(Exception):
    """Raised from a forward hook once every requested layer has been captured."""


def _find_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(module that owns the decoder stack, the stack): the first ModuleList of ``num_hidden_layers`` blocks."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) if config is not None else None
    if count is None and hasattr(config, "get_text_config"):
        count = getattr(config.get_text_config(), "num_hidden_layers", None)
    for _, module in model.named_modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) == count:
                return module, child
    raise ValueError(
        f"Could not find the decoder layers of {type(model).__name__} (looked for a ModuleList of "
        f"config.num_hidden_layers={count} blocks)."
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama ``model.layers``, GPT-2 ``transformer.h``, PEFT-wrapped too)."""
    return _find_layers(model)[1]


def num_hidden_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def resolve_layers(model: nn.Module, layers: int | Iterable[int]) -> list[int]:
    """Normalise hidden-state indices into ``0..L`` (negative ones count from ``L``), sorted and unique."""
    total = num_hidden_layers(model)
    requested = [layers] if isinstance(layers, int) else list(layers)
    if not requested:
        raise ValueError("`layers` is empty; give at least one hidden-state index.")
    resolved = []
    for layer in requested:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer indices must be integers, got {layer!r}.")
        index = layer + total + 1 if layer < 0 else layer
        if not 0 <= index <= total:
            raise ValueError(
                f"layer {layer} is out of range for a model with {total} layers (hidden-state indices are "
                f"0..{total}, or -{total + 1}..-1)."
            )
        resolved.append(index)
    return sorted(set(resolved))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so left-padded rows match unpadded ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layers: int | Sequence[int] = -1,
    **forward_kwargs,
) -> dict[int, torch.Tensor]:
    """Hidden states at ``layers`` (``output_hidden_states`` indices) as ``{index: (B, T, H)}``.

    Runs the decoder stack only (never ``lm_head``) and stops right after the highest requested layer unless
    the final-norm output is requested. Position ids come from the attention mask, so padding on either side is
    exact. Gradients flow as usual; wrap the call in ``torch.no_grad()`` for targets.
    """
    wanted = resolve_layers(model, layers)
    owner, blocks = _find_layers(model)
    total = len(blocks)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def capture_input(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = hidden
        return hook

    def capture_output(index: int, stop: bool):
        def hook(module, args, output):
            captured[index] = output[0] if isinstance(output, (tuple, list)) else output
            if stop:
                raise _EarlyExit
        return hook

    top = max(i for i in wanted if i < total) if any(i < total for i in wanted) else None
    exit_early = total not in wanted
    try:
        for index in wanted:
            if index == 0:
                handles.append(blocks[0].register_forward_pre_hook(capture_input(0), with_kwargs=True))
            elif index < total:
                stop = exit_early and index == top
                handles.append(blocks[index - 1].register_forward_hook(capture_output(index, stop)))
        try:
            out = owner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
                **forward_kwargs,
            )
        except _EarlyExit:
            out = None
        if total in wanted:
            captured[total] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    finally:
        for handle in handles:
            handle.remove()
    return {index: captured[index] for index in wanted}


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, H): the state at each row's last non-pad token (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.bool() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool_mean(hidden: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, H): the mean over positions where ``span_mask`` is 1 (e.g. the response tokens)."""
    weights = span_mask.to(hidden.dtype).unsqueeze(-1)
    counts = weights.sum(dim=1).clamp(min=1)
    return (hidden * weights).sum(dim=1) / counts
