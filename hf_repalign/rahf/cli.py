"""``repalign rahf scit | dual | align``: RAHF's steps from the command line (flags or ``--config file.yaml``).

Every command takes the fields of its trainer config (``SCITConfig``, ``DualConfig``, ``RAHFConfig``, i.e. all
``TrainingArguments``) plus the model and the data, as in TRL's CLIs.

Example:
    $ repalign rahf scit  --dataset_name Anthropic/hh-rlhf --dataset_split test --max_rows 500 \\
          --output_dir out/scit --use_peft
    $ repalign rahf align --dataset_name Anthropic/hh-rlhf --dataset_split test --max_rows 500 \\
          --instructed out/scit --output_dir out/rahf --max_steps 200
    $ repalign rahf align ... --preset authors     # the settings of the authors' step-2 script for --method
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import PEFT_ADAPTER, TRANSFORMERS_MODEL, check_target
from ..cli import UsageError, load_hub_dataset, reaching_hub
from ..hub import is_repo_id, local_or_repo_id
from ..outputs import check_writable, refuse_inputs
from ..text_files import read_rows
from .dual_config import DualConfig, resume_each_side
from .rahf_config import RAHFConfig
from .scit_config import SCITConfig


@dataclass
class _Common:
    model_name_or_path: str | None = field(default=None, metadata={
        "aliases": ["--model"], "help": "Path or Hub id; default: embedded."})
    dataset_name: str | None = field(default=None, metadata={
        "aliases": ["--dataset"], "help": "Preference data: .json/.jsonl(.gz) file, folder or Hub id (TRL preference "
                                          "format); a Hub id is also recorded in the model card."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split to load."})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows (N >= 1)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Save even if --output_dir holds another artifact (its clashing files are replaced; others kept)."})

    def __post_init__(self):
        super().__post_init__()
        if self.max_rows is not None and self.max_rows < 1:
            raise UsageError(f"argument --max_rows: must be >= 1, got {self.max_rows}.")


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


def check_dataset(path: str | None, split: str = "train") -> Path | str:
    """The ``--dataset_name`` as a local path or a Hub id, refused before any work when it cannot be one."""
    if not path:
        raise UsageError("--dataset_name is required (a .json/.jsonl(.gz) file, a folder or a Hub id).")
    location = local_or_repo_id(path, "--dataset_name")
    if isinstance(location, Path) and location.is_file() and split != "train":
        raise UsageError(f"--dataset_split {split!r} applies to folders and Hub ids; {location} is one file.")
    return location


def load_rows(path: str | None, split: str = "train", max_rows: int | None = None, config: str | None = None):
    """A preference dataset from a local file or folder, or the Hub."""
    from datasets import Dataset, load_dataset

    location = check_dataset(path, split)
    if isinstance(location, Path) and location.is_file():  # read here: bad bytes are named by file and line
        rows = read_rows(location, "--dataset_name")
        if not rows:
            raise UsageError(f"--dataset_name {location} is empty: no preference rows to train on.")
        dataset = Dataset.from_dict({key: [row.get(key) for row in rows]
                                     for key in dict.fromkeys(key for row in rows for key in row)})
    elif isinstance(location, Path):
        dataset = load_dataset(str(location), config, split=split)
    else:
        dataset = load_hub_dataset(location, config, split)
    if len(dataset) == 0:
        raise UsageError(f"--dataset_name {location}: split {split!r} has no rows to train on.")
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return dataset


def _check_output(args: _Common, *kinds_and_folders) -> None:
    """Refuse a bad --output_dir (an input, another artifact, read-only) before any model is loaded."""
    check_dataset(args.dataset_name, args.dataset_split)
    inputs = {"--model_name_or_path": args.model_name_or_path, "--dataset_name": args.dataset_name,
              "--instructed": getattr(args, "instructed", None), "--precomputed_targets":
              getattr(args, "precomputed_targets", None)}
    for kind, folder in kinds_and_folders:
        refuse_inputs(folder, "--output_dir", inputs)
        check_target(folder, kind, args.overwrite)
        check_writable(folder, "--output_dir")


def _resume(args: _Common, folder: str | Path) -> str | bool | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``true`` for the latest ``checkpoint-N`` in ``folder``."""
    from transformers.trainer_utils import get_last_checkpoint

    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() in ("true", "latest", "last"):
        last = get_last_checkpoint(str(folder)) if Path(folder).is_dir() else None
        if last is None:
            raise UsageError(f"--resume_from_checkpoint {value}: {folder} holds no checkpoint-N folder to resume from.")
        return last
    if not Path(value).is_dir():
        raise UsageError(f"--resume_from_checkpoint: {value} is not a checkpoint folder; give one, or true for the "
                         f"latest in {folder}.")
    return value


def _load(args: _Common):
    from ..models import load_model_and_tokenizer

    with reaching_hub(f"the model {args.model_name_or_path!r} (--model_name_or_path)"):
        model, tokenizer = load_model_and_tokenizer(args.model_name_or_path)
    return model.train(), tokenizer


def _lora(args: _Peft):
    from peft import LoraConfig

    return LoraConfig(r=args.peft_r, lora_alpha=args.peft_alpha, target_modules="all-linear", task_type="CAUSAL_LM")


def _config(args, config_class):
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if "dataset_name" in values and not is_repo_id(values["dataset_name"] or ""):  # the card names Hub ids only
        values["dataset_name"] = None
    return config_class(**values)


def run_scit(args: SCITCommand) -> int:
    from .scit import SCITTrainer

    kind = PEFT_ADAPTER if args.use_peft else TRANSFORMERS_MODEL
    _check_output(args, (kind, args.output_dir))
    rows = load_rows(args.dataset_name, args.dataset_split, args.max_rows, args.dataset_config)  # before the model
    model, tokenizer = _load(args)
    trainer = SCITTrainer(model, _config(args, SCITConfig), train_dataset=rows, processing_class=tokenizer,
                          peft_config=_lora(args) if args.use_peft else None)
    trainer.train(resume_from_checkpoint=_resume(args, args.output_dir))
    trainer.save_pretrained(args.output_dir, overwrite=args.overwrite)
    if args.push_to_hub:
        with reaching_hub(f"pushing the SCIT adapter to {args.hub_model_id or Path(args.output_dir).name}"):
            trainer.push_to_hub()
    print(f"SCIT {'LoRA adapter' if args.use_peft else 'model (all weights)'} saved to {args.output_dir}")
    return 0


def run_dual(args: DualCommand) -> int:
    from .dual import train_dual

    kind = PEFT_ADAPTER if args.use_peft else TRANSFORMERS_MODEL
    _check_output(args, *((kind, Path(args.output_dir) / side) for side in ("good", "bad")))
    resume_each_side(args.resume_from_checkpoint)  # a bad value fails before any work
    rows = load_rows(args.dataset_name, args.dataset_split, args.max_rows, args.dataset_config)  # fails fast
    model, tokenizer = _load(args)
    folders = train_dual(model, tokenizer, rows, _config(args, DualConfig),
                         peft_config=_lora(args) if args.use_peft else None, overwrite=args.overwrite)
    kind = "LoRA adapter" if args.use_peft else "model (all weights)"
    print(f"good {kind}: {folders['good']}\nbad {kind}: {folders['bad']}")
    return 0


def run_align(args: AlignCommand) -> int:
    from .trainer import RAHFTrainer

    if args.precomputed_targets and args.instructed:
        raise UsageError("--instructed and --precomputed_targets exclude each other: precomputed targets replace "
                         "the instructed model(s), which are then not loaded.")
    for name, folder in [("--instructed", p) for p in args.instructed] + [("--precomputed_targets",
                                                                            args.precomputed_targets)]:
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"{name}: {folder} {'is a file' if Path(folder).exists() else 'does not exist'}"
                                    "; give the folder written by the previous step.")
    _check_output(args, (PEFT_ADAPTER, args.output_dir))
    from .trainer import is_full_model

    rows = load_rows(args.dataset_name, args.dataset_split, args.max_rows, args.dataset_config)  # before the model
    instructed = args.instructed[0] if len(args.instructed) == 1 else (args.instructed or None)
    if args.lora_on == "instructed" and args.instructed and is_full_model(args.instructed[0]):
        model, tokenizer = args.instructed[0], None  # a full step-1 model carries the LoRA: the base is not loaded
    else:
        model, tokenizer = _load(args)
    trainer = RAHFTrainer(model, _config(args, RAHFConfig), train_dataset=rows, processing_class=tokenizer,
                          instructed=instructed)
    trainer.train(resume_from_checkpoint=_resume(args, args.output_dir))
    trainer.save_pretrained(args.output_dir, overwrite=args.overwrite)
    if args.push_to_hub:
        with reaching_hub(f"pushing the RAHF adapter to {args.hub_model_id or Path(args.output_dir).name}"):
            trainer.push_to_hub()
    print(f"RAHF {'model (merged)' if args.save_as == 'merged' else 'adapter'} saved to {args.output_dir}")
    return 0
