"""``RAHFConfig``: the arguments of ``RAHFTrainer`` (RAHF step 2) and the authors' preset.

Example:
    >>> from hf_repalign.rahf import RAHFConfig
    >>> args = RAHFConfig(output_dir="out/rahf", method="dual", preset="authors", max_steps=200)
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from transformers import TrainingArguments
from transformers.utils import logging

from .export import SAVE_AS
from .instructions import DISPREFERRED_INSTRUCTION, PREFERRED_INSTRUCTION
from .patterns import PAPER_LAYERS, SCIT_SCRIPT_LAYERS
from .validation import require_number, require_training_numbers

logger = logging.get_logger(__name__)


# The authors' step-2 scripts (github.com/LiuAmber/RAHF, code/bash/SCIT-step2.sh and DUAL-step2.sh, with
# code/step2/RAHF.py): what `preset="authors"` sets. Batch size, steps, bf16 and gradient checkpointing depend on the
# hardware and are left to the user (docs/rahf.md lists the scripts' values).
_AUTHORS_COMMON = dict(alpha=5.0, loss_type="l2", lr_scheduler_type="constant", weight_decay=0.0, max_prompt_length=256,
                       lora_r=8, lora_alpha=16, lora_dropout=0.05, lora_target_modules=["q_proj", "v_proj"],
                       lora_on="instructed")
PRESETS: dict[str, dict[str, dict[str, Any]]] = {"authors": {
    # SCIT: A_base and v from the SCIT model; per example chosen or rejected at random (--data_type random).
    "scit": dict(_AUTHORS_COMMON, learning_rate=3e-4, layer_band=list(SCIT_SCRIPT_LAYERS), max_response_tokens=512,
                 stimulus_response="random", target_instruction="", preferred_instruction=PREFERRED_INSTRUCTION,
                 dispreferred_instruction=DISPREFERRED_INSTRUCTION),
    # Dual: compute_loss_DUAL feeds the same stimulus (input_ids[:, 0], which carries the preferred instruction as
    # --ori_type) to the target, the good and the bad model; both responses of every pair (--data_type all).
    "dual": dict(_AUTHORS_COMMON, learning_rate=9e-6, layer_band=list(PAPER_LAYERS), max_response_tokens=64,
                 stimulus_response="both", target_instruction=PREFERRED_INSTRUCTION,
                 preferred_instruction=PREFERRED_INSTRUCTION, dispreferred_instruction=PREFERRED_INSTRUCTION),
}}


@dataclass
class RAHFConfig(TrainingArguments):
    """``TrainingArguments`` plus RAHF's options.

    Defaults say where they come from: "authors" (their step-2 scripts), "ours" or "Trainer". ``preset="authors"``
    sets every method setting of the authors' script for ``method`` on the fields left at their defaults.
    """

    method: str = field(default="scit", metadata={"help": "'scit' (one instructed model) or 'dual' (good/bad)."})
    preset: str | None = field(default=None, metadata={
        "help": "'authors': the settings of the authors' step-2 script for `method` (lr, schedule, layer band, "
                "response length, stimuli, LoRA on q_proj/v_proj), applied to the fields left at their defaults."})
    lora_on: str = field(default="instructed", metadata={
        "help": "'instructed' (authors): the LoRA is trained on the step-1 model (SCIT / Dual good), which also "
                "gives A_base; 'base': on the original base, A_base from the base."})
    alpha: float = field(default=5.0, metadata={"help": "Scale of the difference vectors in the target (authors: 5)."})
    target_layers: list[int] | None = field(
        default=None, metadata={"help": "hidden_states indices; default: layer_band scaled to the model's depth."}
    )
    layer_band: list[int] = field(default_factory=lambda: list(PAPER_LAYERS), metadata={
        "help": "Target layers as indices of a 32-layer model, scaled (authors: Dual 10..20, SCIT 10..18, step 2)."})
    loss_type: str = field(default="l2", metadata={"help": "'l2' (mean per-token L2 norm, authors) or 'mse'."})
    max_response_tokens: int = field(default=64, metadata={
        "help": "First N response tokens carry the loss (authors: 64 Dual, 512 SCIT)."})
    max_prompt_length: int = field(default=512, metadata={
        "help": "Rows whose instructed prompts are longer are skipped, with a warning naming them (ours; authors: 256)."})
    preferred_instruction: str | None = field(
        default=None, metadata={"help": "Instruction of the p+ stimulus (SCIT model / good model); default: the "
                                        "paper's p+ for scit, none for dual (ours; authors' Dual: the paper's p+)."}
    )
    dispreferred_instruction: str | None = field(
        default=None, metadata={"help": "Instruction of the p- stimulus (SCIT model / bad model); default: the "
                                        "paper's p- for scit, none for dual (ours; authors' Dual: the paper's p+)."}
    )
    target_instruction: str = field(default="", metadata={
        "help": "Instruction of the stimulus the trained model and A_base see (none; authors' Dual: the paper's p+)."})
    prompt_format: str | None = field(default=None, metadata={"help": "Format with {query}; default as SCIT."})
    stimulus_response: str = field(default="chosen", metadata={
        "help": "Response of the stimuli: 'chosen' (ours), 'rejected', 'both' (authors' Dual) or 'random' (one of "
                "the two per pair, seeded by `seed`; authors' SCIT)."})
    precomputed_targets: str | None = field(
        default=None, metadata={"help": "Folder written by precompute_targets(); no instructed model needed."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank when no peft_config is given (authors: 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (authors: 16)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (authors: 0.05)."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Default: all linear layers (ours; authors: q_proj, v_proj)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Recorded in the model card."})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub id of the base model, recorded in adapter_config.json and the card; default: taken from the "
                "model (the embedded model is HuggingFaceTB/SmolLM2-135M-Instruct). Needed to push an adapter "
                "trained on a local folder whose config records no Hub id."})
    save_as: str = field(default="adapter", metadata={
        "help": "What save_pretrained / save_model / push_to_hub write: 'adapter' (one LoRA that plain peft loads "
                "as the trained model, the step-1 adapter folded in), 'merged' (a plain transformers model) or "
                "'stacked' (the RAHF LoRA alone, to load on top of its step-1 adapter)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "RAHF needs its own columns."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "LoRA is limited to layers below the top target, so all are used."}
    )

    def __post_init__(self):
        self._apply_preset()
        super().__post_init__()
        choices = {"method": ("scit", "dual"), "loss_type": ("l2", "mse"), "lora_on": ("instructed", "base"),
                   "stimulus_response": ("chosen", "rejected", "both", "random"),
                   "save_as": SAVE_AS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        require_number("alpha", self.alpha, low=0.0)
        require_training_numbers(self)
        require_number("max_response_tokens", self.max_response_tokens, low=1, integer=True)
        require_number("max_prompt_length", self.max_prompt_length, low=1, integer=True)
        require_number("lora_r", self.lora_r, low=1, integer=True)
        require_number("lora_alpha", self.lora_alpha, low=0.0)
        require_number("lora_dropout", self.lora_dropout, low=0.0, high=0.99)
        for name in ("target_layers", "layer_band"):
            layers = getattr(self, name)
            if layers is None:
                continue
            if not layers or len(set(layers)) != len(layers):
                raise ValueError(f"{name} must be a non-empty list without repeats, got {layers!r}.")
            for layer in layers:
                require_number(f"{name} entry", layer, integer=True, **({"low": 1, "high": 32}
                                                                       if name == "layer_band" else {}))
        if self.target_layers is not None and 0 in self.target_layers:
            raise ValueError("target layer 0 is the embedding output, which a LoRA on the decoder cannot move; "
                             "choose indices >= 1.")
        scit = self.method == "scit"
        if self.preferred_instruction is None:
            self.preferred_instruction = PREFERRED_INSTRUCTION if scit else ""
        if self.dispreferred_instruction is None:
            self.dispreferred_instruction = DISPREFERRED_INSTRUCTION if scit else ""

    def _apply_preset(self) -> None:
        if self.preset is None:
            return
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {self.preset!r}.")
        if self.method not in PRESETS[self.preset]:
            raise ValueError(f"method must be one of {sorted(PRESETS[self.preset])} for preset {self.preset!r}, "
                             f"got {self.method!r}.")
        defaults = {f.name: f.default if f.default is not MISSING else f.default_factory()
                    for f in fields(self) if f.default is not MISSING or f.default_factory is not MISSING}
        applied, kept = [], []
        for name, value in PRESETS[self.preset][self.method].items():
            if getattr(self, name) == defaults[name]:
                setattr(self, name, copy.deepcopy(value))
                applied.append(name)
            elif getattr(self, name) != value:
                kept.append(name)
        logger.info(f"RAHF preset {self.preset!r} ({self.method}) set {', '.join(applied) or 'nothing'}"
                    + (f"; kept your {', '.join(kept)}" if kept else "") + ".")
