"""Batched embeddings of (prompt, response) pairs, shared by vector fitting and the margin pipeline.

A preference triplet becomes two token sequences, ``prompt + chosen`` and ``prompt + rejected``, stored compactly
(int32 ids plus three lengths: the whole sequence, the prompt, and the end of the response text before the
template's closing tokens). ``annotate`` encodes a whole chunk up front so bad rows fail before any forward.

Forwards run on *sequences*, not pairs: every side is sorted by its own length, batched, right-padded and run
without an attention mask. That is exact for a causal model (a real token never attends to the padding after it,
and positions count from 0 either way) and lets SDPA use its fused causal kernel instead of a masked one.

Poolings (``emb(prompt, response)``):

- ``"last"`` (default, the authors'): the hidden state at the last token of the response text itself;
- ``"mean"``: the mean over the response text's tokens;
- ``"mean_all"`` (the authors' mean): the mean over every token of prompt + response text;
- ``"last_rendered"``: the last token of the whole rendered text, i.e. the template's closing token (``"\\n"``
  after ``<|im_end|>`` for ChatML); what ``"last"`` meant before version 0.2, kept for old vectors.

Example:
    >>> from hf_repalign.legend.embedding import encode_triplets, embed_pairs
    >>> items = [item for item, _ in encode_triplets(tokenizer, triplets)]
    >>> out = embed_pairs(model, items, views=[(-1, "last")], batch_size=8)  # {(-1, "last"): (N, 2, H)}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..formats import PreferenceFormatError, PreferenceTriplet, Template, encode_spans, normalize_triplet
from ..hidden import hidden_states_at, resolve_layers
from .presets import POOLINGS

TRUNCATIONS = ("error", "left")
SIDES = ("chosen", "rejected")
# Bump when the text or the pooling of an embedding changes, so checkpoints of older runs are not mixed in.
EMBEDDING_VERSION = 2

View = tuple[int, str]  # (hidden-state index, pooling)


def check_causal(model: torch.nn.Module) -> torch.nn.Module:
    """Refuse an encoder-decoder (T5, BART): its hidden states would be the encoder's, which never reads a response
    the way LEGEND's embeddings do, and the right-padded unmasked batching is exact only for a causal model."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"LEGEND needs a decoder-only (causal) language model; {type(model).__name__} is an encoder-decoder "
            f"({getattr(config, 'model_type', '?')}), whose hidden states are not what the margins are defined on."
        )
    return model


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

    Keys, for side in chosen/rejected: ``{side}_input_ids`` (``(1, T)`` int32), ``{side}_length``,
    ``{side}_prompt_length`` and ``{side}_response_end`` (``(1,)``; the response text is
    ``[prompt_length, response_end)``, the template tail ``[response_end, length)``). Whitespace is normalised
    first (:func:`hf_repalign.formats.normalize_triplet`).
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
    """:func:`encode_triplet` over many triplets, tokenized in three batched calls; errors name ``rows[i]``."""
    triplets = [normalize_triplet(t) for t in triplets]
    groups = [(t.prompt, (t.chosen, t.rejected)) for t in triplets]
    encoded = []
    for i, (prompt_ids, responses) in enumerate(encode_spans(tokenizer, groups, template, rows)):
        row = None if rows is None else rows[i]
        item: dict[str, torch.Tensor] = {}
        truncated = 0
        for side, (body_ids, tail_ids) in zip(SIDES, responses):
            where = f"row {row}, field `{side}`" if row is not None else f"field `{side}`"
            if not body_ids:
                raise PreferenceFormatError(f"{where}: the response has no tokens.")
            ids, n_prompt, cut = _fit_length(prompt_ids + body_ids + tail_ids, len(prompt_ids), max_length,
                                             truncation, where)
            truncated += int(cut)
            item[f"{side}_input_ids"] = torch.tensor([ids], dtype=torch.int32)
            item[f"{side}_length"] = torch.tensor([len(ids)])
            item[f"{side}_prompt_length"] = torch.tensor([n_prompt])
            item[f"{side}_response_end"] = torch.tensor([len(ids) - len(tail_ids)])
        encoded.append((item, truncated))
    return encoded


def response_length(item: dict[str, torch.Tensor], side: str) -> int:
    """Tokens of the response text of one side (template tail excluded)."""
    return int(item[f"{side}_response_end"].reshape(-1)[0] - item[f"{side}_prompt_length"].reshape(-1)[0])


def pooling_span(pooling: str, length: int, prompt_length: int, response_end: int) -> tuple[int, int]:
    """``[start, stop)`` of the positions averaged by ``pooling`` (a single position for the "last" kinds)."""
    if pooling == "last":
        return response_end - 1, response_end
    if pooling == "mean":
        return prompt_length, response_end
    if pooling == "mean_all":
        return 0, response_end
    if pooling == "last_rendered":
        return length - 1, length
    raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}.")


def _sequences(batch: dict[str, torch.Tensor], side: str, padding_side: str) -> list[tuple]:
    """The real (unpadded) sequences of one side of a batch that may have been padded on ``padding_side``."""
    ids = batch[f"{side}_input_ids"]
    lengths = batch[f"{side}_length"].reshape(-1).tolist()
    prompts = batch[f"{side}_prompt_length"].reshape(-1).tolist()
    ends = batch[f"{side}_response_end"].reshape(-1).tolist()
    out = []
    for b, (n, p, e) in enumerate(zip(lengths, prompts, ends)):
        row = ids[b, ids.shape[1] - n:] if padding_side == "left" else ids[b, :n]
        out.append((row, n, p, e))
    return out


def embed_sequences(
    model: torch.nn.Module, sequences: Sequence[tuple], views: Sequence[View]
) -> dict[View, torch.Tensor]:
    """``{(layer, pooling): (B, H) float32}`` for sequences ``(ids, length, prompt_length, response_end)``.

    One forward: right padding, no attention mask (exact for a causal model, see the module docstring).
    """
    width = max(s[1] for s in sequences)
    device = model.device
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, (ids, n, _, _) in enumerate(sequences):
        input_ids[b, :n] = ids[:n]
    layers = sorted({index for index, _ in views})
    hidden = hidden_states_at(model, input_ids.to(device), torch.ones_like(input_ids, device=device), layers=layers)
    out = {}
    for index, pooling in views:
        weights = torch.zeros((len(sequences), width), dtype=torch.float32)
        for b, (_, n, p, e) in enumerate(sequences):
            start, stop = pooling_span(pooling, n, p, e)
            weights[b, start:stop] = 1.0 / (stop - start)
        states = hidden[index].float()
        out[(index, pooling)] = torch.einsum("bt,bth->bh", weights.to(states.device), states)
    return out


def resolve_views(model: torch.nn.Module, views: Sequence[View]) -> list[View]:
    """Views with layers as non-negative hidden-state indices, poolings checked; order and duplicates kept."""
    return [(resolve_layers(model, layer)[0], check_pooling(pooling)) for layer, pooling in views]


def pair_embeddings(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    layer: int = -1,
    pooling: str = "last",
    padding_side: str = "left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(emb(prompt, chosen), emb(prompt, rejected))``, each ``(B, H)`` float32, from one forward of all sides.

    ``batch`` holds encoded pairs, possibly padded (by the pipeline's collator) on ``padding_side``.
    """
    view = resolve_views(model, [(layer, pooling)])[0]
    sequences = _sequences(batch, "chosen", padding_side) + _sequences(batch, "rejected", padding_side)
    pooled = embed_sequences(model, sequences, [view])[view]
    chosen, rejected = pooled.chunk(2)
    return chosen, rejected


MAX_PADDING = 0.1  # share of padded positions a batch may hold
# Positions (padding included) per forward on a CPU: there batching saves little compute, and a batch whose
# activations outgrow the caches is slower than the same sequences one by one (benchmarks/legend_cpu_throughput.py:
# the tiny model ran 0.8x the one-pair loop at 32 sequences of ~450 tokens a forward, 1.3x at 4).
CPU_BATCH_TOKENS = 2048


def sequence_batches(lengths: Sequence[int], batch_size: int, window: int | None = None,
                     max_padding: float = MAX_PADDING, max_tokens: int | None = None) -> list[list[int]]:
    """Index batches of at most ``batch_size`` sequences, longest first within each window of consecutive items.

    A batch also stops growing once more than ``max_padding`` of its positions would be padding (a padded position
    costs as much as a real one; with thousands of rows the batches are full anyway), or once it would hold more
    than ``max_tokens`` positions (a sequence longer than that runs alone). Windows keep memory and ordering local.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    window = window or len(lengths) or 1
    batches = []
    for start in range(0, len(lengths), window):
        indices = sorted(range(start, min(start + window, len(lengths))), key=lambda i: (-lengths[i], i))
        batch: list[int] = []
        real = 0
        for i in indices:
            width = lengths[batch[0]] if batch else lengths[i]
            grown = width * (len(batch) + 1)
            if batch and (len(batch) == batch_size or 1 - (real + lengths[i]) / grown > max_padding
                          or (max_tokens is not None and grown > max_tokens)):
                batches.append(batch)
                batch, real = [], 0
            batch.append(i)
            real += lengths[i]
        if batch:
            batches.append(batch)
    return batches


def embed_pairs(
    model: torch.nn.Module,
    items: Sequence[dict[str, torch.Tensor]],
    views: Sequence[View],
    batch_size: int = 8,
    window: int | None = None,
    progress: tqdm | None = None,
    forward=None,
    max_batch_tokens: int | None = None,
) -> dict[View, torch.Tensor]:
    """``{view: (N, 2, H)}``: both sides' embeddings of every encoded pair, in input order.

    ``batch_size`` counts pairs: a forward takes up to ``2 * batch_size`` sequences of similar length (each side is
    sorted by its own length, within windows of ``window`` pairs; see :func:`sequence_batches`). ``forward(sequences, views)`` replaces
    :func:`embed_sequences` (the pipeline passes its own, which runs under its device and inference context).
    ``views`` use the layers given (negative indices allowed); the result is keyed by them as given.
    ``max_batch_tokens`` caps the positions of one forward; by default :data:`CPU_BATCH_TOKENS` on a CPU, no cap on
    an accelerator (where bigger batches are what makes it fast).
    """
    if max_batch_tokens is None and model.device.type == "cpu":
        max_batch_tokens = CPU_BATCH_TOKENS
    resolved = resolve_views(model, views)
    forward = forward or (lambda seqs, vs: embed_sequences(model, seqs, vs))
    sequences = [seq for item in items for side in SIDES for seq in _sequences(item, side, "right")]
    # A sequence that occurs more than once (a shared refusal, duplicated rows) is embedded once, so equal inputs
    # get bit-identical embeddings whatever else shares their batches.
    first: dict[tuple, int] = {}
    copies: dict[int, list[int]] = {}
    for i, (ids, n, p, e) in enumerate(sequences):
        copies.setdefault(first.setdefault((ids[:n].numpy().tobytes(), n, p, e), i), []).append(i)
    unique = list(copies)
    results: dict[View, torch.Tensor | None] = {view: None for view in views}
    done = [0] * len(items)
    window_sequences = 2 * window if window else None
    for batch in sequence_batches([sequences[i][1] for i in unique], 2 * batch_size, window_sequences,
                                  max_tokens=max_batch_tokens):
        out = forward([sequences[unique[j]] for j in batch], resolved)
        owners = [copies[unique[j]] for j in batch]
        rows = [k for group in owners for k in group]
        repeat = torch.tensor([len(group) for group in owners])
        for view, key in zip(views, resolved):
            if results[view] is None:
                results[view] = torch.empty((len(items), 2, out[key].shape[-1]), dtype=torch.float32)
            results[view][[i // 2 for i in rows], [i % 2 for i in rows]] = out[key].cpu().repeat_interleave(repeat, 0)
        if progress is not None:
            finished = 0
            for i in rows:
                done[i // 2] += 1
                finished += done[i // 2] == 2
            progress.update(finished)
    return {view: (value if value is not None else torch.empty((0, 2, 0))) for view, value in results.items()}
