"""RAHF step 2: train a fresh LoRA so the target layers' activity moves along the preference direction.

With ``A_base`` the hidden states of the model with the adapter disabled and ``v = A(p+) - A(p-)`` the
difference vectors of the instructed model(s) (see ``patterns``), the loss over the target layers and valid
response positions is

    L = mean_{l, t valid} || A_lora,l,t - (A_base,l,t + alpha * v_l,t) ||_2      (loss_type="l2", the default)
    L = mean_{l, t valid, h} (A_lora - (A_base + alpha * v))^2                   (loss_type="mse")

Targets are computed on the fly under ``no_grad`` from the same base weights (adapter disabled / instructed
adapters switched in), and every forward stops after the highest target layer.

Example:
    >>> from hf_repalign.rahf import RAHFConfig, RAHFTrainer
    >>> args = RAHFConfig(output_dir="out/rahf", method="scit", max_steps=100)
    >>> trainer = RAHFTrainer(base_model, args, train_dataset=prefs, processing_class=tokenizer,
    ...                       instructed="out/scit")        # an adapter folder, a model folder or a model
    >>> trainer.train(); trainer.save_pretrained("out/rahf-adapter")
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, Trainer
from transformers.utils import logging

from ..formats import encode_pair, to_triplet
from ..hidden import num_hidden_layers
from ..artifacts import PEFT_ADAPTER, TRANSFORMERS_MODEL, atomic_folder
from ..cards import base_model_fields, render_card
from ..hub import base_model_id, is_repo_id, require_base_model
from .export import SAVE_AS, combined_lora, merged_model
from .instructions import instructed_template
from .patterns import (
    AdapterSwitch,
    activity_patterns,
    align_stimuli,
    difference_vectors,
    target_layers,
)
from .rahf_config import RAHFConfig
from .scit import load_causal_lm, prepare_train_eval, seed_before_init, warn_skipped_rows
from .store import TargetStore, write_targets
from .trainer_mixin import RAHFTrainerMixin, save_training_args, targets_embeddings
from .validation import (
    base_signature,
    check_adapter_folder,
    check_lora_rank,
    require_rows,
    require_finite_weights,
    write_signature,
)

logger = logging.get_logger(__name__)

RAHF_COLUMNS = ["prompt_ids", "positive_prompt_ids", "negative_prompt_ids", "response_ids", "example_index"]
ADAPTER = "default"  # the trained adapter; Trainer's checkpoint/resume code expects this name


def rahf_loss(
    lora: torch.Tensor, base: torch.Tensor, difference: torch.Tensor, mask: torch.Tensor,
    alpha: float = 5.0, loss_type: str = "l2", num_items: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """RAHF's representation loss on stacked (n_layers, B, T, H) states; ``mask`` (B, T) marks valid positions.

    ``"l2"``: the mean over layers and valid positions of ``||lora - (base + alpha * difference)||_2``;
    ``"mse"``: the mean squared error over the same positions (and the hidden dimension). Masked positions never
    enter the mean; with no valid position the loss is 0. ``num_items`` replaces the count of valid entries as the
    divisor (gradient accumulation: the count over all micro-batches of the step).
    """
    error = (lora - (base + alpha * difference)).float()
    if loss_type == "l2":
        per_position = error.norm(dim=-1)
    elif loss_type == "mse":
        per_position = error.pow(2).mean(dim=-1)
    else:
        raise ValueError(f"loss_type must be 'l2' or 'mse', got {loss_type!r}.")
    valid = mask.bool().unsqueeze(0).expand_as(per_position)
    per_position = torch.where(valid, per_position, torch.zeros_like(per_position))
    return per_position.sum() / (valid.sum().clamp(min=1) if num_items is None else num_items)


def stimulus_sides(choice: str, row_index: int, seed: int) -> list[str]:
    """The response(s) of a pair the stimuli use; ``"random"`` draws one per row from ``(seed, row_index)`` alone, so
    the draw is the same however ``datasets.map`` batches the rows (and for precomputed targets)."""
    if choice == "both":
        return ["chosen", "rejected"]
    if choice == "random":
        return ["rejected" if random.Random(f"{seed}:{row_index}").random() < 0.5 else "chosen"]
    return [choice]


def build_rahf_examples(rows: dict[str, list], indices: list[int], tokenizer: Any, args: RAHFConfig) -> dict:
    """Batched ``datasets.map`` function: a preference row -> stimuli (target, p+, p-) sharing one response."""
    templates = [instructed_template(tokenizer, instruction, args.prompt_format) for instruction in
                 (args.target_instruction, args.preferred_instruction, args.dispreferred_instruction)]
    out: dict[str, list] = {name: [] for name in RAHF_COLUMNS}
    names, skipped = list(rows), []
    for j, row_index in enumerate(indices):
        triplet = to_triplet({name: rows[name][j] for name in names}, row_index)
        for k, side in enumerate(stimulus_sides(args.stimulus_response, row_index, args.seed)):
            encoded = [encode_pair(tokenizer, triplet.prompt, getattr(triplet, side), t) for t in templates]
            responses = [ids[n:] for ids, n in encoded]
            if any(r != responses[0] for r in responses):
                raise ValueError(f"row {row_index}: the response tokenizes differently under the instructions; "
                                 "use a prompt_format whose prompt ends on a token boundary.")
            # Cutting a prompt from the left would drop the instruction at its start, and with it the contrast of
            # the stimuli; the authors filter long prompts out too.
            if any(n > args.max_prompt_length for _, n in encoded):
                skipped += [row_index] if row_index not in skipped else []
                continue
            for name, (ids, n) in zip(RAHF_COLUMNS[:3], encoded):
                out[name].append(ids[:n])
            out["response_ids"].append(responses[0][: args.max_response_tokens])
            out["example_index"].append(row_index * 2 + k if args.stimulus_response == "both" else row_index)
    warn_skipped_rows("RAHF", skipped, f"whose instructed prompt is longer than max_prompt_length="
                      f"{args.max_prompt_length} tokens; raise it to keep these rows")
    return out


@dataclass
class RAHFCollator:
    """Aligns the target, p+ and p- stimuli of a batch to one prompt width and one response width."""

    pad_token_id: int
    max_prompt_length: int
    max_response_tokens: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keys = {"": "prompt_ids", "positive_": "positive_prompt_ids", "negative_": "negative_prompt_ids"}
        width = max(len(f[key]) for f in features for key in keys.values())
        if width > self.max_prompt_length:  # only pre-tokenized rows get here: build_rahf_examples skips them
            rows = sorted({f["example_index"] for f in features for key in keys.values()
                           if len(f[key]) > self.max_prompt_length})
            raise ValueError(f"RAHF: example(s) {rows} have a prompt longer than max_prompt_length="
                             f"{self.max_prompt_length}; cutting it would drop the instruction at its start.")
        responses = [f["response_ids"] for f in features]
        response_width = min(max(len(r) for r in responses), self.max_response_tokens)
        batch: dict[str, torch.Tensor] = {}
        for prefix, key in keys.items():
            aligned = align_stimuli([f[key] for f in features], responses, self.pad_token_id,
                                    self.max_response_tokens, width, response_width)
            batch[f"{prefix}input_ids"] = aligned["input_ids"]
            batch[f"{prefix}attention_mask"] = aligned["attention_mask"]
        batch["response_mask"] = aligned["response_mask"]
        batch["example_index"] = torch.tensor([f["example_index"] for f in features], dtype=torch.long)
        return batch


def _hidden_forward(self, *args, rahf_layers=None, **kwargs):
    """Instance ``forward`` of the trained PEFT model: with ``rahf_layers`` it returns the stacked hidden states.

    Going through ``model(...)`` (not the inner decoder) keeps DDP's gradient synchronisation; the early exit
    happens inside, so DDP sees a normal return.
    """
    if rahf_layers is None:
        return type(self).forward(self, *args, **kwargs)
    return activity_patterns(self, kwargs["input_ids"], kwargs["attention_mask"], rahf_layers)


class _Source:
    """Where activity patterns come from: adapters of the trained PEFT model (``[]``: the bare base), or a separate
    model."""

    def __init__(self, adapters: list[str] | None = None, model: nn.Module | None = None, path: str | None = None):
        self.adapters, self.model, self.path = adapters, model, path  # path: the adapter folder it came from


_SELF = object()  # marks the step-1 model that became the trained model itself (lora_on="instructed")


def is_full_model(item: Any) -> bool:
    """A full model (a module, or a model folder that is not an adapter folder), as opposed to an adapter."""
    if isinstance(item, nn.Module):
        return True
    return isinstance(item, (str, os.PathLike)) and not (Path(item) / "adapter_config.json").is_file() and (
        Path(item) / "config.json").is_file()


def _check_compatible(model: nn.Module, other: nn.Module, what: str) -> None:
    for name in ("hidden_size", "vocab_size"):
        mine = getattr(model.config.get_text_config(), name, None)
        theirs = getattr(other.config.get_text_config(), name, None)
        if mine != theirs:
            raise ValueError(f"{what} does not match the base model: {name} is {theirs}, the base has {mine}.")
    if num_hidden_layers(other) != num_hidden_layers(model):
        raise ValueError(f"{what} does not match the base model: {num_hidden_layers(other)} layers, the base has "
                         f"{num_hidden_layers(model)}.")


def _load_adapter(peft_model: nn.Module, path: Path, name: str) -> None:
    """Load a PEFT adapter folder under ``name`` (frozen), refused when it was made for another base."""
    check_adapter_folder(path, peft_model)
    config = json.loads((path / "adapter_config.json").read_text())
    expected = getattr(peft_model.base_model.model.config, "name_or_path", "") or ""
    recorded = config.get("base_model_name_or_path") or ""
    if expected and recorded and Path(expected).name != Path(recorded).name:
        logger.warning(f"adapter {path} was trained on {recorded!r}, the base model is {expected!r}.")
    try:
        peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"adapter {path} does not fit the base model (trained on {recorded or 'unknown'!r}): "
                         f"{str(err).splitlines()[0][:300]}") from err


def _freeze_dropout(peft_model: nn.Module, names: list[str]) -> None:
    """Frozen adapters compute without dropout, in the trained (train-mode) forward too: otherwise a step-1 adapter
    under the LoRA would add noise that its no-grad A_base forward (eval mode) does not have."""
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name in names:
                if name in dropouts:
                    dropouts[name] = nn.Identity()


class RAHFTrainer(RAHFTrainerMixin, Trainer):
    """A ``Trainer`` for RAHF's representation alignment with a fresh LoRA (see the module docstring).

    ``instructed`` gives the instructed model(s): one for ``method="scit"``, a (good, bad) pair for
    ``method="dual"``. Each is an adapter folder (loaded onto the same base, preferred), the name of an adapter
    already in ``model``, a model folder or an ``nn.Module`` (a separate model). It must be ``None`` when
    ``args.precomputed_targets`` is set: then no instructed model is loaded.

    Where the LoRA goes (``args.lora_on``): ``"instructed"`` (default, as the authors' scripts) trains it on the
    step-1 model (the SCIT model, or Dual's good model), which also gives ``A_base``. When that model is an adapter
    it stays active, frozen, under the LoRA (one copy of the base weights); when it is a full model it *is* the model
    trained and ``model`` is not used. ``"base"`` trains the LoRA on ``model`` itself, ``A_base`` from ``model``.
    With precomputed targets, ``model`` is what the LoRA trains on (pass the step-1 model; a ``PeftModel``'s active
    adapters stay active under the LoRA with ``"instructed"``).
    """

    _tag_names = ["hf_repalign", "rahf"]

    def __init__(
        self,
        model: nn.Module | str,
        args: RAHFConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        instructed: Any = None,
        **kwargs,
    ):
        from peft import LoraConfig, PeftModel, get_peft_model

        args = args or RAHFConfig(output_dir="rahf_output")
        if not isinstance(args, RAHFConfig):
            raise TypeError(f"args must be a RAHFConfig, got {type(args).__name__}.")
        if args.precomputed_targets and instructed is not None:
            raise ValueError("give `instructed` or `args.precomputed_targets`, not both: precomputed targets replace "
                             "the instructed model(s), which are then not loaded.")
        items = self._instructed_items(instructed, args)
        require_rows(train_dataset, "RAHF")
        if args.lora_on == "instructed" and items and is_full_model(items[0]):
            # The step-1 model is a full model: the LoRA trains on it, so the base is never loaded beside it.
            if isinstance(model, nn.Module) and model is not items[0]:
                logger.warning("lora_on='instructed' with a full step-1 model: the LoRA is trained on that model; "
                               "the `model` argument is not used.")
            model, items[0] = items[0], _SELF
        model, tokenizer = load_causal_lm(model, processing_class)
        self.layers = target_layers(model, args.target_layers, args.layer_band)
        if 0 in self.layers:
            raise ValueError("target layer 0 is the embedding output, which a LoRA on the decoder cannot move; "
                             "choose indices >= 1.")
        total = num_hidden_layers(model)
        if peft_config is None:
            peft_config = LoraConfig(
                r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, task_type="CAUSAL_LM",
                target_modules=args.lora_target_modules or "all-linear",
            )
        if peft_config.layers_to_transform is None and max(self.layers) < total:
            # Blocks above the top target layer never run: leaving them out saves memory and keeps DDP happy.
            peft_config = copy.deepcopy(peft_config)
            peft_config.layers_to_transform = list(range(max(self.layers)))
        check_lora_rank(model, peft_config)
        seed_before_init(args)  # Trainer.__init__ seeds only later: `seed` must cover the fresh LoRA's init
        existing: list[str] = []
        if isinstance(model, PeftModel):
            if ADAPTER in model.peft_config:
                raise ValueError(f"model already has an adapter named {ADAPTER!r}; pass the base model and give "
                                 "the instructed adapters as folders or under other names.")
            existing = list(model.active_adapters)
            model.add_adapter(ADAPTER, peft_config)
            model.set_adapter(ADAPTER)
        else:
            model = get_peft_model(model, peft_config)
        self.positive, self.negative, self.stack = self._resolve_sources(model, items, args, existing)
        model.set_adapter(ADAPTER)  # the trained adapter; every other one frozen
        _freeze_dropout(model, [name for name in model.peft_config if name != ADAPTER])
        self.switch = AdapterSwitch(model)
        self.switch.set([*self.stack, ADAPTER])
        self.store = TargetStore(args.precomputed_targets) if args.precomputed_targets else None
        if self.store is not None:
            self.store.check(self.layers, model)
        train_dataset, eval_dataset = prepare_train_eval(
            train_dataset, eval_dataset, build_rahf_examples, RAHF_COLUMNS, tokenizer, args
        )
        if train_dataset is not None and len(train_dataset) == 0:
            raise ValueError(f"RAHF: no training example left: rows whose instructed prompt is longer than "
                             f"max_prompt_length={args.max_prompt_length} are skipped (see the warning above).")
        kwargs.setdefault("data_collator", RAHFCollator(tokenizer.pad_token_id, args.max_prompt_length,
                                                        args.max_response_tokens))
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, **kwargs)
        self._setup_mixin()
        model.forward = types.MethodType(_hidden_forward, model)
        separate = [s.model for s in (self.positive, self.negative) if s is not None and s.model is not None]
        if any(hasattr(p, "ds_id") for m in separate for p in m.parameters()):
            # from_pretrained under ZeRO-3 partitions them, but only the trained model gets DeepSpeed's gather hooks.
            raise ValueError("DeepSpeed ZeRO-3 supports the instructed model(s) only as PEFT adapters (adapter "
                             "folders or adapter names of the model) or through args.precomputed_targets; a "
                             "separate instructed model cannot run with partitioned weights.")
        for module in separate:
            module.to(self.args.device).eval().requires_grad_(False)

    @staticmethod
    def _instructed_items(instructed: Any, args: RAHFConfig) -> list | None:
        if instructed is None:
            if not args.precomputed_targets:
                raise ValueError("RAHF needs `instructed` model(s) or `args.precomputed_targets`.")
            return None
        items = list(instructed) if isinstance(instructed, (list, tuple)) else [instructed]
        expected = 1 if args.method == "scit" else 2
        if len(items) != expected:
            raise ValueError(f"method={args.method!r} needs {expected} instructed model(s) "
                             f"({'the SCIT model' if expected == 1 else '(good, bad)'}), got {len(items)}.")
        return items

    @staticmethod
    def _resolve_sources(model: nn.Module, items: list | None, args: RAHFConfig, existing: list[str]):
        """(p+ source, p- source, adapters kept active under the trained LoRA)."""
        on_step1 = args.lora_on == "instructed"
        if items is None:
            return None, None, existing if on_step1 else []
        roles = ["scit"] if len(items) == 1 else ["good", "bad"]
        sources, stack = [], []
        for i, (role, item) in enumerate(zip(roles, items)):
            if item is _SELF:
                source = _Source(adapters=[])
            elif isinstance(item, nn.Module):
                _check_compatible(model, item, f"the instructed {role} model")
                source = _Source(model=item)
            elif isinstance(item, str) and item in model.peft_config:
                source = _Source(adapters=[item])
            elif (Path(item) / "adapter_config.json").is_file():
                _load_adapter(model, Path(item), f"rahf_{role}")
                source = _Source(adapters=[f"rahf_{role}"], path=str(item))
            elif (Path(item) / "config.json").is_file():
                other = AutoModelForCausalLM.from_pretrained(str(item))
                _check_compatible(model, other, f"the instructed {role} model {item}")
                source = _Source(model=other)
            else:
                raise ValueError(f"instructed {role} model {item!r} is neither an adapter folder, a model folder, "
                                 f"an adapter name of the model ({sorted(model.peft_config)}) nor a model.")
            if i == 0 and on_step1:
                if source.model is not None:
                    raise ValueError("lora_on='instructed' needs the step-1 model as an adapter or as the model "
                                     "trained; a separate module cannot carry the LoRA.")
                stack = source.adapters
            sources.append(source)
        return sources[0], sources[-1], stack

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(RAHF_COLUMNS)

    def _count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["response_mask"].sum() * len(self.layers)  # one loss term per valid (layer, position)

    def _patterns(self, source: _Source, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if source.model is not None:
            return activity_patterns(source.model, ids, mask, self.layers)
        peft_model = self.accelerator.unwrap_model(self.model)
        with self.switch.only(peft_model, source.adapters):
            return activity_patterns(peft_model, ids, mask, self.layers)

    def _difference(self, inputs: dict[str, torch.Tensor], like: torch.Tensor,
                    base: torch.Tensor | None = None) -> torch.Tensor:
        mask = inputs["response_mask"]
        if self.store is not None:
            return self.store.batch(inputs["example_index"], mask, like.shape[-1], like.dtype)
        if self.positive is self.negative:  # one instructed model (SCIT): p+ and p- stimuli in one forward
            ids = torch.cat([inputs["positive_input_ids"], inputs["negative_input_ids"]])
            attention = torch.cat([inputs["positive_attention_mask"], inputs["negative_attention_mask"]])
            positive, negative = self._patterns(self.positive, ids, attention).chunk(2, dim=1)
        else:
            same_as_base = (base is not None and self.positive.adapters == self.stack
                            and torch.equal(inputs["positive_input_ids"], inputs["input_ids"])
                            and torch.equal(inputs["positive_attention_mask"], inputs["attention_mask"]))
            # Authors' Dual: the good model is A_base's model and sees the target stimulus, so its pass is A_base.
            positive = base if same_as_base else self._patterns(
                self.positive, inputs["positive_input_ids"], inputs["positive_attention_mask"])
            negative = self._patterns(self.negative, inputs["negative_input_ids"], inputs["negative_attention_mask"])
        return difference_vectors(positive, negative, mask, mask)[0]

    def representations(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        """``(A_lora, A_base, v)`` of a collated batch, each (n_layers, B, T, H), under the Trainer's autocast.

        ``A_base`` and ``v`` are computed under ``no_grad`` (the trained LoRA off); ``A_lora`` goes through
        ``model`` (the DDP wrapper in training) and carries gradients.
        """
        peft_model = self.accelerator.unwrap_model(model)
        self.switch.set(self.switch.resting)  # in case PEFT's set_adapter ran since (it resets the layers)
        with self.accelerator.autocast():
            with torch.no_grad():
                with self.switch.only(peft_model, self.stack):
                    base = activity_patterns(peft_model, inputs["input_ids"], inputs["attention_mask"], self.layers)
                difference = self._difference(inputs, base, base)
            lora = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         rahf_layers=self.layers)
        return lora, base, difference

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        lora, base, difference = self.representations(model, inputs)
        mask = inputs["response_mask"]
        loss = rahf_loss(lora, base, difference, mask, self.args.alpha, self.args.loss_type,
                         self._items_divisor(num_items_in_batch))
        with torch.no_grad():
            valid = mask.bool()
            self._record(model, target_shift=(self.args.alpha * difference).norm(dim=-1)[:, valid].mean(),
                         lora_shift=(lora - base).norm(dim=-1)[:, valid].mean())
        return (loss, lora) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    @torch.no_grad()
    def precompute_targets(self, directory: str | os.PathLike, batch_size: int | None = None,
                           shard_size: int = 1024) -> Path:
        """Compute the difference vectors of every training example once and write them to ``directory``."""
        if self.positive is None:
            raise ValueError("precompute_targets needs the instructed model(s).")
        data = self.train_dataset
        data = data.select_columns(RAHF_COLUMNS) if hasattr(data, "select_columns") else data
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size or self.args.per_device_train_batch_size,
                                             collate_fn=self.data_collator, shuffle=False)

        def items():
            for batch in loader:
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                with self.accelerator.autocast():
                    difference = self._difference(batch, batch["input_ids"])
                for row, index in enumerate(batch["example_index"].tolist()):
                    positions = batch["response_mask"][row].nonzero().squeeze(-1)
                    yield index, difference[:, row, positions]

        return write_targets(directory, items(), self.layers, shard_size,
                             base_signature(self.accelerator.unwrap_model(self.model)))

    # ---- saving: one plain-peft adapter (or a merged model, or the stacked form) plus our card; no pickle ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call:  # a checkpoint: on every process, since the ZeRO-3 gather is a collective
            # (transformers 5.17 calls `_save` on the main process only, which would leave the others waiting)
            return self._save(output_dir)
        return super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Checkpoints (and Trainer-internal saves) hold the trained LoRA alone, which resume_from_checkpoint loads
        # back into it; the Trainer's state_dict is ignored: the adapter is gathered from the model (ZeRO-3 included).
        self.save_pretrained(output_dir if output_dir is not None else self.args.output_dir, save_as="stacked")

    def base_model_id(self) -> str | None:
        """The base model's Hub id: ``args.base_model``, else the one known for the model (None for a local one)."""
        peft_model = self.accelerator.unwrap_model(self.model)
        return self.args.base_model or base_model_id(peft_model.base_model.model)

    def _write(self, output_dir: Path, repo_id: str, base_model: str | None, save_as: str,
               stacked_on: list[str] | None = None) -> None:
        peft_model = self.accelerator.unwrap_model(self.model)
        config = peft_model.peft_config[ADAPTER]
        # A Hub id loads anywhere; without one, the local path still loads on this machine.
        base = base_model or config.base_model_name_or_path
        require_finite_weights(peft_model, "RAHF adapter")
        names = [*self.stack, ADAPTER]
        if save_as == "merged":
            merged_model(peft_model, names).save_pretrained(str(output_dir))
        elif save_as == "adapter" and self.stack:
            combined, tensors = combined_lora(peft_model, names, config)
            combined.base_model_name_or_path = base
            save_file(tensors, str(output_dir / "adapter_model.safetensors"))
            combined.save_pretrained(str(output_dir))
        else:
            local, config.base_model_name_or_path = config.base_model_name_or_path, base
            try:
                peft_model.save_pretrained(str(output_dir), selected_adapters=[ADAPTER],
                                           save_embedding_layers=targets_embeddings(config))
            finally:
                config.base_model_name_or_path = local
        stacked_on = (self.stacked_on() if stacked_on is None else stacked_on) if save_as == "stacked" else []
        write_signature(output_dir, peft_model, lora_on=self.args.lora_on, save_as=save_as, stacked_on=stacked_on)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(output_dir))
        save_training_args(self.args, output_dir)
        (output_dir / "README.md").write_text(self.model_card(repo_id, base_model, stacked_on, save_as),
                                              encoding="utf-8")

    def stacked_on(self) -> list[str]:
        """The step-1 adapter(s) the trained LoRA works on top of (lora_on="instructed" on a step-1 adapter)."""
        return [str(self.positive.path or self.positive.adapters[0])] if self.stack and self.positive else self.stack

    def _gathered_adapter(self) -> contextlib.AbstractContextManager:
        """Under DeepSpeed ZeRO-3 the adapter's full weights (a collective: every process must enter it)."""
        if not self.is_deepspeed_enabled:
            return contextlib.nullcontext()
        import deepspeed

        peft_model = self.accelerator.unwrap_model(self.model)
        adapters = [*self.stack, ADAPTER]
        weights = [p for name, p in peft_model.named_parameters() if any(f".{a}." in name for a in adapters)]
        return deepspeed.zero.GatheredParameters(weights)  # a no-op for parameters ZeRO does not partition

    def _checked_save_as(self, save_as: str | None) -> str:
        save_as = save_as or self.args.save_as
        if save_as not in SAVE_AS:
            raise ValueError(f"save_as must be one of {SAVE_AS}, got {save_as!r}.")
        return save_as

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False,
                        save_as: str | None = None) -> Path:
        """Write the trained model, tokenizer, ``training_args.json`` and card into ``save_directory`` (main
        process only).

        ``save_as`` (default ``args.save_as``): ``"adapter"``, one LoRA that plain peft loads as the trained model
        (the step-1 adapter it was trained on is folded in); ``"merged"``, a plain transformers model
        (``merge_and_unload``); ``"stacked"``, the RAHF LoRA alone, to load on top of its step-1 adapter (recorded
        in ``hf_repalign_base.json`` and the card). One atomic save that keeps the folder's other files
        (``checkpoint-*`` included); a folder holding something else is refused unless ``overwrite=True``. Call it
        on every process: under DeepSpeed ZeRO-3 the adapter is gathered from all of them first.
        """
        save_as = self._checked_save_as(save_as)
        target = Path(save_directory)
        with self._gathered_adapter():
            if self.args.should_save:
                kind = TRANSFORMERS_MODEL if save_as == "merged" else PEFT_ADAPTER
                with atomic_folder(target, kind, overwrite) as tmp:
                    self._write(tmp, str(target.absolute()), self.base_model_id(), save_as)
        return target

    def _save_final(self, output_dir: str) -> None:
        self.save_pretrained(output_dir)

    def _push_folder(self, folder: Path, repo_id: str, save_as: str | None = None,
                     stacked_on: list[str] | None = None) -> None:
        """Write what ``push_to_hub`` uploads (see ``HubMixin``) into the empty ``folder``."""
        save_as = self._checked_save_as(save_as)
        base = require_base_model(self.args.base_model, self.base_model_id() or
                                  self.accelerator.unwrap_model(self.model).peft_config[ADAPTER]
                                  .base_model_name_or_path, "RAHF adapter")
        if save_as == "stacked":
            stacked_on = list(stacked_on or self.stacked_on())
            local = [s for s in stacked_on if Path(s).exists() or not is_repo_id(s)]
            if local:
                raise ValueError(f"this adapter works on top of the step-1 adapter(s) {local}; push those first and "
                                 "pass their Hub ids as stacked_on=['user/scit-adapter'] so that the card loads "
                                 "them, or push the default save_as='adapter', which needs no step-1 adapter.")
        with self._gathered_adapter():
            if self.args.should_save:
                self._write(folder, repo_id, base, save_as, stacked_on)

    def create_model_card(self, *args, **kwargs) -> None:
        """Our card is part of every save (``save_pretrained``); Trainer's generic one is not written."""

    def model_card(self, repo_id: str | None = None, base_model: str | None = None,
                   stacked_on: list[str] | None = None, save_as: str | None = None) -> str:
        """The ``README.md`` card; its snippet loads the adapter from ``repo_id`` (a Hub id or a folder)."""
        peft_model = self.accelerator.unwrap_model(self.model)
        base = base_model or self.base_model_id()
        losses = [entry for entry in self.state.log_history if "loss" in entry]
        metrics = {k: round(v, 4) for k, v in (losses[-1] if losses else {}).items() if isinstance(v, float)}
        evals = [entry for entry in self.state.log_history if "eval_loss" in entry]
        if evals:
            metrics.update({k: round(v, 4) for k, v in evals[-1].items() if isinstance(v, float)})
        save_as = self._checked_save_as(save_as)
        card_data = {"library_name": "transformers" if save_as == "merged" else "peft",
                     "tags": ["rahf", "representation-engineering", "lora"],
                     "base_model": base,
                     "datasets": [self.args.dataset_name] if is_repo_id(self.args.dataset_name or "") else None}
        return render_card(
            "rahf_adapter.md",
            card_data,
            repo_id=repo_id or self.args.output_dir,
            method=f"RAHF-{self.args.method.upper()}",
            layers=", ".join(map(str, self.layers)),
            alpha=self.args.alpha,
            loss_type=self.args.loss_type,
            lora_r=peft_model.peft_config[ADAPTER].r,
            dataset=self.args.dataset_name or "a preference dataset (not named)",
            num_examples=len(self.train_dataset) if self.train_dataset is not None else 0,
            steps=self.state.global_step,
            metrics=json.dumps(metrics) if metrics else "none logged",
            stacked_on=(self.stacked_on() if stacked_on is None else stacked_on) if save_as == "stacked" else [],
            save_as=save_as,
            folded=self.stacked_on() if save_as != "stacked" else [],
            **base_model_fields(base, peft_model.peft_config[ADAPTER].base_model_name_or_path),
        )
