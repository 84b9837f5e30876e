"""Batched embeddings of (prompt, response) pairs, shared by vector fitting and the margin pipeline.

A preference triplet becomes two token sequences, ``prompt + chosen`` and ``prompt + rejected``, stored compactly
(int32 ids plus lengths; ``annotate`` encodes a whole shard up front so bad rows fail before any forward). Batches
build the attention and response masks, and stack both sides into one forward that stops at the requested layer.

Example:
    >>> from hf_repalign.legend.embedding import encode_triplet, pair_embeddings
    >>> item, truncated = encode_triplet(tokenizer, triplet)
    >>> chosen, rejected = pair_embeddings(model, item, layer=-1, pooling="last")  # (1, H) each
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.pipelines.base import pad_collate_fn

from ..formats import PreferenceFormatError, PreferenceTriplet, Template, encode_many
from ..hidden import hidden_states_at, pool_last, pool_mean, resolve_layers

POOLINGS = ("last", "mean")
TRUNCATIONS = ("error", "left")
SIDES = ("chosen", "rejected")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}.")
    return pooling


def _fit_length(ids: list[int], n_prompt: int, max_length: int | None, truncation: str, where: str):
    """Cut the prompt from the left so the sequence fits ``max_length``; returns (ids, n_prompt, truncated)."""
    if max_length is None or len(ids) <= max_length:
        return ids, n_prompt, False
    if truncation not in TRUNCATIONS:
        raise ValueError(f"`truncation` must be one of {TRUNCATIONS}, got {truncation!r}.")
    if truncation == "error":
        raise PreferenceFormatError(
            f"{where}: {len(ids)} tokens exceed max_length={max_length}; pass truncation='left' to cut the prompt "
            "from the left, or drop the row."
        )
    cut = len(ids) - max_length
    if cut >= n_prompt:
        raise PreferenceFormatError(
            f"{where}: the response alone has {len(ids) - n_prompt} tokens, more than max_length={max_length}; "
            "cutting the prompt cannot make it fit."
        )
    return ids[cut:], n_prompt - cut, True


def encode_triplet(
    tokenizer: Any,
    triplet: PreferenceTriplet,
    template: Template = None,
    max_length: int | None = None,
    truncation: str = "error",
    row: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Token tensors of both sides of a triplet and how many sides were truncated.

    Keys, for side in chosen/rejected: ``{side}_input_ids`` (``(1, T)`` int32), ``{side}_length`` and
    ``{side}_prompt_length`` (``(1,)``). Masks are built per batch from the lengths, so a whole encoded dataset
    costs 4 bytes a token.
    """
    return encode_triplets(tokenizer, [triplet], template, max_length, truncation, None if row is None else [row])[0]


def encode_triplets(
    tokenizer: Any,
    triplets: Sequence[PreferenceTriplet],
    template: Template = None,
    max_length: int | None = None,
    truncation: str = "error",
    rows: Sequence[int] | None = None,
) -> list[tuple[dict[str, torch.Tensor], int]]:
    """:func:`encode_triplet` over many triplets, tokenized in two batched calls; errors name ``rows[i]``."""
    groups = [(t.prompt, (t.chosen, t.rejected)) for t in triplets]
    encoded = []
    for i, (prompt_ids, responses) in enumerate(encode_many(tokenizer, groups, template, rows)):
        row = None if rows is None else rows[i]
        item: dict[str, torch.Tensor] = {}
        truncated = 0
        for side, response_ids in zip(SIDES, responses):
            where = f"row {row}, field `{side}`" if row is not None else f"field `{side}`"
            ids, n_prompt, cut = _fit_length(prompt_ids + response_ids, len(prompt_ids), max_length, truncation,
                                             where)
            truncated += int(cut)
            item[f"{side}_input_ids"] = torch.tensor([ids], dtype=torch.int32)
            item[f"{side}_length"] = torch.tensor([len(ids)])
            item[f"{side}_prompt_length"] = torch.tensor([n_prompt])
        encoded.append((item, truncated))
    return encoded


def item_length(item: dict[str, torch.Tensor]) -> int:
    return max(item[f"{side}_input_ids"].shape[1] for side in SIDES)


def _padded_side(batch: dict[str, torch.Tensor], side: str, width: int, padding_side: str):
    """``(input_ids, attention_mask, response_mask)`` of one side, ``(B, width)``, padded on ``padding_side``.

    ``{side}_input_ids`` may already be padded (by the pipeline's collator, on the same side) to any width up to
    ``width``; the real tokens are located from ``{side}_length``.
    """
    ids = batch[f"{side}_input_ids"]
    lengths = batch[f"{side}_length"].reshape(-1, 1).to(ids.device)
    prompt = batch[f"{side}_prompt_length"].reshape(-1, 1).to(ids.device)
    extra = width - ids.shape[1]
    if extra:
        pad = ids.new_zeros((ids.shape[0], extra))
        ids = torch.cat([pad, ids] if padding_side == "left" else [ids, pad], dim=1)
    positions = torch.arange(width, device=ids.device).unsqueeze(0)
    start = width - lengths if padding_side == "left" else torch.zeros_like(lengths)
    offset = positions - start  # position within the sequence; < 0 or >= length is padding
    attention = (offset >= 0) & (offset < lengths)
    response = attention & (offset >= prompt)
    return ids.long(), attention.long(), response.long()


def pair_embeddings(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    layer: int = -1,
    pooling: str = "last",
    padding_side: str = "left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(emb(prompt, chosen), emb(prompt, rejected))``, each ``(B, H)`` float32, from one stacked forward.

    The embedding is the hidden state at ``layer`` (``output_hidden_states`` index) at the last non-pad token
    (``pooling="last"``) or averaged over the response tokens (``"mean"``).
    """
    check_pooling(pooling)
    width = max(batch[f"{side}_input_ids"].shape[1] for side in SIDES)
    input_ids, attention_mask, response_mask = (
        torch.cat(parts) for parts in zip(*(_padded_side(batch, side, width, padding_side) for side in SIDES))
    )
    index = resolve_layers(model, layer)[0]
    hidden = hidden_states_at(model, input_ids, attention_mask, layers=[index])[index]
    if pooling == "last":
        pooled = pool_last(hidden, attention_mask)
    else:
        pooled = pool_mean(hidden, response_mask)
    chosen, rejected = pooled.float().chunk(2)
    return chosen, rejected


def length_sorted_batches(lengths: Sequence[int], batch_size: int, window: int | None = None) -> list[list[int]]:
    """Index batches: within each window of consecutive items, longest first, so batches pad little.

    Windows keep memory and ordering local (a checkpointed chunk stays a contiguous run of rows).
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    window = window or 64 * batch_size
    batches = []
    for start in range(0, len(lengths), window):
        indices = sorted(range(start, min(start + window, len(lengths))), key=lambda i: (-lengths[i], i))
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    return batches


def map_batches(
    items: Sequence[dict[str, torch.Tensor]],
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    tokenizer: Any,
    batch_size: int,
    window: int | None = None,
    progress: tqdm | None = None,
) -> torch.Tensor:
    """``fn`` over length-sorted padded batches of ``items``; rows of the result are back in input order."""
    collate = pad_collate_fn(tokenizer, None)
    results: list[torch.Tensor | None] = [None] * len(items)
    for indices in length_sorted_batches([item_length(item) for item in items], batch_size, window):
        batch = collate([items[i] for i in indices]) if len(indices) > 1 else items[indices[0]]
        out = fn(batch)
        for position, i in enumerate(indices):
            results[i] = out[position]
        if progress is not None:
            progress.update(len(indices))
    if not results:
        return torch.empty(0)
    return torch.stack(results)
