"""RAHF step 1a: Single-model Contrastive Instruction Tuning (SCIT), the paper's Eq. 1.

Each preference pair gives two examples: ``(p+, query, chosen)`` with ``p-`` as its opposite instruction, and
``(p-, query, rejected)`` with ``p+`` as its opposite. With ``P = log pi(r | p, q)`` (summed over the response
tokens) and ``P*`` the same response under the opposite instruction, the loss is

    L = -[ sft_weight * P + log( exp(P) / (exp(P) + exp(P*)) ) ] = -[ sft_weight * P + log sigmoid(P - P*) ]

averaged over the examples of a batch. ``P`` and ``P*`` are computed on two separately encoded sequences, each
with its own response mask, so the response tokens line up although ``p+`` and ``p-`` have different lengths.

Example:
    >>> from hf_repalign.rahf import SCITConfig, SCITTrainer
    >>> args = SCITConfig(output_dir="out/scit", per_device_train_batch_size=2, max_steps=10)
    >>> trainer = SCITTrainer(model, args, train_dataset=prefs, processing_class=tokenizer)
    >>> trainer.train()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
from transformers.utils import logging

from ..formats import encode_pair, to_triplet
from ..artifacts import PEFT_ADAPTER, TRANSFORMERS_MODEL, atomic_folder
from ..hub import require_base_model
from ..models import load_model_and_tokenizer, resolve_model_path
from .instructions import instructed_template
from .scit_config import SCITConfig
from .step1_card import hub_base, local_base, step1_base_id, write_step1_card
from .trainer_mixin import RAHFTrainerMixin, save_training_args, targets_embeddings
from .validation import check_lora_rank, require_finite_weights, require_rows, write_signature

logger = logging.get_logger(__name__)

SCIT_COLUMNS = ["input_ids", "prompt_length", "opposite_input_ids", "opposite_prompt_length"]


def scit_loss(
    logp: torch.Tensor, logp_opposite: torch.Tensor, sft_weight: float = 1.0, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-example SCIT loss (Eq. 1): ``-(sft_weight * P + log sigmoid(P - P*))``.

    ``label_smoothing = e`` mixes in the reversed direction: the contrastive term becomes
    ``(1 - e) * log sigmoid(P - P*) + e * log sigmoid(P* - P)`` (the authors' code uses e = 0.2).
    """
    margin = logp - logp_opposite
    contrast = (1.0 - label_smoothing) * F.logsigmoid(margin) + label_smoothing * F.logsigmoid(-margin)
    return -(sft_weight * logp + contrast)


def response_logps(logits: torch.Tensor, labels: torch.Tensor, length_normalize: bool = False) -> torch.Tensor:
    """Log-likelihood of the labelled tokens of each row (labels ``-100`` elsewhere), summed or averaged."""
    targets = labels[:, 1:]
    token_logps = -F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets.clamp(min=0), reduction="none"
    )
    mask = (targets != -100).to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_normalize else total


def truncate_pairs(
    pairs: list[tuple[list[int], int]], max_prompt_length: int | None, max_length: int | None
) -> tuple[list[tuple[list[int], int]] | None, bool]:
    """Sequences sharing one response: cut the response so that the longest prompt plus the response fits
    ``max_length`` (the response stays identical in all).

    Returns ``(None, True)`` when a prompt is longer than ``max_prompt_length`` or leaves no room for a single
    response token. Prompts are never cut: the instruction sits at their start, and cutting from the left would drop
    it (the stimuli would then no longer contrast); the authors also filter long prompts out."""
    prompts = [ids[:n] for ids, n in pairs]
    response = pairs[0][0][pairs[0][1]:]
    if max_prompt_length is not None and any(len(p) > max_prompt_length for p in prompts):
        return None, True
    cut = False
    longest = max(len(p) for p in prompts)
    if max_length is not None and longest + len(response) > max_length:
        keep = max_length - longest
        if keep < 1:
            return None, True
        response, cut = response[:keep], True
    return [(p + response, len(p)) for p in prompts], cut


def warn_skipped_rows(method: str, skipped: list[int], why: str) -> None:
    """One warning that counts and names the rows a method skipped (the first ten)."""
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        logger.warning(f"{method}: skipped {len(skipped)} row(s) {why} (rows {shown}).")


def build_scit_examples(
    rows: dict[str, list], indices: list[int], tokenizer: Any, args: SCITConfig
) -> dict[str, list]:
    """Batched ``datasets.map`` function: each preference row -> two SCIT examples (see module docstring)."""
    positive = instructed_template(tokenizer, args.preferred_instruction, args.prompt_format)
    negative = instructed_template(tokenizer, args.dispreferred_instruction, args.prompt_format)
    out: dict[str, list] = {name: [] for name in SCIT_COLUMNS}
    truncated, skipped = 0, []
    names = list(rows)
    for j, row_index in enumerate(indices):
        triplet = to_triplet({name: rows[name][j] for name in names}, row_index)
        for response, own, opposite in ((triplet.chosen, positive, negative), (triplet.rejected, negative, positive)):
            encoded = [encode_pair(tokenizer, triplet.prompt, response, template) for template in (own, opposite)]
            if encoded[0][0][encoded[0][1]:] != encoded[1][0][encoded[1][1]:]:
                raise ValueError(
                    f"row {row_index}: the response tokenizes differently under the two instructions; use a "
                    "prompt_format whose prompt ends on a token boundary."
                )
            kept, cut = truncate_pairs(encoded, args.max_prompt_length, args.max_length)
            if kept is None:
                skipped += [row_index] if row_index not in skipped else []
                continue
            ((ids, n), (opp_ids, opp_n)), truncated = kept, truncated + cut
            out["input_ids"].append(ids)
            out["prompt_length"].append(n)
            out["opposite_input_ids"].append(opp_ids)
            out["opposite_prompt_length"].append(opp_n)
    if truncated:
        logger.warning(f"SCIT: cut the response of {truncated} sequence(s) to max_length={args.max_length}.")
    warn_skipped_rows("SCIT", skipped, f"whose instructed prompt is longer than max_prompt_length="
                      f"{args.max_prompt_length} or leaves no room for the response under "
                      f"max_length={args.max_length}; raise them to keep these rows")
    return out


def prepare_preference_dataset(dataset: Any, function, columns: list[str], **fn_kwargs) -> Any:
    """Map a preference dataset (``Dataset`` or list of rows) with ``function`` unless already tokenized.

    A list of already tokenized rows is returned as is (no ``datasets`` needed).
    """
    if isinstance(dataset, list):
        if dataset and all(name in dataset[0] for name in columns):
            return dataset
        from datasets import Dataset

        dataset = Dataset.from_list(dataset)
    if all(name in dataset.column_names for name in columns):
        return dataset
    return dataset.map(
        function, batched=True, with_indices=True, remove_columns=dataset.column_names, fn_kwargs=fn_kwargs,
        desc="Tokenizing preference pairs",
    )


def pad_with_response_labels(sequences: list[tuple[list[int], int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``(ids, n_prompt)`` pairs -> right-padded ``input_ids``, ``attention_mask`` and ``labels`` (the response
    tokens; ``-100`` on the prompt and the padding), ready for :func:`response_logps`."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (ids, n_prompt) in enumerate(sequences):
        ids = torch.as_tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = ids[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class SCITCollator:
    """Pads own and opposite sequences (right padding) into one ``(2B, T)`` batch with response-only labels."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [(f["input_ids"], f["prompt_length"]) for f in features]
        sequences += [(f["opposite_input_ids"], f["opposite_prompt_length"]) for f in features]
        return pad_with_response_labels(sequences, self.pad_token_id)


def seed_before_init(args: TrainingArguments) -> None:
    """Seed as ``Trainer.__init__`` will, before a fresh adapter is built outside it, so ``seed`` covers its init."""
    from transformers.trainer_utils import enable_full_determinism, set_seed

    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)


def load_causal_lm(model: Any, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """A model (or path / Hub id) and its tokenizer, with a pad token."""
    if isinstance(model, (str, os.PathLike)) and tokenizer is not None:  # a model folder needs no tokenizer then
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(str(model)))
    elif isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model_and_tokenizer(str(model))
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def prepare_train_eval(train_dataset: Any, eval_dataset: Any, build, columns, tokenizer: Any, args: Any):
    """``prepare_preference_dataset`` on the train set and on the eval set (or each set of an eval dict)."""

    def prepare(data):
        return None if data is None else prepare_preference_dataset(
            data, build, columns, tokenizer=tokenizer, args=args
        )

    if isinstance(eval_dataset, dict):
        return prepare(train_dataset), {name: prepare(data) for name, data in eval_dataset.items()}
    return prepare(train_dataset), prepare(eval_dataset)


class SCITTrainer(RAHFTrainerMixin, Trainer):
    """A ``Trainer`` for SCIT. Pass ``peft_config`` to train a LoRA instead of all weights.

    Logged metrics: ``logps/own``, ``logps/opposite`` and ``accuracy`` (share of examples with ``P > P*``).
    """

    _tag_names = ["hf_repalign", "rahf", "scit"]

    def __init__(
        self,
        model: nn.Module | str,
        args: SCITConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        **kwargs,
    ):
        args = args or SCITConfig(output_dir="scit_output")
        if not isinstance(args, SCITConfig):
            raise TypeError(f"args must be an SCITConfig, got {type(args).__name__}.")
        require_rows(train_dataset, "SCIT")
        model, tokenizer = load_causal_lm(model, processing_class)
        if peft_config is not None:
            from peft import get_peft_model

            check_lora_rank(model, peft_config)
            seed_before_init(args)
            model = get_peft_model(model, peft_config)
        train_dataset, eval_dataset = prepare_train_eval(
            train_dataset, eval_dataset, build_scit_examples, SCIT_COLUMNS, tokenizer, args
        )
        if train_dataset is not None and len(train_dataset) == 0:
            raise ValueError(f"SCIT: no training example left: rows whose instructed prompt is longer than "
                             f"max_prompt_length={args.max_prompt_length} or leaves no room for the response under "
                             f"max_length={args.max_length} are skipped (see the warning above).")
        kwargs.setdefault("data_collator", SCITCollator(tokenizer.pad_token_id))
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=tokenizer, **kwargs,
        )
        self._setup_mixin()

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(SCIT_COLUMNS)

    # ---- saving: Hub-ready (Hub-id base, tokenizer, card), atomic, no pickle ----

    def base_model_id(self) -> str | None:
        """The base model's Hub id: ``args.base_model``, else the one known for the model (None for a local one)."""
        return step1_base_id(self.accelerator.unwrap_model(self.model), self.args.base_model)

    def _write(self, folder: Path, repo_id: str, base: str | None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        require_finite_weights(model, "SCIT model")
        if hasattr(model, "peft_config"):
            with hub_base(model, base):  # peft's "auto" embedding check would ask the Hub about that base
                model.save_pretrained(str(folder), state_dict=state_dict, save_embedding_layers=targets_embeddings(
                    model.peft_config[model.active_adapter]))
            self.processing_class.save_pretrained(str(folder))
        else:
            Trainer._save(self, str(folder), state_dict)  # weights, config, tokenizer
        save_training_args(self.args, folder)
        if hasattr(model, "peft_config"):  # an adapter: record its base
            write_signature(folder, model)
        write_step1_card(folder, "SCIT", model, self.args, repo_id, base, self.state.global_step)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:  # only here for the collectives of a sharded save
            return Trainer._save(self, output_dir, state_dict)
        self.save_pretrained(output_dir, state_dict=state_dict)

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False,
                        state_dict: dict | None = None) -> Path:
        """Write the model (an adapter or full weights), tokenizer, ``training_args.json`` and card into
        ``save_directory`` as one atomic save that keeps the folder's other files; a folder holding something else
        is refused unless ``overwrite=True``. ``save_model()`` does the same into ``args.output_dir``."""
        kind = PEFT_ADAPTER if hasattr(self.accelerator.unwrap_model(self.model), "peft_config") else TRANSFORMERS_MODEL
        with atomic_folder(save_directory, kind, overwrite) as tmp:
            self._write(tmp, str(Path(save_directory).absolute()), self.base_model_id(), state_dict)
        return Path(save_directory)

    def _push_folder(self, folder: Path, repo_id: str) -> None:
        """Write what ``push_to_hub`` uploads into the empty ``folder``: the model with its Hub-id base."""
        model = self.accelerator.unwrap_model(self.model)
        base = require_base_model(self.args.base_model, self.base_model_id() or local_base(model), "SCIT model")
        if self.args.should_save:
            self._write(folder, repo_id, base)

    def _logps(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        logps = response_logps(logits, inputs["labels"], self.args.length_normalize)
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]

    def _count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0] // 2)  # one loss term per example (own + opposite rows)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        own, opposite = self._logps(model, inputs)
        losses = scit_loss(own, opposite, self.args.sft_weight, self.args.label_smoothing)
        self._record(model, **{"logps/own": own.mean(), "logps/opposite": opposite.mean(),
                               "accuracy": (own > opposite).float().mean()})
        divisor = self._items_divisor(num_items_in_batch)
        loss = losses.mean() if divisor is None else losses.sum() / divisor
        return (loss, torch.stack([own, opposite], dim=1)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, logps = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), logps.detach(), torch.zeros(logps.shape[0], device=logps.device)
