"""RAHF step 1b (Dual): a "good" model trained by maximum likelihood on the chosen responses and a "bad" one on
the rejected responses, loss on the response tokens only.

With a ``peft_config`` both are LoRA adapters ("good", "bad") on one base model, so step 2 holds one copy of
the base weights; without it, two full copies are fine-tuned. Training itself is TRL's ``SFTTrainer`` on
pre-tokenized ``input_ids`` + ``completion_mask`` built with the same templates as the RAHF stimuli.

Example:
    >>> from hf_repalign.rahf import DualConfig, train_dual
    >>> paths = train_dual(model, tokenizer, prefs, DualConfig(output_dir="out/dual", max_steps=50),
    ...                    peft_config=LoraConfig(r=8, task_type="CAUSAL_LM"))
    >>> paths  # {"good": Path("out/dual/good"), "bad": Path("out/dual/bad")}: adapter folders
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers.utils import logging
from trl import SFTTrainer

from ..formats import encode_pair, to_triplet
from ..artifacts import PEFT_ADAPTER, TRANSFORMERS_MODEL, atomic_folder
from .dual_config import DualConfig, resume_each_side
from .instructions import instructed_template
from .scit import seed_before_init
from .step1_card import local_base, step1_base_id, write_step1_card
from .trainer_mixin import AtomicCheckpointMixin, FiniteLossMixin, save_training_args, targets_embeddings
from .validation import check_lora_rank, require_finite_weights, require_rows, write_signature

logger = logging.get_logger(__name__)

SIDES = {"good": "chosen", "bad": "rejected"}


class _DualSFTTrainer(FiniteLossMixin, AtomicCheckpointMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` that stops at the first non-finite loss and writes each checkpoint atomically."""


def build_dual_examples(
    rows: dict[str, list], indices: list[int], tokenizer: Any, side: str, instruction: str,
    prompt_format: str | None, max_length: int | None = None,
) -> dict[str, list]:
    """Batched ``datasets.map`` function: preference rows -> ``input_ids`` + ``completion_mask`` of one side.

    A row left without response tokens (empty, or cut away by ``max_length``, which ``SFTTrainer`` applies from
    the end) is an error: TRL would drop it silently.
    """
    template = instructed_template(tokenizer, instruction, prompt_format)
    out: dict[str, list] = {"input_ids": [], "completion_mask": []}
    names = list(rows)
    truncated = 0
    for j, row_index in enumerate(indices):
        triplet = to_triplet({name: rows[name][j] for name in names}, row_index)
        ids, n_prompt = encode_pair(tokenizer, triplet.prompt, getattr(triplet, side), template)
        kept = len(ids) if max_length is None else min(len(ids), max_length)
        if kept <= n_prompt:
            reason = "has no tokens" if len(ids) == n_prompt else (
                f"is cut away entirely by max_length={max_length} (the prompt has {n_prompt} tokens)")
            raise ValueError(f"row {row_index}, field {side!r}: the response {reason}; nothing to train on. Raise "
                             "max_length or remove the row.")
        truncated += kept < len(ids)
        out["input_ids"].append(ids)
        out["completion_mask"].append([0] * n_prompt + [1] * (len(ids) - n_prompt))
    if truncated:
        logger.warning(f"Dual: {truncated} {side} response(s) will be cut to max_length={max_length}.")
    return out


def dual_dataset(dataset: Any, tokenizer: Any, side: str, instruction: str = "",
                 prompt_format: str | None = None, max_length: int | None = None) -> Dataset:
    """The SFT dataset of one side (``"chosen"`` or ``"rejected"``) of a preference dataset."""
    if isinstance(dataset, list):
        dataset = Dataset.from_list(dataset)
    return dataset.map(
        build_dual_examples, batched=True, with_indices=True, remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "side": side, "instruction": instruction, "prompt_format": prompt_format,
                   "max_length": max_length},
        desc=f"Tokenizing {side} responses",
    )


def _save_adapter(peft_model: Any, name: str, directory: Path, base: str | None) -> None:
    """A standard adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for adapter ``name``,
    naming ``base`` (a Hub id; else the local path) as its base model."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(peft_model, adapter_name=name,
                                      save_embedding_layers=targets_embeddings(peft_model.peft_config[name]))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    require_finite_weights(tensors, f"Dual {name} adapter")
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True
    config.base_model_name_or_path = base or local_base(peft_model)
    config.save_pretrained(str(directory))
    write_signature(directory, peft_model)


def _sharded(trainer: Any) -> bool:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return trainer.is_fsdp_enabled or getattr(plugin, "zero_stage", 0) == 3


def train_dual(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    args: DualConfig,
    peft_config: Any = None,
    eval_dataset: Any = None,
    overwrite: bool = False,
    **trainer_kwargs,
) -> dict[str, Path]:
    """Train the good and bad models; returns ``{"good": folder, "bad": folder}`` (adapters or full models).

    With ``peft_config`` the model gains two adapters ``"good"`` and ``"bad"`` in place (a ``PeftModel`` is
    returned in ``trainer_kwargs``-free form via the folders); otherwise each side fine-tunes its own copy.
    ``overwrite=True`` lets the saves replace clashing files in ``output_dir/good`` and ``output_dir/bad`` (other
    files there are kept either way). With ``args.resume_from_checkpoint`` true, each side resumes from its latest
    checkpoint in ``output_dir/good_checkpoints`` / ``output_dir/bad_checkpoints`` (a side without one starts
    afresh).
    """
    from transformers.trainer_utils import get_last_checkpoint

    from peft import get_peft_model

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.truncation_mode != "keep_start":
        raise ValueError("Dual supports truncation_mode='keep_start' only (its check that responses survive "
                         "max_length assumes it).")
    resume_sides = resume_each_side(args.resume_from_checkpoint)
    root = Path(args.output_dir)
    peft_model = None
    require_rows(train_dataset, "Dual")
    if peft_config is not None:
        check_lora_rank(model, peft_config)
        seed_before_init(args)
        peft_model = get_peft_model(model, peft_config, adapter_name="good")
        peft_model.add_adapter("bad", peft_config)
    folders = {}
    for name, side in SIDES.items():
        instruction = args.good_instruction if name == "good" else args.bad_instruction
        data, evaluation = (None if rows is None else dual_dataset(rows, tokenizer, side, instruction,
                                                                   args.prompt_format, args.max_length)
                            for rows in (train_dataset, eval_dataset))
        side_args = dataclasses.replace(args, output_dir=str(root / f"{name}_checkpoints"))
        if peft_model is not None:
            peft_model.set_adapter(name)
            trained = peft_model
        else:
            trained = copy.deepcopy(model)
        trainer = _DualSFTTrainer(model=trained, args=side_args, train_dataset=data, eval_dataset=evaluation,
                             processing_class=tokenizer, **trainer_kwargs)
        if peft_model is None and _sharded(trainer):
            raise ValueError("full fine-tuning Dual cannot save under FSDP / DeepSpeed ZeRO-3; pass a peft_config.")
        checkpoints = Path(side_args.output_dir)
        resume = get_last_checkpoint(str(checkpoints)) if resume_sides and checkpoints.is_dir() else None
        trainer.train(resume_from_checkpoint=resume)
        folders[name] = root / name
        if trainer.args.should_save:
            kind = PEFT_ADAPTER if peft_model is not None else TRANSFORMERS_MODEL
            base = step1_base_id(trained, args.base_model)
            with atomic_folder(folders[name], kind, overwrite=overwrite) as tmp:
                if peft_model is not None:
                    _save_adapter(peft_model, name, tmp, base)
                    tokenizer.save_pretrained(str(tmp))
                else:
                    require_finite_weights(trained, f"Dual {name} model")
                    trainer._save(str(tmp))  # full weights + tokenizer (sharded setups are refused above)
                save_training_args(trainer.args, tmp)  # JSON, not Trainer's pickle
                trainer.state.save_to_json(str(tmp / "trainer_state.json"))  # the loss history
                write_step1_card(tmp, f"Dual {name}", trained, args, str(folders[name].absolute()), base,
                                 trainer.state.global_step)
        logger.info(f"Dual: the {name} model ({side} responses) is in {folders[name]}.")
    return folders
