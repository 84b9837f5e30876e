"""``repalign legend fit-vector`` and ``repalign legend annotate``.

Example (the files are the 48-row samples shipped in ``hf_repalign/sample_data/``; AdvBench's
``harmful_behaviors.csv`` and HH-RLHF's ``harmless-base/test.jsonl.gz`` are read the same way):
    $ repalign legend fit-vector --prompts hf_repalign/sample_data/advbench/harmful_behaviors.csv \\
        --num_prompts 48 --output out/margin-vector
    $ repalign legend annotate --dataset hf_repalign/sample_data/hh-rlhf/harmless-base/test.jsonl \\
        --vector out/margin-vector --output out/harmless_margins.jsonl --resume
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..cli import DType, UsageError
from ..artifacts import check_target
from ..hub import local_or_repo_id
from ..outputs import check_output_file, check_writable, refuse_inputs
from ..text_files import read_csv, read_jsonl, read_lines
from .presets import DEFAULT_REFUSAL, FIT_PRESETS, POOLINGS


def _at_least(args, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UsageError(f"argument --{name}: must be >= {minimum}, got {value}.")


@dataclass
class FitVectorArguments:
    """Fit a LEGEND margin vector: from harmful prompts (model answers vs a refusal), or from any contrast data."""

    output: str = field(metadata={"help": "Folder to save the vector to (safetensors + config.json + card)."})
    prompts: str | None = field(default=None, metadata={
        "help": "File of harmful prompts: .csv (column --prompt_column), .txt, .jsonl (the safety preset)."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Contrast data instead of --prompts: pairs (chosen = more of --attribute, rejected = less) or two "
                "sets (prompt/completion/label), as .jsonl, .json, .csv, .parquet or a Hub dataset id."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a Hub --dataset_name."})
    attribute: str = field(default="safety", metadata={
        "help": "What the vector measures (safety, helpfulness, honesty, ...); stored in its config and card."})
    length_control: bool = field(default=False, metadata={
        "help": "Project the response-length direction (estimated from the same embeddings) out of the vector."})
    model: str | None = field(default=None, metadata={"help": "Model path or Hub id; default: the embedded model."})
    dtype: DType | None = field(
        default=None, metadata={"help": "Model dtype: float32, bfloat16 (fast on CPUs with AVX512-BF16), float16."}
    )
    prompt_column: str = field(default="goal", metadata={"help": "Prompt column in .csv / .jsonl files."})
    harmful_column: str | None = field(
        default=None, metadata={"help": "Take harmful responses from this column instead of generating them."}
    )
    preset: str = field(
        default="default", metadata={"help": "Defaults for the fields below: 'default' (64 new tokens) or 'authors' "
                                     "(the LEGEND code: every prompt, 1024 new tokens, its refusal string); "
                                     "explicit flags win.", "choices": list(FIT_PRESETS)}
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts (N >= 1; default: "
                                                                    "all)."})
    refusal: str | None = field(default=None, metadata={"help": "The fixed harmless response (default: "
                                                        f"{DEFAULT_REFUSAL!r})."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Length of the generated harmful responses (default 64; authors: 1024)."}
    )
    layer: int | None = field(default=None, metadata={"help": "Hidden-state index (output_hidden_states); default -1 "
                                                      "= final norm."})
    pooling: str | None = field(
        default=None, metadata={"help": "'last' token of the response (default, the authors'), 'mean' over the "
                                "response, 'mean_all' over prompt + response (the authors' mean), 'last_rendered'.",
                                "choices": list(POOLINGS)}
    )
    template: str | None = field(
        default=None, metadata={"help": "Format string with {prompt} and {response}; default: chat template."}
    )
    batch_size: int = field(default=8, metadata={"help": "Pairs per forward."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Also upload the vector to this repo id."})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub id of the model, recorded in the card; default: from the model (needed to push a vector fitted "
                "on a local folder whose config records no Hub id)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Save even if --output holds another artifact (its clashing files are replaced; others kept)."})

    def __post_init__(self):
        _at_least(self, 1, "num_prompts", "max_new_tokens", "batch_size")
        if (self.prompts is None) == (self.dataset_name is None):
            raise UsageError("give --prompts (harmful prompts, the safety preset) or --dataset_name (contrast data), "
                             "one of the two.")
        if self.push_to_hub is not None:
            from ..hub import is_repo_id

            if not is_repo_id(self.push_to_hub):
                raise UsageError(f"argument --push_to_hub: {self.push_to_hub!r} is not a Hub repo id.")


@dataclass
class AnnotateArguments:
    """Add LEGEND `margin_raw` and binned `margin` columns to a preference dataset."""

    dataset: str = field(metadata={"help": "Preference data: .jsonl, .json, .parquet or HH-RLHF .jsonl.gz."})
    vector: str = field(metadata={"help": "Margin vector folder or Hub repo id (from fit-vector)."})
    output: str = field(metadata={"help": "Output file: .jsonl, .json or .parquet (written atomically)."})
    model: str | None = field(default=None, metadata={"help": "Model path or Hub id; default: the embedded model."})
    dtype: DType | None = field(
        default=None, metadata={"help": "Model dtype: float32, bfloat16 (fast on CPUs with AVX512-BF16), float16."}
    )
    num_bins: int | None = field(default=10, metadata={"help": "Equal-frequency bins; 0 keeps raw margins."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per forward."})
    max_length: int | None = field(default=None, metadata={"help": "Longest sequence; default: model context."})
    truncation: Literal["error", "left"] = field(default="error", metadata={
        "help": "'error' refuses longer rows, 'left' cuts prompts."})
    resume: bool = field(default=False, metadata={"help": "Continue from the checkpoints of an interrupted run."})
    checkpoint_every: int = field(default=512, metadata={"help": "Rows per checkpointed chunk."})
    drop_invalid: bool = field(
        default=False, metadata={"help": "Leave out rows that are not valid pairs (e.g. empty responses), listed."}
    )
    length_control: bool = field(default=False, metadata={
        "help": "Remove the margins' least-squares dependence on the response-length difference; `margin` bins "
                "the new `margin_length_controlled` column."})

    def __post_init__(self):
        _at_least(self, 0, "num_bins")
        _at_least(self, 1, "batch_size", "max_length", "checkpoint_every")


def read_prompts(path: str | Path, column: str, limit: int | None = None, harmful_column: str | None = None):
    """``(prompts, harmful responses or None)`` from a .csv, .jsonl or .txt file."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise UsageError(f"--num_prompts must be >= 1, got {limit}.")
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: {path} {'is a folder' if path.is_dir() else 'does not exist'}.")
    if path.suffix == ".txt":
        if harmful_column:
            raise UsageError("--harmful_column needs a .csv or .jsonl file.")
        rows = [{column: line} for line in read_lines(path, "--prompts")]
    elif path.suffix == ".csv":
        rows = read_csv(path, "--prompts")
    elif path.suffix == ".jsonl":
        rows = read_jsonl(path, "--prompts")
    else:
        raise UsageError(f"--prompts: unsupported file {path}; use .csv, .jsonl or .txt.")
    rows = rows[:limit]
    for wanted in filter(None, (column, harmful_column)):
        missing = [i for i, row in enumerate(rows) if not isinstance(row.get(wanted), str) or not row[wanted].strip()]
        if missing:
            raise ValueError(f"--prompts: {path} row(s) {missing[:10]} have no text in column {wanted!r}.")
    harmful = [row[harmful_column] for row in rows] if harmful_column else None
    return [row[column] for row in rows], harmful


def run_fit_vector(args: FitVectorArguments) -> int:
    from ..formats import check_template
    from ..models import load_model_and_tokenizer, resolve_model_path
    from .vector import MARGIN_VECTOR, MarginVector

    preset = {key: getattr(args, key) if getattr(args, key) is not None else value
              for key, value in FIT_PRESETS[args.preset].items()}
    try:
        check_template(args.template, "--template")
    except ValueError as err:
        raise UsageError(str(err)) from None
    # Everything that can be refused is refused before the model runs.
    refuse_inputs(args.output, "--output", {"--model": args.model, "--prompts": args.prompts,
                                            "--dataset_name": args.dataset_name})
    check_target(args.output, MARGIN_VECTOR, args.overwrite)
    check_writable(args.output, "--output")
    fit_kwargs = dict(attribute=args.attribute, length_control=args.length_control, layer=preset["layer"],
                      pooling=preset["pooling"], template=args.template, batch_size=args.batch_size, progress=True)
    if args.dataset_name is not None:
        from .contrast import read_contrast

        contrast = read_contrast(args.dataset_name, args.dataset_train_split, "--dataset_name")
        model, tokenizer = load_model_and_tokenizer(resolve_model_path(args.model, "--model"), dtype=args.dtype)
        vec = MarginVector.fit(model, tokenizer, data=contrast, **fit_kwargs)
    else:
        prompts, harmful = read_prompts(args.prompts, args.prompt_column, preset["num_prompts"], args.harmful_column)
        model, tokenizer = load_model_and_tokenizer(resolve_model_path(args.model, "--model"), dtype=args.dtype)
        vec = MarginVector.induce(model, tokenizer, prompts, refusal=preset["refusal"], harmful_responses=harmful,
                                  max_new_tokens=preset["max_new_tokens"], **fit_kwargs)
    path = vec.save_pretrained(args.output, overwrite=args.overwrite, base_model=args.base_model)
    print(f"saved {vec} to {path}")
    if args.push_to_hub:
        print(vec.push_to_hub(args.push_to_hub, base_model=args.base_model))
    return 0


def run_annotate(args: AnnotateArguments) -> int:
    from .annotate import OUTPUT_SUFFIXES, annotate
    from .vector import MarginVector

    local_or_repo_id(args.dataset, "--dataset")
    check_output_file(args.output, OUTPUT_SUFFIXES, "--output", inputs={"--dataset": args.dataset})
    vec = MarginVector.from_pretrained(args.vector)
    # A second run on the same output raises OutputLockedError (a RuntimeError): main() prints it in one line.
    dataset, diagnostics = annotate(
        args.dataset, vec, model=args.model, dtype=args.dtype, num_bins=args.num_bins or None,
        batch_size=args.batch_size, output=args.output, resume=args.resume,
        checkpoint_every=args.checkpoint_every, max_length=args.max_length, truncation=args.truncation,
        drop_invalid=args.drop_invalid, with_diagnostics=True, length_control=args.length_control,
    )
    positive = sum(m > 0 for m in dataset["margin_raw"]) / max(len(dataset), 1)
    print(f"wrote {len(dataset)} rows to {args.output}; margin_raw > 0 in {positive:.1%} of pairs; "
          f"length diagnostic: {diagnostics}")
    return 0
