"""Difference vectors precomputed once to disk (sharded safetensors), for when the instructed models do not fit
in memory beside the model being trained.

Each example's vectors are stored at its valid response positions only, as ``(n_layers, r, H)`` under the key
``str(example_index)``; ``targets.json`` maps keys to shards and records the layers and the base model (id, depth,
width, vocabulary), which a trainer using the folder checks against its own base. The folder is written
atomically with ``artifacts.atomic_folder``: an interrupted precompute leaves the previous targets or none, never a
partial set, and other files in the folder are kept.

Example:
    >>> trainer.precompute_targets("out/targets")          # with the instructed model(s) loaded
    >>> args = RAHFConfig(..., precomputed_targets="out/targets")   # later, without them
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..artifacts import ArtifactKind, atomic_folder
from .validation import SIGNATURE_FILE, check_signature

INDEX_NAME = "targets.json"
_SHARD = re.compile(r"targets-\d{5}\.safetensors")
TARGETS = ArtifactKind("RAHF precomputed targets", (INDEX_NAME, "targets-*.safetensors", SIGNATURE_FILE),
                       lambda folder: (folder / INDEX_NAME).is_file())


def write_targets(
    directory: str | os.PathLike, items: Iterable[tuple[int, torch.Tensor]], layers: list[int], shard_size: int = 1024,
    base: dict[str, Any] | None = None,
) -> Path:
    """Write ``(example_index, (n_layers, r, H) tensor)`` pairs into shards of ``shard_size`` examples; ``base`` is
    the signature of the model they were computed with (``validation.base_signature``)."""
    directory = Path(directory)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    names: list[str] = []
    with atomic_folder(directory, TARGETS) as tmp:

        def flush():
            if shard:
                name = f"targets-{len(names):05d}.safetensors"
                save_file(shard, str(tmp / name))
                names.append(name)
                weight_map.update({key: name for key in shard})
                shard.clear()

        for index, tensor in items:
            shard[str(int(index))] = tensor.detach().contiguous().cpu()
            if len(shard) >= shard_size:
                flush()
        flush()
        index = {"layers": list(layers), "base": base, "num_examples": len(weight_map), "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return directory


class TargetStore:
    """Reads vectors written by :func:`write_targets` and places them into batch-shaped tensors."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not (self.directory / INDEX_NAME).is_file():
            raise FileNotFoundError(f"{self.directory} has no {INDEX_NAME}; write it with precompute_targets().")
        try:
            index = json.loads((self.directory / INDEX_NAME).read_text(encoding="utf-8"))
        except ValueError:
            index = None
        # The shard names are read from the folder: only ours, so none can point outside it.
        if not (isinstance(index, dict) and isinstance(index.get("layers"), list)
                and isinstance(index.get("weight_map"), dict)
                and all(isinstance(v, str) and _SHARD.fullmatch(v) for v in index["weight_map"].values())):
            raise ValueError(f"{self.directory / INDEX_NAME} is not an index written by precompute_targets(); write "
                             "the targets again with precompute_targets().")
        self.layers: list[int] = index["layers"]
        self.base: dict[str, Any] | None = index.get("base")
        self.weight_map: dict[str, str] = index["weight_map"]
        self._handles: dict[str, object] = {}

    def check(self, layers: list[int], model: Any) -> None:
        """Refuse targets made for other layers or another base (depth, width, vocabulary; see ``validation``)."""
        if self.layers != list(layers):
            raise ValueError(f"precomputed targets at {self.directory} are for layers {self.layers}, training uses "
                             f"{list(layers)}.")
        check_signature(self.base, model, f"precomputed targets at {self.directory}")

    def get(self, example_index: int) -> torch.Tensor:
        key = str(int(example_index))
        if key not in self.weight_map:
            raise KeyError(f"example {key} is not in the precomputed targets at {self.directory}; they were made "
                           "for a different dataset.")
        shard = self.weight_map[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def batch(self, example_indices: torch.Tensor, response_mask: torch.Tensor, hidden_size: int,
              dtype: torch.dtype) -> torch.Tensor:
        """(n_layers, B, T, H) with each example's vectors at its valid response positions, zeros elsewhere."""
        n, (b, t) = len(self.layers), response_mask.shape
        out = torch.zeros((n, b, t, hidden_size), dtype=dtype, device=response_mask.device)
        for row, index in enumerate(example_indices.tolist()):
            stored = self.get(index)
            if stored.shape[-1] != hidden_size:
                raise ValueError(f"example {index}: precomputed vectors have hidden size {stored.shape[-1]}, the "
                                 f"model {hidden_size}; they were made for another base model.")
            positions = response_mask[row].nonzero().squeeze(-1)
            if stored.shape[1] != len(positions):
                raise ValueError(f"example {index}: {stored.shape[1]} stored positions but {len(positions)} in the "
                                 "batch; precompute with the same max_response_tokens and tokenizer.")
            out[:, row, positions] = stored.to(device=out.device, dtype=dtype)
        return out
