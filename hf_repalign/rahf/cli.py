"""``repalign rahf scit | dual | align``: RAHF's steps from the command line (flags or ``--config file.yaml``).

Every command takes the fields of its trainer config (``SCITConfig``, ``DualConfig``, ``RAHFConfig``, i.e. all
``TrainingArguments``) plus the model and the data, as in TRL's CLIs.

Example:
    $ repalign rahf scit  --dataset ../shared/data/hh-rlhf/helpful-base/test.jsonl.gz --output_dir out/scit --use_peft
    $ repalign rahf align --dataset ../shared/data/hh-rlhf/helpful-base/test.jsonl.gz --instructed out/scit \\
          --output_dir out/rahf --max_steps 200
    $ repalign rahf align ... --preset authors     # the settings of the authors' step-2 script for --method
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from transformers.utils import logging

from .dual import DualConfig
from .scit import SCITConfig
from .trainer import RAHFConfig

logger = logging.get_logger(__name__)


@dataclass
class _Common:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Path or Hub id; default: embedded."})
    dataset: str | None = field(default=None, metadata={"help": "Preference data: .json/.jsonl(.gz) file, folder "
                                                                 "or Hub id (TRL preference format)."})
    dataset_split: str = field(default="train", metadata={"help": "Split to load."})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows."})


@dataclass
class _Peft:
    """LoRA flags of scit/dual (align has its own, ``--lora_r`` etc., since it always trains a LoRA)."""

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA instead of all weights."})
    peft_r: int = field(default=8, metadata={"help": "LoRA rank for --use_peft."})
    peft_alpha: int = field(default=16, metadata={"help": "LoRA alpha for --use_peft."})


@dataclass
class SCITCommand(_Common, _Peft, SCITConfig):
    pass


@dataclass
class DualCommand(_Common, _Peft, DualConfig):
    use_peft: bool = field(default=True, metadata={"help": "Good/bad as two LoRA adapters on one base."})


@dataclass
class AlignCommand(_Common, RAHFConfig):
    instructed: list[str] = field(default_factory=list, metadata={
        "help": "SCIT adapter/model folder (scit), or good and bad folders (dual)."})


def load_rows(path: str | None, split: str = "train", max_rows: int | None = None):
    """A preference dataset from a local file or folder, or the Hub."""
    from pathlib import Path

    from datasets import load_dataset

    if not path:
        raise SystemExit("--dataset is required (a .json/.jsonl(.gz) file, a folder or a Hub id).")
    local = Path(path)
    if local.is_file():
        if split != "train":
            raise SystemExit(f"--dataset_split {split!r} applies to folders and Hub ids; {local} is one file.")
        dataset = load_dataset("json", data_files=str(local), split="train")
    else:
        dataset = load_dataset(str(local) if local.is_dir() else path, split=split)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return dataset


def _load(args: _Common):
    from ..models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path)
    return model.train(), tokenizer


def _lora(args: _Peft):
    from peft import LoraConfig

    return LoraConfig(r=args.peft_r, lora_alpha=args.peft_alpha, target_modules="all-linear", task_type="CAUSAL_LM")


def _config(args, config_class):
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


def run_scit(args: SCITCommand) -> int:
    from .scit import SCITTrainer

    model, tokenizer = _load(args)
    rows = load_rows(args.dataset, args.dataset_split, args.max_rows)
    trainer = SCITTrainer(model, _config(args, SCITConfig), train_dataset=rows, processing_class=tokenizer,
                          peft_config=_lora(args) if args.use_peft else None)
    trainer.train()
    trainer.save_model(args.output_dir)
    print(f"SCIT model saved to {args.output_dir}")
    return 0


def run_dual(args: DualCommand) -> int:
    from .dual import train_dual

    model, tokenizer = _load(args)
    folders = train_dual(model, tokenizer, load_rows(args.dataset, args.dataset_split, args.max_rows),
                         _config(args, DualConfig), peft_config=_lora(args) if args.use_peft else None)
    print(f"good model: {folders['good']}\nbad model: {folders['bad']}")
    return 0


def run_align(args: AlignCommand) -> int:
    from .trainer import RAHFTrainer

    if args.precomputed_targets and args.instructed:
        raise SystemExit("--instructed and --precomputed_targets exclude each other: precomputed targets replace "
                         "the instructed model(s), which are then not loaded.")
    from .trainer import is_full_model

    instructed = args.instructed[0] if len(args.instructed) == 1 else (args.instructed or None)
    if args.lora_on == "instructed" and args.instructed and is_full_model(args.instructed[0]):
        model, tokenizer = args.instructed[0], None  # a full step-1 model carries the LoRA: the base is not loaded
    else:
        model, tokenizer = _load(args)
    trainer = RAHFTrainer(model, _config(args, RAHFConfig), train_dataset=load_rows(args.dataset,
                          args.dataset_split, args.max_rows), processing_class=tokenizer, instructed=instructed)
    trainer.train()
    trainer.save_pretrained(args.output_dir)
    if args.push_to_hub:
        trainer.push_to_hub()
    print(f"RAHF adapter saved to {args.output_dir}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import add_command

    parser = subparsers.add_parser("rahf", help="RAHF: SCIT or Dual instructed models, then representation "
                                                "alignment with a LoRA.")
    steps = parser.add_subparsers(dest="rahf_command", required=True, parser_class=HfArgumentParser)
    add_command(steps, "scit", SCITCommand, run_scit, "Step 1a: contrastive instruction tuning (Eq. 1).")
    add_command(steps, "dual", DualCommand, run_dual, "Step 1b: good and bad models on chosen / rejected.")
    add_command(steps, "align", AlignCommand, run_align, "Step 2: train the RAHF LoRA adapter.")
