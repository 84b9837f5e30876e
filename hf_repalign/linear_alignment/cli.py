"""``repalign generate``: plain, principle-prompted and Linear-Alignment answers side by side."""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Literal

from ..cli import DType, UsageError, reaching_hub
from .principles import HARMLESS_PRINCIPLE  # light: its transformers names are types only

Preset = Literal["authors"]
SystemMode = Literal["append", "replace"]


@dataclass
class GenerateArguments:
    question: list[str] = field(default_factory=list, metadata={"help": "Question(s) to answer."})
    principle: str = field(default=HARMLESS_PRINCIPLE, metadata={"help": "Principle, added as a system message."})
    alpha: float = field(default=1.0, metadata={"help": "Step along (principle - plain) logits; 0 = prompting."})
    model_name_or_path: str | None = field(default=None, metadata={
        "aliases": ["--model"], "help": "Local path or Hub id; default: embedded SmolLM2."})
    dtype: DType | None = field(default=None, metadata={"help": "Model dtype: float32 (default), bfloat16, float16."})
    max_new_tokens: int = field(default=96, metadata={"help": "Tokens to generate per answer."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=0.9, metadata={"help": "Sampling nucleus (with --do_sample)."})
    normalize: bool = field(default=False, metadata={
        "help": "Paper Eq. 10: plain logits + a unit-norm step of length alpha (alpha then needs tens to hundreds)."})
    principle_top_p: float | None = field(default=None, metadata={"help": "Plausibility mask of the principle."})
    principle_temperature: float | None = field(default=None, metadata={
        "help": "Temperature of the plausibility mask (default: the sampling temperature, 1 when greedy)."})
    preset: Preset | None = field(default=None, metadata={
        "help": "'authors': their released decoding (mask top-p 0.8 at temperature 0.5, also greedy; with "
                "--do_sample: temperature 0.5, no top-k/top-p). Explicit flags win."})
    system_mode: SystemMode = field(default="append", metadata={
        "help": "append: the principle is added after the (default) system prompt, as the authors; replace: it "
                "replaces it."})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "generate's repetition penalty; acts on the aligned scores."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bars (as in TrainingArguments)."})

    def __post_init__(self):
        if not self.question:
            raise UsageError("give at least one question (bare words or --question).")
        if self.max_new_tokens < 1:
            raise UsageError(f"argument --max_new_tokens: must be >= 1, got {self.max_new_tokens}.")
        if self.temperature <= 0:
            raise UsageError(f"argument --temperature: must be > 0, got {self.temperature}.")
        if self.principle_temperature is not None and self.principle_temperature <= 0:
            raise UsageError(f"argument --principle_temperature: must be > 0, got {self.principle_temperature}.")
        for name in ("top_p", "principle_top_p"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise UsageError(f"argument --{name}: must be in (0, 1], got {value}.")
        if not self.principle.strip():
            raise UsageError("argument --principle: must not be empty.")


def _token_progress(bar):
    """A stopping criterion that advances ``bar`` once per step and never stops generation.

    A stopping criterion rather than a streamer: transformers does not hand streamers to ``custom_generate`` loops.
    """
    import torch
    from transformers import StoppingCriteria

    class TokenProgress(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return TokenProgress()


def _columns(titles: list[str], texts: list[str]) -> str:
    width = max(24, (shutil.get_terminal_size((120, 20)).columns - 3 * (len(titles) - 1)) // len(titles))
    wrapped = [textwrap.wrap(t, width) or [""] for t in texts]
    rows = [" | ".join(title.ljust(width) for title in titles), "-+-".join("-" * width for _ in titles)]
    for i in range(max(len(w) for w in wrapped)):
        rows.append(" | ".join((w[i] if i < len(w) else "").ljust(width) for w in wrapped))
    return "\n".join(rows)


def run(args: GenerateArguments) -> int:
    import torch
    from transformers.utils.logging import tqdm  # honours disable_progress_bar()
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from ..models import load_model_and_tokenizer
    from .paired import paired_generate
    from .principles import build_principle_inputs
    from .processor import AUTHORS_PRESET, LinearAlignmentProcessor

    torch.manual_seed(args.seed)
    with reaching_hub(f"the model {args.model_name_or_path!r} (--model_name_or_path)"):
        model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, dtype=args.dtype)
    plain, principle = build_principle_inputs(tokenizer, args.question, args.principle,
                                              system_mode=args.system_mode)
    mask = dict(principle_top_p=args.principle_top_p, principle_temperature=args.principle_temperature)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, pad_token_id=tokenizer.pad_token_id,
               repetition_penalty=args.repetition_penalty)
    if args.do_sample:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    if args.preset == "authors":
        mask = {key: AUTHORS_PRESET[key] if value is None else value for key, value in mask.items()}
        if args.do_sample:
            gen.update(temperature=AUTHORS_PRESET["principle_temperature"], top_p=1.0, top_k=0)
    proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=args.alpha,
                                    normalize=args.normalize, check_prompts=args.system_mode == "append", **mask)
    runs = [
        ("plain", plain, {}),
        ("principle prompt", principle, {}),
        (f"linear alignment (alpha={args.alpha:g})", plain,
         {"logits_processor": LogitsProcessorList([proc]), "custom_generate": paired_generate}),
    ]
    answers = []
    for title, inputs, extra in runs:
        with tqdm(total=args.max_new_tokens, desc=title, unit="tok", leave=False) as bar:
            progress = StoppingCriteriaList([_token_progress(bar)])
            out = model.generate(**inputs, stopping_criteria=progress, **gen, **extra)
        answers.append(tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    for row, question in enumerate(args.question):
        print(f"\nQ: {question}\nprinciple: {args.principle[:200]}{'...' if len(args.principle) > 200 else ''}\n")
        print(_columns([title for title, _, _ in runs], [a[row].strip() for a in answers]))
    return 0


@dataclass
class ExportArguments:
    output_dir: list[str] = field(default_factory=list, metadata={
        "help": "Folder to write the custom_generate repository into (push it to the Hub as is)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace other versions of the files it writes."})

    def __post_init__(self):
        if len(self.output_dir) != 1:
            raise UsageError(f"give one output folder (OUTPUT_DIR or --output_dir), got {len(self.output_dir)}.")


def run_export(args: ExportArguments) -> int:
    from .export import export_custom_generate

    folder = export_custom_generate(args.output_dir[0], overwrite=args.overwrite)
    print(f"wrote the Linear Alignment custom_generate method to {folder}: use it with model.generate(..., "
          f"custom_generate={str(folder)!r}, trust_remote_code=True, principle='...', tokenizer=tokenizer), "
          "or upload the folder to the Hub.")
    return 0
