"""Activity patterns: hidden states of (instruction, query, response) stimuli, aligned position by position.

Every stimulus of a batch is laid out as ``[left pad | instruction + query | response | right pad]`` with the
same prompt width ``P`` and response width ``R``, so position ``P + k`` is the k-th response token in all of
them, whatever the instruction's length. Only the first ``max_response_tokens`` response tokens are used and
``response_mask`` marks the real ones. The difference vector of one layer is ``v = A(p+) - A(p-)``: the SCIT
model under its two instructions, or the good and bad Dual models, each on its own stimulus.

Example:
    >>> from hf_repalign.rahf.patterns import align_stimuli, default_target_layers, activity_patterns
    >>> batch = align_stimuli([prompt_ids], [response_ids], pad_token_id=0, max_response_tokens=64)
    >>> states = activity_patterns(model, batch["input_ids"], batch["attention_mask"], default_target_layers(32))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..hidden import hidden_states_at, num_hidden_layers, resolve_layers

# The authors' bands, hidden_states indices of their 32-layer Llama-2-7B: DUAL-step2.sh uses 10, 12, ..., 20,
# SCIT-step2.sh 10, 12, ..., 18.
PAPER_LAYERS = (10, 12, 14, 16, 18, 20)
SCIT_SCRIPT_LAYERS = (10, 12, 14, 16, 18)
PAPER_DEPTH = 32


def default_target_layers(num_layers: int, band: Sequence[int] = PAPER_LAYERS) -> list[int]:
    """``band`` (indices of a 32-layer model) scaled to ``num_layers``: e.g. 30 layers -> 9, 11, ..., 19."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}.")
    return sorted({max(1, int(i * num_layers / PAPER_DEPTH + 0.5)) for i in band})


def target_layers(model: nn.Module, layers: Sequence[int] | None, band: Sequence[int] = PAPER_LAYERS) -> list[int]:
    """``layers`` checked against ``model`` (clear error when out of range), or ``band`` scaled to its depth."""
    if layers is None:
        return default_target_layers(num_hidden_layers(model), band)
    return resolve_layers(model, list(layers))


def align_stimuli(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    max_response_tokens: int,
    prompt_width: int | None = None,
    response_width: int | None = None,
) -> dict[str, torch.Tensor]:
    """Left-pad prompts to ``prompt_width`` and right-pad responses to ``response_width`` (row-aligned).

    Widths default to the longest prompt and the longest (cut) response. Prompts longer than ``prompt_width``
    keep their last tokens. Returns ``input_ids``, ``attention_mask`` and ``response_mask`` of shape (B, P + R).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses.")
    cut = [list(r)[:max_response_tokens] for r in responses]
    width_p = prompt_width if prompt_width is not None else max(len(p) for p in prompts)
    width_r = response_width if response_width is not None else max(len(r) for r in cut)
    shape = (len(prompts), width_p + width_r)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, cut)):
        prompt = list(prompt)[-width_p:] if width_p else []
        response = response[:width_r]
        start = width_p - len(prompt)
        input_ids[row, start:width_p] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[row, width_p : width_p + len(response)] = torch.as_tensor(response, dtype=torch.long)
        attention_mask[row, start : width_p + len(response)] = 1
        response_mask[row, width_p : width_p + len(response)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def activity_patterns(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> torch.Tensor:
    """Hidden states at ``layers`` stacked as (n_layers, B, T, H); the forward stops after the top layer."""
    states = hidden_states_at(model, input_ids, attention_mask, layers)
    return torch.stack([states[i] for i in resolve_layers(model, list(layers))])


def difference_vectors(
    positive: torch.Tensor, negative: torch.Tensor, positive_mask: torch.Tensor, negative_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``v = A(p+) - A(p-)`` and the positions valid in both stimuli (zero elsewhere)."""
    mask = positive_mask.bool() & negative_mask.bool()
    v = (positive - negative) * mask.to(positive.dtype)[None, :, :, None]
    return v, mask.long()


class AdapterSwitch:
    """Chooses which LoRA adapters of a PEFT model compute in a forward, without touching trainable flags.

    PEFT's ``set_adapter`` also flips ``requires_grad`` and the model-level active adapter (which the Trainer's
    checkpoint code reads); this sets only the per-layer list, so several adapters can be stacked (a frozen
    step-1 adapter under the trained one) and switched per forward in the middle of training.

    Example:
        >>> switch = AdapterSwitch(peft_model)
        >>> switch.set(["scit", "default"])          # resting state: both compute, only "default" is trainable
        >>> with switch.only(peft_model, ["scit"]):  # eval mode, "default" off, then back
        ...     states = activity_patterns(peft_model, ids, mask, [10])
    """

    def __init__(self, model: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.resting: list[str] = []

    def set(self, names: Sequence[str]) -> None:
        """Make ``names`` the adapters that compute from now on (the state forwards return to)."""
        self.resting = list(names)
        self._apply(self.resting)

    def _apply(self, names: list[str]) -> None:
        for layer in self.layers:
            layer._active_adapter = list(names)

    @contextlib.contextmanager
    def only(self, model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
        """Run ``model`` in eval mode with only ``names`` computing (``[]``: the bare base), then restore."""
        was_training = model.training
        model.eval()
        self._apply(list(names))
        try:
            yield model
        finally:
            self._apply(self.resting)
            model.train(was_training)
