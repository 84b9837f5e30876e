"""Load a RAHF model saved in the stacked form (``save_as="stacked"``): the base, its step-1 adapter (SCIT, or Dual's
good model) and the RAHF LoRA trained on top of it, all active (PEFT's multi-adapter LoRA: their updates add up).
The default save needs none of this: it folds the step-1 adapter into the one saved adapter.

Example:
    >>> from hf_repalign.rahf import stack_adapters
    >>> model = stack_adapters(base_model, ["out/scit", "out/rahf-adapter"])   # step-1 adapter first
    >>> merged = model.merge_and_unload()                                       # optional: one plain model
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn


def stack_adapters(model: nn.Module, folders: Sequence[str | os.PathLike], names: Sequence[str] | None = None) -> Any:
    """``model`` with the adapter ``folders`` loaded (frozen) and all active at once, as a ``PeftModel``.

    ``names`` default to ``adapter_0``, ``adapter_1``, ...; ``merge_and_unload()`` on the result folds them all
    into the base weights.
    """
    from peft import PeftModel

    if not folders:
        raise ValueError("stack_adapters needs at least one adapter folder.")
    names = list(names) if names is not None else [f"adapter_{i}" for i in range(len(folders))]
    if len(names) != len(folders) or len(set(names)) != len(names):
        raise ValueError(f"give one distinct name per folder; got names {names} for {len(folders)} folder(s).")
    stacked = PeftModel.from_pretrained(model, str(folders[0]), adapter_name=names[0])
    for folder, name in zip(folders[1:], names[1:]):
        stacked.load_adapter(str(folder), adapter_name=name)
    stacked.base_model.set_adapter(names, inference_mode=True)
    return stacked.eval()
