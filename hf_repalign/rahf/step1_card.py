"""Step-1 models (SCIT, Dual good/bad) saved Hub-ready: the base named by its Hub id, the tokenizer, and a card whose
snippet loads the folder (by absolute path, or by repo id once pushed) with plain transformers + peft.

Example:
    >>> with hub_base(peft_model, "HuggingFaceTB/SmolLM2-135M-Instruct"):
    ...     peft_model.save_pretrained(folder)
    >>> write_step1_card(folder, "SCIT", peft_model, args, repo_id=str(folder.absolute()), base_model=None, steps=10)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import field
from pathlib import Path
from typing import Any

from torch import nn

from ..cards import base_model_fields, render_card
from ..hub import base_model_id, is_repo_id


def base_model_field() -> Any:
    """The ``base_model`` option of the step-1 configs (as ``RAHFConfig.base_model``)."""
    return field(default=None, metadata={
        "help": "Hub id of the base model, recorded in the saved adapter and its card; default: taken from the "
                "model (the embedded model is HuggingFaceTB/SmolLM2-135M-Instruct). Needed to push a model trained "
                "from a local folder whose config records no Hub id."})


def bare_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def step1_base_id(model: nn.Module, base_model: str | None) -> str | None:
    """``base_model`` if given, else the Hub id known for the model's base (None for a local one)."""
    return base_model or base_model_id(bare_model(model))


def local_base(model: nn.Module) -> str:
    """The base model's local name (an absolute path when it is a folder)."""
    name = str(getattr(bare_model(model).config, "name_or_path", "") or "")
    return str(Path(name).absolute()) if name and Path(name).exists() else name


@contextlib.contextmanager
def hub_base(model: nn.Module, base: str | None) -> Iterator[None]:
    """While saving, the adapter configs of ``model`` name ``base`` (a Hub id), else the absolute local path."""
    configs = list(getattr(model, "peft_config", {}).values())
    saved = [c.base_model_name_or_path for c in configs]
    for config in configs:
        config.base_model_name_or_path = base or local_base(model)
    try:
        yield
    finally:
        for config, name in zip(configs, saved):
            config.base_model_name_or_path = name


def write_step1_card(folder: str | os.PathLike, role: str, model: nn.Module, args: Any, repo_id: str,
                     base_model: str | None, steps: int) -> None:
    """Write ``README.md`` for a step-1 model (``role``: "SCIT", "Dual good", "Dual bad") into ``folder``."""
    adapter = hasattr(model, "peft_config")
    dataset = getattr(args, "dataset_name", None)
    card_data = {"library_name": "peft" if adapter else "transformers", "base_model": base_model,
                 "tags": ["rahf", "representation-engineering", *(["lora"] if adapter else [])],
                 "datasets": [dataset] if dataset and is_repo_id(dataset) else None}
    text = render_card("rahf_step1.md", card_data, role=role, repo_id=repo_id, adapter=adapter, steps=steps,
                       settings=json.dumps({k: v for k, v in args.to_dict().items() if k in _SHOWN}),
                       **base_model_fields(base_model, local_base(model)))
    (Path(folder) / "README.md").write_text(text, encoding="utf-8")


_SHOWN = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "sft_weight",
          "label_smoothing", "preferred_instruction", "dispreferred_instruction", "good_instruction",
          "bad_instruction", "seed")
