"""What a trained RAHF model is saved as: one plain-peft LoRA (default), a merged model, or the stacked form.

With ``lora_on="instructed"`` on a step-1 adapter, the trained model is the base plus two active LoRAs (the frozen
step-1 adapter and the RAHF LoRA) whose updates add up. A LoRA update ``scale * B @ A`` of several adapters sums
exactly to one LoRA of their concatenated factors::

    A = [A_1; A_2]  (rows),   B = [s_1 B_1, s_2 B_2]  (columns),   scale 1 (r = lora_alpha = r_1 + r_2)

so ``combined_lora`` writes one adapter that ``AutoPeftModelForCausalLM`` / ``PeftModel.from_pretrained`` load as
the trained model, with no step-1 adapter to find. Modules only one adapter touches get zero factors from the
other (an exact zero update). ``merge_and_unload`` folds the same updates into the base weights.

Example:
    >>> config, tensors = combined_lora(trainer.model, ["rahf_scit", "default"], trainer.model.peft_config["default"])
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

SAVE_AS = ("adapter", "merged", "stacked")


def _lora_layers(peft_model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _check_plain_lora(peft_model: nn.Module, names: list[str]) -> None:
    """Only plain LoRA on linear layers combines into one adapter; anything else is refused naming the option."""
    for name in names:
        config = peft_model.peft_config[name]
        extras = [field for field in ("use_dora", "modules_to_save", "lora_bias", "target_parameters",
                                      "trainable_token_indices") if getattr(config, field, None)]
        if getattr(config, "peft_type", None) is not None and str(config.peft_type.value) != "LORA":
            extras.append(f"peft_type={config.peft_type.value}")
        if getattr(config, "bias", "none") != "none":
            extras.append(f"bias={config.bias!r}")
        if extras:
            raise ValueError(f"adapter {name!r} uses {', '.join(extras)}, which cannot be combined into one LoRA; "
                             "save with save_as='merged' (one plain model) or save_as='stacked'.")
    for module_name, module in _lora_layers(peft_model):
        embedded = [n for n in names if n in getattr(module, "lora_embedding_A", {})]
        if embedded or any(n in module.lora_A and not isinstance(module.lora_A[n], nn.Linear) for n in names):
            raise ValueError(f"adapter(s) {embedded or names} adapt {module_name} (not a linear layer), which this "
                             "combination does not cover; save with save_as='merged' or save_as='stacked'.")


def combined_lora(peft_model: nn.Module, names: list[str], template: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """One LoRA (config, peft-format state dict) whose update equals the sum of adapters ``names`` of
    ``peft_model``; ``template`` (a ``LoraConfig``) gives the fields that do not change the update."""
    from peft import LoraConfig

    _check_plain_lora(peft_model, names)
    factors: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for module_name, module in _lora_layers(peft_model):
        present = [n for n in names if n in module.lora_A]
        if present:
            factors[module_name] = ([module.lora_A[n].weight.detach() for n in present],
                                    [(module.lora_B[n].weight.detach().float() * module.scaling[n])
                                     .to(module.lora_B[n].weight.dtype) for n in present])
    if not factors:
        raise ValueError(f"the adapters {names} adapt no module; nothing to save.")
    rank = max(sum(a.shape[0] for a in a_list) for a_list, _ in factors.values())
    tensors = {}
    for module_name, (a_list, b_list) in factors.items():
        a, b = torch.cat(a_list, dim=0), torch.cat(b_list, dim=1)
        pad = rank - a.shape[0]  # zero rows/columns: an exact zero contribution
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b
        tensors[f"base_model.model.{module_name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{module_name}.lora_B.weight"] = b.contiguous().cpu()
    config = LoraConfig(
        r=rank, lora_alpha=rank, use_rslora=False, target_modules=sorted(factors), lora_dropout=template.lora_dropout,
        fan_in_fan_out=template.fan_in_fan_out, bias="none", task_type=template.task_type,
        base_model_name_or_path=template.base_model_name_or_path, inference_mode=True,
    )
    return config, tensors


def merged_model(peft_model: nn.Module, names: list[str]) -> nn.Module:
    """A plain transformers model with the adapters ``names`` folded into a copy of the base weights (the trained
    model itself is left as it is; this holds a second copy of the weights for the time of the save)."""
    return copy.deepcopy(peft_model).merge_and_unload(adapter_names=names)
