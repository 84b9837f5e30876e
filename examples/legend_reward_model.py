"""LEGEND end to end on the embedded model: fit a margin vector, annotate preferences, train a LoRA reward model.

1. ``MarginVector.induce``: SmolLM2-135M-Instruct answers a few AdvBench goals (greedy); those answers are the
   harmful side, "I can't answer that." the harmless side.
2. ``pipeline("legend-margin")`` annotates HH-RLHF harmless-base pairs with ``margin_raw`` and binned ``margin``.
3. ``trl.RewardTrainer`` trains a LoRA + score-head reward model on the annotated dataset as is: TRL reads the
   ``margin`` column and uses ``-logsigmoid(r_chosen - r_rejected - margin)``.

    .venv/bin/python examples/legend_reward_model.py --goals 8 --pairs 32 --steps 4 [--data PATH]

Data: ``--data PATH`` or ``$HF_REPALIGN_DATA`` (a folder with ``advbench/harmful_behaviors.csv`` and
``hh-rlhf/harmless-base/test.jsonl.gz``), else the Hub sets (``walledai/AdvBench``, ``Anthropic/hh-rlhf``), else the
small sample shipped with hf_repalign. Writes the margin vector, the annotated pairs and the LoRA reward model
under ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, pipeline
from trl import RewardConfig, RewardTrainer

import hf_repalign  # noqa: F401  (registers "legend-margin")
from hf_repalign.data_files import DataNotFoundError, add_data_argument, load_advbench, load_hh_rlhf
from hf_repalign.legend import MarginVector, usable_rows
from hf_repalign.models import embedded_model_path, load_model_and_tokenizer


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goals", type=int, default=8, help="AdvBench goals for the vector")
    parser.add_argument("--pairs", type=int, default=32, help="HH-RLHF harmless-base pairs to annotate")
    parser.add_argument("--steps", type=int, default=4, help="reward-model training steps")
    parser.add_argument("--max_new_tokens", type=int, default=24, help="length of the model's harmful answers")
    parser.add_argument("--max_chars", type=int, default=600, help="keep HH dialogues shorter than this")
    parser.add_argument("--out", type=Path, default=Path("outputs/legend_example"))
    add_data_argument(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        goals = load_advbench(args.data)[: args.goals]
        hh_rows = load_hh_rlhf("harmless-base", args.data)
    except DataNotFoundError as err:
        parser.error(str(err))

    model, tokenizer = load_model_and_tokenizer()
    vec = MarginVector.induce(model, tokenizer, goals, max_new_tokens=args.max_new_tokens,
                              generation_batch_size=len(goals))
    vec.save_pretrained(args.out / "margin-vector")
    print(vec)

    rows, errors = usable_rows(hh_rows)
    print(f"dropped {len(errors)} unusable HH-RLHF rows, e.g. {errors[:1]}")
    # Short dialogues keep the example quick; filter explicitly rather than truncate silently.
    hh = [r for r in rows if max(len(r["chosen"]), len(r["rejected"])) < args.max_chars][: args.pairs]
    pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, batch_size=8)
    annotated = pipe.annotate(hh, num_bins=10, output=args.out / "annotated.jsonl")
    share = sum(m > 0 for m in annotated["margin_raw"]) / len(annotated)
    print(f"annotated {len(annotated)} pairs; margin_raw > 0 for {share:.0%}; columns {annotated.column_names}")

    reward_model = AutoModelForSequenceClassification.from_pretrained(str(embedded_model_path()), num_labels=1)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(
        model=reward_model,
        args=RewardConfig(output_dir=str(args.out / "reward-model"), max_steps=args.steps,
                          per_device_train_batch_size=4, learning_rate=2e-4, logging_steps=1, report_to=[],
                          save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0,
                          # TRL's default bf16 is emulated, and many times slower, on CPUs without native bf16
                          bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
                          gradient_checkpointing=False),  # small model: recomputing activations only costs time
        train_dataset=annotated,  # as is: `margin` is read by the loss, other columns are dropped
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, task_type="SEQ_CLS", modules_to_save=["score"],
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print("losses:", [round(loss, 4) for loss in losses])
    # A PEFT adapter (LoRA + score head): AutoPeftModelForSequenceClassification.from_pretrained(folder) loads it.
    trainer.model.save_pretrained(args.out / "reward-model")
    tokenizer.save_pretrained(args.out / "reward-model")
    print(f"wrote {args.out / 'margin-vector'}, {args.out / 'annotated.jsonl'} and {args.out / 'reward-model'}")
    return losses


if __name__ == "__main__":
    main()
