"""Checks that keep RAHF's training from failing silently: hyper-parameters, losses and weights must be finite,
and what was made for one base model (instructed adapters, precomputed targets) must be used with that base.

A NaN ``alpha`` or ``sft_weight`` would otherwise train a NaN adapter while transformers' NaN filter logs a loss
of 0.0; an adapter made for a 4-layer model would load onto the first 4 layers of an 8-layer one without a word.

Example:
    >>> from hf_repalign.rahf.validation import require_number
    >>> require_number("alpha", float("nan"), low=0.0)
    Traceback (most recent call last):
    ValueError: alpha must be a finite number, got nan.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..hidden import num_hidden_layers

logger = logging.get_logger(__name__)

SIGNATURE_FILE = "hf_repalign_base.json"  # written beside adapters and precomputed targets


def require_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                   integer: bool = False) -> None:
    """A finite number (an int when ``integer``) within ``[low, high]``, else a ``ValueError`` naming ``name``."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite {'integer' if integer else 'number'}, got {value!r}.")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}.")


def require_training_numbers(args: Any) -> None:
    """The optimizer numbers of ``TrainingArguments`` finite and in range: a NaN ``max_grad_norm`` or ``weight_decay``
    would otherwise turn every weight into NaN at the first step."""
    require_number("learning_rate", args.learning_rate, low=0.0)
    if args.max_grad_norm is not None:  # None or 0: no clipping
        require_number("max_grad_norm", args.max_grad_norm, low=0.0)
    require_number("weight_decay", args.weight_decay, low=0.0)
    for name in ("adam_beta1", "adam_beta2"):
        require_number(name, getattr(args, name), low=0.0)
        if getattr(args, name) >= 1.0:
            raise ValueError(f"{name} must be < 1, got {getattr(args, name)}.")
    require_number("adam_epsilon", args.adam_epsilon, low=0.0)


def require_rows(dataset: Any, what: str) -> None:
    """Refuse an empty training set by name, before its rows are tokenized (and then blamed on a length limit)."""
    if dataset is not None and len(dataset) == 0:
        raise ValueError(f"{what}: train_dataset is empty (0 rows); give preference rows with prompt, chosen and "
                         "rejected.")


def check_lora_rank(model: nn.Module, peft_config: Any) -> None:
    """Refuse a LoRA rank no layer of ``model`` can use (above min(in, out) of its widest linear layer) before peft
    allocates it: ``r=1e9`` would otherwise try to allocate hundreds of GB."""
    ranks = [getattr(peft_config, "r", None), *(getattr(peft_config, "rank_pattern", None) or {}).values()]
    limit = max((min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)),
                default=None)
    for rank in ranks:
        if rank is None:
            continue
        require_number("LoRA rank r", rank, low=1, integer=True)
        if limit is not None and rank > limit:
            raise ValueError(f"LoRA rank r={rank} is larger than any layer of the model can use (at most {limit}, "
                             f"min(in, out) of its widest linear layer); choose r <= {limit} (--lora_r / --peft_r; "
                             "the authors use 8).")


def require_finite_weights(weights: nn.Module | Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to save ``weights`` (a model's trainable parameters, or a state dict) when any is NaN or infinite."""
    named = (weights.items() if isinstance(weights, Mapping)
             else ((n, p) for n, p in weights.named_parameters() if p.requires_grad))
    bad = [name for name, p in named if p.numel() and not torch.isfinite(p.detach()).all()]
    if bad:
        raise FloatingPointError(f"{what}: {len(bad)} parameter(s) are NaN or infinite (first: {bad[0]}); not "
                                 "saving them. The training diverged: lower learning_rate or alpha, or check bf16.")


def base_signature(model: nn.Module) -> dict[str, Any]:
    """What identifies the base a vector or an adapter was made with: its id and the shapes that must match."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.config.get_text_config()
    return {"base_model": getattr(base.config, "name_or_path", "") or "",
            "num_hidden_layers": num_hidden_layers(base), "hidden_size": getattr(text, "hidden_size", None),
            "vocab_size": getattr(text, "vocab_size", None)}


def write_signature(folder: str | Path, model: nn.Module, **extra: Any) -> None:
    """Record ``base_signature(model)`` (plus ``extra`` facts) in ``folder``."""
    (Path(folder) / SIGNATURE_FILE).write_text(json.dumps({**base_signature(model), **extra}, indent=1) + "\n")


def read_signature(path: Path) -> dict[str, Any]:
    """A signature file as :func:`write_signature` writes it, else an error naming the file (an empty or damaged one
    must not switch the check off)."""
    try:
        recorded = None if path.is_symlink() else json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    counts = ("num_hidden_layers", "hidden_size", "vocab_size")
    if not (isinstance(recorded, dict) and isinstance(recorded.get("base_model", ""), str)
            and all(type(recorded.get(key)) is int for key in counts[:1])
            and all(recorded.get(key) is None or type(recorded[key]) is int for key in counts[1:])):
        raise ValueError(f"{path} is not a base signature written by hf_repalign (a JSON object with integer "
                         f"{', '.join(counts)}); save the adapter again, or delete the file to check the adapter by "
                         "its layer indices.")
    return recorded


def check_signature(recorded: dict[str, Any] | None, model: nn.Module, what: str) -> None:
    """Refuse ``what`` when its recorded base differs in depth, width or vocabulary; warn when only the id differs
    (the same weights are often saved under different paths)."""
    if not recorded:
        return
    mine = base_signature(model)
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if recorded.get(key) is not None and mine[key] is not None and recorded[key] != mine[key]:
            raise ValueError(f"{what} was made for a base with {key}={recorded[key]} "
                             f"({recorded.get('base_model') or 'unnamed'}); this base has {key}={mine[key]} "
                             f"({mine['base_model'] or 'unnamed'}). Use it with the model it was made for.")
    theirs, ours = recorded.get("base_model") or "", mine["base_model"]
    if theirs and ours and Path(theirs).name != Path(ours).name:
        logger.warning(f"{what} was made for {theirs!r}; the base model is {ours!r} (same shapes, so it loads).")


def check_adapter_folder(path: Path, model: nn.Module) -> None:
    """An adapter folder against the base it is loaded onto: the recorded signature when there is one, else its
    layer indices (an adapter on all layers of a 4-layer model has no weights for layers 4..7 of an 8-layer one)."""
    signature = path / SIGNATURE_FILE
    if os.path.lexists(signature):
        check_signature(read_signature(signature), model, f"adapter {path}")
        return
    config = json.loads((path / "adapter_config.json").read_text())
    weights = path / "adapter_model.safetensors"
    if config.get("layers_to_transform") is not None or not weights.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        layers = {int(m.group(1)) for key in handle.keys() if (m := re.search(r"\.layers\.(\d+)\.", key))}
    total = num_hidden_layers(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if layers and max(layers) + 1 != total:
        raise ValueError(f"adapter {path} covers layers 0..{max(layers)} of every block (no layers_to_transform), "
                         f"i.e. a {max(layers) + 1}-layer base; this base has {total} layers.")
