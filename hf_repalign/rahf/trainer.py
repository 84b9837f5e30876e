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
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging

from ..formats import encode_pair, to_triplet
from ..hidden import num_hidden_layers
from ..hub import atomic_folder, atomic_write_text, render_card
from .instructions import DISPREFERRED_INSTRUCTION, PREFERRED_INSTRUCTION, instructed_template
from .patterns import active_adapter, activity_patterns, align_stimuli, difference_vectors, target_layers
from .scit import load_causal_lm, prepare_train_eval
from .store import TargetStore, write_targets
from .trainer_mixin import RAHFTrainerMixin

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


@dataclass
class RAHFConfig(TrainingArguments):
    """``TrainingArguments`` plus RAHF's options (defaults: the paper's)."""

    method: str = field(default="scit", metadata={"help": "'scit' (one instructed model) or 'dual' (good/bad)."})
    alpha: float = field(default=5.0, metadata={"help": "Scale of the difference vectors in the target."})
    target_layers: list[int] | None = field(
        default=None, metadata={"help": "hidden_states indices; default: the paper's 10..20 step 2 band, scaled."}
    )
    loss_type: str = field(default="l2", metadata={"help": "'l2' (mean per-token L2 norm) or 'mse'."})
    max_response_tokens: int = field(default=64, metadata={"help": "First N response tokens carry the loss."})
    max_prompt_length: int = field(default=512, metadata={"help": "Prompts keep their last N tokens."})
    preferred_instruction: str | None = field(
        default=None, metadata={"help": "Stimulus instruction p+; default: the paper's for scit, none for dual."}
    )
    dispreferred_instruction: str | None = field(
        default=None, metadata={"help": "Stimulus instruction p-; default: the paper's for scit, none for dual."}
    )
    target_instruction: str = field(default="", metadata={"help": "Instruction the trained model sees (none)."})
    prompt_format: str | None = field(default=None, metadata={"help": "Format with {query}; default as SCIT."})
    stimulus_response: str = field(
        default="chosen", metadata={"help": "Response used in the stimuli: 'chosen', 'rejected' or 'both'."}
    )
    precomputed_targets: str | None = field(
        default=None, metadata={"help": "Folder written by precompute_targets(); no instructed model needed."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (when no peft_config is given)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Default: all linear layers."})
    dataset_name: str | None = field(default=None, metadata={"help": "Recorded in the model card."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "RAHF needs its own columns."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "LoRA is limited to layers below the top target, so all are used."}
    )

    def __post_init__(self):
        super().__post_init__()
        choices = {"method": ("scit", "dual"), "loss_type": ("l2", "mse"),
                   "stimulus_response": ("chosen", "rejected", "both")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be >= 1, got {self.max_response_tokens}.")
        scit = self.method == "scit"
        if self.preferred_instruction is None:
            self.preferred_instruction = PREFERRED_INSTRUCTION if scit else ""
        if self.dispreferred_instruction is None:
            self.dispreferred_instruction = DISPREFERRED_INSTRUCTION if scit else ""


def build_rahf_examples(rows: dict[str, list], indices: list[int], tokenizer: Any, args: RAHFConfig) -> dict:
    """Batched ``datasets.map`` function: a preference row -> stimuli (target, p+, p-) sharing one response."""
    templates = [instructed_template(tokenizer, instruction, args.prompt_format) for instruction in
                 (args.target_instruction, args.preferred_instruction, args.dispreferred_instruction)]
    sides = ["chosen", "rejected"] if args.stimulus_response == "both" else [args.stimulus_response]
    out: dict[str, list] = {name: [] for name in RAHF_COLUMNS}
    names = list(rows)
    for j, row_index in enumerate(indices):
        triplet = to_triplet({name: rows[name][j] for name in names}, row_index)
        for k, side in enumerate(sides):
            encoded = [encode_pair(tokenizer, triplet.prompt, getattr(triplet, side), t) for t in templates]
            responses = [ids[n:] for ids, n in encoded]
            if any(r != responses[0] for r in responses):
                raise ValueError(f"row {row_index}: the response tokenizes differently under the instructions; "
                                 "use a prompt_format whose prompt ends on a token boundary.")
            for name, (ids, n) in zip(RAHF_COLUMNS[:3], encoded):
                out[name].append(ids[:n])
            out["response_ids"].append(responses[0][: args.max_response_tokens])
            out["example_index"].append(row_index * len(sides) + k)
    return out


@dataclass
class RAHFCollator:
    """Aligns the target, p+ and p- stimuli of a batch to one prompt width and one response width."""

    pad_token_id: int
    max_prompt_length: int
    max_response_tokens: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keys = {"": "prompt_ids", "positive_": "positive_prompt_ids", "negative_": "negative_prompt_ids"}
        longest = max(len(f[key]) for f in features for key in keys.values())
        width = min(longest, self.max_prompt_length)
        if longest > width:
            logger.warning_once(f"RAHF: prompts longer than max_prompt_length={width} keep their last {width} "
                                "tokens.")
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
    """Where activity patterns come from: an adapter of the trained PEFT model, or a separate model."""

    def __init__(self, adapter: str | None = None, model: nn.Module | None = None):
        self.adapter, self.model = adapter, model

    def patterns(self, peft_model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, layers: list[int]):
        if self.model is not None:
            return activity_patterns(self.model, ids, mask, layers)
        with active_adapter(peft_model, self.adapter):
            return activity_patterns(peft_model, ids, mask, layers)


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
    """Load a PEFT adapter folder under ``name`` (frozen), with clear errors when it belongs to another base."""
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


class RAHFTrainer(RAHFTrainerMixin, Trainer):
    """A ``Trainer`` for RAHF's representation alignment with a fresh LoRA (see the module docstring).

    ``instructed`` gives the instructed model(s): one for ``method="scit"``, a (good, bad) pair for
    ``method="dual"``. Each is an adapter folder (loaded onto the same base, preferred), the name of an adapter
    already in ``model``, a model folder or an ``nn.Module`` (a separate model). It must be ``None`` when
    ``args.precomputed_targets`` is set: then no instructed model is loaded.
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
        model, tokenizer = load_causal_lm(model, processing_class)
        self.layers = target_layers(model, args.target_layers)
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
        if isinstance(model, PeftModel):
            if ADAPTER in model.peft_config:
                raise ValueError(f"model already has an adapter named {ADAPTER!r}; pass the base model and give "
                                 "the instructed adapters as folders or under other names.")
            model.add_adapter(ADAPTER, peft_config)
            model.set_adapter(ADAPTER)
        else:
            model = get_peft_model(model, peft_config)
        self.positive, self.negative = self._resolve_sources(model, instructed, args)
        self.store = TargetStore(args.precomputed_targets) if args.precomputed_targets else None
        if self.store is not None and self.store.layers != self.layers:
            raise ValueError(f"precomputed targets are for layers {self.store.layers}, training uses {self.layers}.")
        train_dataset, eval_dataset = prepare_train_eval(
            train_dataset, eval_dataset, build_rahf_examples, RAHF_COLUMNS, tokenizer, args
        )
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
        for source in (self.positive, self.negative):
            if source is not None and source.model is not None:
                source.model.to(self.args.device).eval().requires_grad_(False)

    @staticmethod
    def _resolve_sources(model: nn.Module, instructed: Any, args: RAHFConfig) -> tuple[_Source | None, ...]:
        if instructed is None:
            if not args.precomputed_targets:
                raise ValueError("RAHF needs `instructed` model(s) or `args.precomputed_targets`.")
            return None, None
        items = list(instructed) if isinstance(instructed, (list, tuple)) else [instructed]
        expected = 1 if args.method == "scit" else 2
        if len(items) != expected:
            raise ValueError(f"method={args.method!r} needs {expected} instructed model(s) "
                             f"({'the SCIT model' if expected == 1 else '(good, bad)'}), got {len(items)}.")
        roles = ["scit"] if expected == 1 else ["good", "bad"]
        sources = []
        for role, item in zip(roles, items):
            if isinstance(item, nn.Module):
                _check_compatible(model, item, f"the instructed {role} model")
                sources.append(_Source(model=item))
            elif isinstance(item, str) and item in model.peft_config:
                sources.append(_Source(adapter=item))
            elif (Path(item) / "adapter_config.json").is_file():
                _load_adapter(model, Path(item), f"rahf_{role}")
                sources.append(_Source(adapter=f"rahf_{role}"))
            elif (Path(item) / "config.json").is_file():
                other = AutoModelForCausalLM.from_pretrained(str(item))
                _check_compatible(model, other, f"the instructed {role} model {item}")
                sources.append(_Source(model=other))
            else:
                raise ValueError(f"instructed {role} model {item!r} is neither an adapter folder, a model folder, "
                                 f"an adapter name of the model ({sorted(model.peft_config)}) nor a model.")
        model.set_adapter(ADAPTER)
        return sources[0], sources[-1]

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(RAHF_COLUMNS)

    def _count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["response_mask"].sum() * len(self.layers)  # one loss term per valid (layer, position)

    def _difference(self, inputs: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        mask = inputs["response_mask"]
        if self.store is not None:
            return self.store.batch(inputs["example_index"], mask, like.shape[-1], like.dtype)
        peft_model = self.accelerator.unwrap_model(self.model)
        if self.positive is self.negative:  # one instructed model (SCIT): p+ and p- stimuli in one forward
            ids = torch.cat([inputs["positive_input_ids"], inputs["negative_input_ids"]])
            attention = torch.cat([inputs["positive_attention_mask"], inputs["negative_attention_mask"]])
            positive, negative = self.positive.patterns(peft_model, ids, attention, self.layers).chunk(2, dim=1)
        else:
            positive = self.positive.patterns(peft_model, inputs["positive_input_ids"],
                                              inputs["positive_attention_mask"], self.layers)
            negative = self.negative.patterns(peft_model, inputs["negative_input_ids"],
                                              inputs["negative_attention_mask"], self.layers)
        return difference_vectors(positive, negative, mask, mask)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        peft_model = self.accelerator.unwrap_model(model)
        with torch.no_grad():
            with active_adapter(peft_model, None):
                base = activity_patterns(peft_model, inputs["input_ids"], inputs["attention_mask"], self.layers)
            difference = self._difference(inputs, base)
        lora = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], rahf_layers=self.layers)
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
                difference = self._difference(batch, batch["input_ids"])
                for row, index in enumerate(batch["example_index"].tolist()):
                    positions = batch["response_mask"][row].nonzero().squeeze(-1)
                    yield index, difference[:, row, positions]

        return write_targets(directory, items(), self.layers, shard_size)

    # ---- saving: a standard PEFT adapter (only the trained one) plus our model card ----

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # The Trainer's state_dict is ignored: the adapter is gathered from the model itself (ZeRO-3 included).
        with self._gathered_adapter():
            if self.args.should_save:
                self._write(output_dir if output_dir is not None else self.args.output_dir)

    def _write(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        peft_model = self.accelerator.unwrap_model(self.model)
        peft_model.save_pretrained(output_dir, selected_adapters=[ADAPTER])
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        atomic_write_text(Path(output_dir) / "README.md", self.model_card())

    def _gathered_adapter(self) -> contextlib.AbstractContextManager:
        """Under DeepSpeed ZeRO-3 the adapter's full weights (a collective: every process must enter it)."""
        if not self.is_deepspeed_enabled:
            return contextlib.nullcontext()
        import deepspeed

        peft_model = self.accelerator.unwrap_model(self.model)
        adapter = [p for name, p in peft_model.named_parameters() if f".{ADAPTER}." in name]
        return deepspeed.zero.GatheredParameters(adapter)  # a no-op for parameters ZeRO does not partition

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the adapter, tokenizer and model card to ``save_directory`` atomically (main process only).

        Call it on every process: under DeepSpeed ZeRO-3 the adapter is gathered from all of them first.
        """
        target = Path(save_directory)
        with self._gathered_adapter():
            if self.args.should_save:
                with atomic_folder(target) as tmp:
                    self._write(str(tmp))
        return target

    def create_model_card(self, *args, **kwargs) -> None:
        atomic_write_text(Path(self.args.output_dir) / "README.md", self.model_card())

    def model_card(self) -> str:
        peft_model = self.accelerator.unwrap_model(self.model)
        base = peft_model.peft_config[ADAPTER].base_model_name_or_path or "unknown"
        losses = [entry for entry in self.state.log_history if "loss" in entry]
        metrics = {k: round(v, 4) for k, v in (losses[-1] if losses else {}).items() if isinstance(v, float)}
        evals = [entry for entry in self.state.log_history if "eval_loss" in entry]
        if evals:
            metrics.update({k: round(v, 4) for k, v in evals[-1].items() if isinstance(v, float)})
        return render_card(
            "rahf_adapter.md",
            base_model=base,
            method=f"RAHF-{self.args.method.upper()}",
            layers=", ".join(map(str, self.layers)),
            alpha=str(self.args.alpha),
            loss_type=self.args.loss_type,
            lora_r=str(peft_model.peft_config[ADAPTER].r),
            dataset=self.args.dataset_name or "a preference dataset (not named)",
            num_examples=str(len(self.train_dataset) if self.train_dataset is not None else 0),
            steps=str(self.state.global_step),
            metrics=json.dumps(metrics) if metrics else "none logged",
        )
