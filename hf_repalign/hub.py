"""Saving, loading and sharing our artifacts: safetensors + a JSON config (never pickle), and model cards.

Every saved artifact is a folder ``{config.json, <weights>.safetensors, README.md}``. Writes are atomic: the
folder is built next to its destination and renamed into place, so an interrupted save never leaves a folder
that looks complete.

Example:
    >>> from hf_repalign.hub import save_folder, load_folder
    >>> save_folder("out/vec", tensors={"direction": d}, config={"layer": -1}, card="# my card")
    >>> tensors, config = load_folder("out/vec")
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

logger = logging.get_logger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``save_directory``; on success it replaces ``save_directory`` by rename.

    An existing folder is moved aside first and deleted only after the new one is in place, so a failure at any
    point leaves either the old folder or the new one, never a partial one.
    """
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            target.rename(backup)
            tmp.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_folder(
    save_directory: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    card: str | None = None,
) -> Path:
    """Write tensors (safetensors), config (JSON) and an optional card into ``save_directory`` atomically."""
    with atomic_folder(save_directory) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        if card is not None:
            (tmp / CARD_NAME).write_text(card)
    return Path(save_directory)


def resolve_folder(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> Path:
    """A local folder as is, or a Hub repo id downloaded (honours ``HF_HUB_OFFLINE`` and the HF cache)."""
    local = Path(path_or_repo_id)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_repo_id), **hub_kwargs))


def load_folder(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of :func:`save_folder`: ``(tensors, config)``."""
    folder = resolve_folder(path_or_repo_id, **hub_kwargs)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}; is it a folder written by save_pretrained?")
    config = json.loads((folder / CONFIG_NAME).read_text())
    return load_file(str(folder / WEIGHTS_NAME)), config


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload with hf_repalign") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return str(info)


def _card_template(name: str) -> str:
    # `hf_repalign/model_cards` links to the repo's `model_cards/`, so templates ship as package data.
    path = resources.files("hf_repalign").joinpath("model_cards", name)
    if not path.is_file():
        raise FileNotFoundError(f"model card template {name!r} not found in hf_repalign/model_cards/")
    return path.read_text()


def render_card(template_name: str, **fields: Any) -> str:
    """Fill ``model_cards/<template_name>`` (``$field`` placeholders); a missing field is an error."""
    template = string.Template(_card_template(template_name))
    try:
        return template.substitute({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
    except KeyError as err:
        raise KeyError(f"model card {template_name!r} needs field {err.args[0]!r}") from None
