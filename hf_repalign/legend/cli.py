"""``repalign legend fit-vector`` and ``repalign legend annotate``.

Example (the files are the 48-row samples shipped in ``hf_repalign/sample_data/``; AdvBench's
``harmful_behaviors.csv`` and HH-RLHF's ``harmless-base/test.jsonl.gz`` are read the same way):
    $ repalign legend fit-vector --dataset_name hf_repalign/sample_data/advbench/harmful_behaviors.csv \\
        --num_prompts 48 --output_dir out/margin-vector
    $ repalign legend annotate --dataset_name hf_repalign/sample_data/hh-rlhf/harmless-base/test.jsonl \\
        --vector out/margin-vector --output out/harmless_margins.jsonl --resume
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..artifacts import check_target
from ..cli import DType, UsageError, load_hub_dataset, reaching_hub
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

    dataset_name: str = field(metadata={
        "aliases": ["--prompts"], "help": "Harmful prompts: a .csv (column --prompt_column), .txt or .jsonl file, or a Hub "
                                          "dataset id (e.g. walledai/AdvBench with --prompt_column prompt); with "
                                          "--contrast, contrast data instead."})
    output_dir: str = field(metadata={
        "aliases": ["--output"], "help": "Folder to save the vector to (safetensors + config.json + card)."})
    model_name_or_path: str | None = field(default=None, metadata={
        "aliases": ["--model"], "help": "Model path or Hub id; default: the embedded model."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    contrast: bool = field(default=False, metadata={
        "help": "--dataset_name holds contrast data for any attribute instead of harmful prompts: pairs (chosen = "
                "more of --attribute, rejected = less) or two sets (prompt/completion/label), as .jsonl, .json, "
                ".csv, .parquet or a Hub dataset id."})
    attribute: str = field(default="safety", metadata={
        "help": "What the vector measures (safety, helpfulness, honesty, ...); stored in its config and card."})
    length_control: bool = field(default=False, metadata={
        "help": "Project the response-length direction (estimated from the same embeddings) out of the vector."})
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
    push_to_hub: bool = field(default=False, metadata={"help": "Also upload the vector to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={
        "help": "Repo id to push to; default: the name of --output_dir in your namespace (as TRL)."})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub id of the model, recorded in the card; default: from the model (needed to push a vector fitted "
                "on a local folder whose config records no Hub id)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Save even if --output_dir holds another artifact (its clashing files are replaced; others kept)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bars (as in TrainingArguments)."})

    def __post_init__(self):
        _at_least(self, 1, "num_prompts", "max_new_tokens", "batch_size")
        if self.push_to_hub and self.hub_model_id is None:
            self.hub_model_id = Path(self.output_dir).name
        if self.hub_model_id is not None:
            from ..hub import is_repo_id

            if not is_repo_id(self.hub_model_id):
                raise UsageError(f"argument --hub_model_id: {self.hub_model_id!r} is not a Hub repo id.")


@dataclass
class AnnotateArguments:
    """Add LEGEND `margin_raw` and binned `margin` columns to a preference dataset."""

    dataset_name: str = field(metadata={
        "aliases": ["--dataset"], "help": "Preference data: a .jsonl, .json, .parquet or HH-RLHF .jsonl.gz file, or a "
                                          "Hub dataset id."})
    vector: str = field(metadata={"help": "Margin vector folder or Hub repo id (from fit-vector)."})
    output: str = field(metadata={"help": "Output file: .jsonl, .json or .parquet (written atomically)."})
    model_name_or_path: str | None = field(default=None, metadata={
        "aliases": ["--model"], "help": "Model path or Hub id; default: the embedded model."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    dtype: DType | None = field(
        default=None, metadata={"help": "Model dtype: float32, bfloat16 (fast on CPUs with AVX512-BF16), float16."}
    )
    num_bins: int | None = field(default=10, metadata={
        "help": "Equal-frequency bins; 'none' keeps raw margins (num_bins=None in Python; 0 does the same)."})
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
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bars (as in TrainingArguments)."})

    def __post_init__(self):
        _at_least(self, 0, "num_bins")
        _at_least(self, 1, "batch_size", "max_length", "checkpoint_every")


def read_prompts(path: str | Path, column: str, limit: int | None = None, harmful_column: str | None = None,
                 dataset_config: str | None = None, dataset_split: str = "train"):
    """``(prompts, harmful responses or None)`` from a .csv, .jsonl or .txt file, or a Hub dataset id."""
    what = "--dataset_name"
    if limit is not None and limit < 1:
        raise UsageError(f"--num_prompts must be >= 1, got {limit}.")
    location = local_or_repo_id(path, what)
    if isinstance(location, str):
        rows = list(load_hub_dataset(location, dataset_config, dataset_split, what))
    elif not location.is_file():
        raise FileNotFoundError(f"{what}: {location} {'is a folder' if location.is_dir() else 'does not exist'}.")
    elif location.suffix == ".txt":
        if harmful_column:
            raise UsageError("--harmful_column needs a .csv or .jsonl file.")
        rows = [{column: line} for line in read_lines(location, what)]
    elif location.suffix == ".csv":
        rows = read_csv(location, what)
    elif location.suffix == ".jsonl":
        rows = read_jsonl(location, what)
    else:
        raise UsageError(f"{what}: unsupported file {location}; use .csv, .jsonl or .txt.")
    rows = rows[:limit]
    for wanted in filter(None, (column, harmful_column)):
        missing = [i for i, row in enumerate(rows) if not isinstance(row.get(wanted), str) or not row[wanted].strip()]
        if missing:
            raise ValueError(f"{what}: {path} row(s) {missing[:10]} have no text in column {wanted!r}.")
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
    refuse_inputs(args.output_dir, "--output_dir", {"--model_name_or_path": args.model_name_or_path,
                                                    "--dataset_name": args.dataset_name})
    check_target(args.output_dir, MARGIN_VECTOR, args.overwrite)
    check_writable(args.output_dir, "--output_dir")
    fit_kwargs = dict(attribute=args.attribute, length_control=args.length_control, layer=preset["layer"],
                      pooling=preset["pooling"], template=args.template, batch_size=args.batch_size, progress=True)
    if args.contrast:
        from .contrast import read_contrast

        with reaching_hub(f"the dataset {args.dataset_name!r} (--dataset_name)"):
            contrast = read_contrast(args.dataset_name, args.dataset_split, "--dataset_name")
    else:
        prompts, harmful = read_prompts(args.dataset_name, args.prompt_column, preset["num_prompts"],
                                        args.harmful_column, args.dataset_config, args.dataset_split)
    with reaching_hub(f"the model {args.model_name_or_path!r} (--model_name_or_path)"):
        model, tokenizer = load_model_and_tokenizer(
            resolve_model_path(args.model_name_or_path, "--model_name_or_path"), dtype=args.dtype)
    if args.contrast:
        vec = MarginVector.fit(model, tokenizer, data=contrast, **fit_kwargs)
    else:
        vec = MarginVector.induce(model, tokenizer, prompts, refusal=preset["refusal"], harmful_responses=harmful,
                                  max_new_tokens=preset["max_new_tokens"], **fit_kwargs)
    path = vec.save_pretrained(args.output_dir, overwrite=args.overwrite, base_model=args.base_model)
    print(f"saved {vec} to {path}")
    if args.push_to_hub:
        with reaching_hub(f"pushing the margin vector to {args.hub_model_id}"):
            print(vec.push_to_hub(args.hub_model_id, base_model=args.base_model))
    return 0


def describe_length_check(diagnostics: dict) -> str:
    """The length diagnostic of :func:`~hf_repalign.legend.annotate.length_diagnostics` in one sentence."""
    rho, r = diagnostics["spearman_margin_vs_length_diff"], diagnostics["pearson_margin_vs_length_diff"]
    if rho is None:
        return f"length check: not computed ({diagnostics['pairs']} pairs, or constant margins or lengths)"
    verdict = ("the margins mostly follow which response is shorter: compare with a length-only baseline"
               if diagnostics["length_dominates"] else "length does not dominate the margins")
    text = (f"length check over {diagnostics['pairs']} pairs: margin_raw vs (chosen - rejected) length, Spearman "
            f"{rho:+.2f}, Pearson {r:+.2f}; {verdict}")
    control = diagnostics.get("length_control")
    if control and control.get("spearman_margin_vs_length_diff") is not None:
        text += (f"; length control removed {control['slope_per_token']:+.4g} per token of length difference "
                 f"(margin_length_controlled vs length: Spearman {control['spearman_margin_vs_length_diff']:+.2f})")
    return text


def run_annotate(args: AnnotateArguments) -> int:
    from .annotate import OUTPUT_SUFFIXES, annotate
    from .vector import MarginVector

    location = local_or_repo_id(args.dataset_name, "--dataset_name")
    check_output_file(args.output, OUTPUT_SUFFIXES, "--output", inputs={"--dataset_name": args.dataset_name})
    with reaching_hub(f"the margin vector {args.vector!r} (--vector)"):
        vec = MarginVector.from_pretrained(args.vector)
    data = location if not isinstance(location, str) else load_hub_dataset(
        location, args.dataset_config, args.dataset_split, "--dataset_name")
    # A second run on the same output raises OutputLockedError (a RuntimeError): main() prints it in one line.
    dataset, diagnostics = annotate(
        data, vec, model=args.model_name_or_path, dtype=args.dtype, num_bins=args.num_bins or None,
        batch_size=args.batch_size, output=args.output, resume=args.resume,
        checkpoint_every=args.checkpoint_every, max_length=args.max_length, truncation=args.truncation,
        drop_invalid=args.drop_invalid, with_diagnostics=True, length_control=args.length_control,
    )
    positive = sum(m > 0 for m in dataset["margin_raw"]) / max(len(dataset), 1)
    print(f"wrote {len(dataset)} rows to {args.output}; margin_raw > 0 in {positive:.1%} of pairs; "
          f"{describe_length_check(diagnostics)}")
    return 0
