"""The Hub side of our artifacts: paths vs Hub ids, downloads, the Hub ids of base models, pushing.

Example:
    >>> from hf_repalign.hub import load_folder, push_folder
    >>> tensors, config = load_folder("someone/margin-vector")   # a local folder or a Hub repo id
    >>> push_folder("out/vec", "me/margin-vector")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import CONFIG_NAME, HIDDEN_PREFIX, read_folder

if TYPE_CHECKING:
    import torch

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
# Bump when models.py's conversion changes, so stale caches are rebuilt rather than reused.
_CONVERSION_VERSION = "1"


class HubAccessError(OSError):
    """A Hub repo id cannot be reached (offline, unknown, private); the message says which and what to do."""


# ------------------------------------------------------------------------------------------------ paths vs Hub ids
def is_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid Hub repo id (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hf_home() -> Path:
    """``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface`` (``~/.cache/huggingface``)."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg).expanduser() / "huggingface"


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def embedded_model_cache_dir() -> Path:
    """Folder holding the converted embedded model: ``$HF_HOME/hf_repalign/SmolLM2-135M-Instruct-v1``."""
    return hf_home() / "hf_repalign" / f"{EMBEDDED_MODEL_NAME}-v{_CONVERSION_VERSION}"


# A name ending like a file is a mistyped path, never a Hub id (though "data.jsonl" is a valid repo id).
_FILE_SUFFIXES = {".json", ".jsonl", ".gz", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".yaml", ".yml",
                  ".safetensors", ".bin", ".pt", ".gguf", ".zip", ".tar"}


def local_or_repo_id(name: str | os.PathLike, what: str = "path") -> Path | str:
    """An existing local path as a ``Path``, else ``name`` as a Hub repo id; a missing path is reported as such.

    Only a string that is a valid repo id and not an existing path is a Hub id. ``what`` names the argument in
    errors.
    """
    local = Path(name).expanduser()
    if local.exists():
        return local
    text = str(name)
    looks_local = (text.startswith((".", "/", "~")) or text.endswith(("/", os.sep)) or text.count("/") > 1
                   or local.suffix.lower() in _FILE_SUFFIXES)
    if looks_local or not is_repo_id(text):
        raise FileNotFoundError(f"{what} {text!r} does not exist (not a local path, nor a Hub repo id).")
    return text


def resolve_folder(path_or_repo_id: str | os.PathLike, what: str = "path", **hub_kwargs) -> Path:
    """A local folder as is, or a Hub repo downloaded (the HF cache is used; offline, only the cache)."""
    location = local_or_repo_id(path_or_repo_id, what)
    if isinstance(location, Path):
        if not location.is_dir():
            raise NotADirectoryError(f"{what} {str(location)!r} is a file; expected a folder.")
        return location
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if hub_offline():
        hub_kwargs = {**hub_kwargs, "local_files_only": True}
    try:
        return Path(snapshot_download(location, **hub_kwargs))
    except LocalEntryNotFoundError as err:
        if hub_offline():
            raise HubAccessError(f"{what} {location!r} is not a local folder and HF_HUB_OFFLINE=1 forbids "
                                 "downloading it from the Hub (it is not in the HF cache).") from err
        raise HubAccessError(f"{what} {location!r} is not a local folder and could not be downloaded from the Hub "
                             f"({str(err).splitlines()[0]}).") from err
    except RepositoryNotFoundError as err:
        raise HubAccessError(f"{what} {location!r} is neither a local folder nor a Hub repo you can access.") from err
    except HfHubHTTPError as err:
        raise HubAccessError(f"{what} {location!r}: the Hub answered {str(err).splitlines()[0]}") from err


def load_folder(path_or_repo_id: str | os.PathLike, what: str = "path",
                **hub_kwargs) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`artifacts.read_folder` of a local folder or a Hub repo; ``what`` names the argument in errors."""
    local = isinstance(local_or_repo_id(path_or_repo_id, what), Path)
    return read_folder(resolve_folder(path_or_repo_id, what, **hub_kwargs), local)


# ------------------------------------------------------------------------------------------------ Hub ids of models
def base_model_id(model_or_path: Any) -> str | None:
    """The Hub id of a model (an ``nn.Module``/config holder, or its path/name), or ``None`` if none is known.

    The embedded model's cache folder maps to ``HuggingFaceTB/SmolLM2-135M-Instruct``; a local folder maps to the
    ``_name_or_path`` recorded in its ``config.json`` when that is a repo id; a repo id is itself.
    """
    if hasattr(model_or_path, "config"):
        config = model_or_path.config
        name = str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")
    else:
        name = str(model_or_path or "")
    if not name:
        return None
    if name == "SmolLM2-135M-Instruct":  # what vectors saved before 0.1.1 recorded for the embedded model
        return EMBEDDED_HUB_ID
    local = Path(name).expanduser()
    if local.exists():
        if local.resolve() == embedded_model_cache_dir().resolve():
            return EMBEDDED_HUB_ID
        try:
            recorded = json.loads((local / CONFIG_NAME).read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded != name and not Path(recorded).exists() and is_repo_id(recorded):
            return recorded
        return None
    return name if is_repo_id(name) and "/" in name else None


def require_base_model(base_model: str | None, recorded: str | None, what: str) -> str:
    """The base model's Hub id for a push: ``base_model`` if given, else the recorded id, else a clear error."""
    # A recorded name counts only as "namespace/name": a bare word may be a class name or a folder name.
    chosen = base_model or (recorded if recorded and "/" in recorded and is_repo_id(recorded)
                            and not Path(recorded).exists() else None)
    if not chosen:
        raise ValueError(f"cannot push the {what}: its base model ({recorded or 'unknown'!s}) is a local folder, not "
                         "a Hub id; pass base_model='namespace/name' (--base_model) so that others can load it.")
    if not is_repo_id(chosen):
        raise ValueError(f"base_model {chosen!r} is not a Hub repo id ('namespace/name').")
    return chosen


# ------------------------------------------------------------------------------------------------ pushing
def push_folder(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload with hf_repalign") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the commit URL.

    Offline (``HF_HUB_OFFLINE=1``) this fails at once with one clear line.
    """
    if not is_repo_id(repo_id):
        raise ValueError(f"push_to_hub: {repo_id!r} is not a valid Hub repo id ('namespace/name').")
    if hub_offline():
        raise HubAccessError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE=1 is set; unset it to upload.")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                             ignore_patterns=[f"{HIDDEN_PREFIX}*", "*.bin", "*.pt", "*.pth", "*.pkl"])
    return str(info)
