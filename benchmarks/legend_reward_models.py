"""LEGEND's Table-1 analogue at small scale: reward models trained with and without the binned margins.

Reads the harmless-base rows annotated by ``legend_real_data.py``, splits them 80/20 (seed 0), trains two LoRA +
score-head reward models on the embedded SmolLM2-135M-Instruct with ``trl.RewardTrainer`` (same seed, steps and
data; the only difference is the ``margin`` column), and reports pairwise accuracy on the held-out 20%.

TRL drops pairs longer than ``max_length``; to keep the two runs on identical data we keep only pairs that fit
before splitting, and report how many that is.

    nice -n 10 .venv/bin/python benchmarks/legend_reward_models.py --max_length 160
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from hf_repalign.data_files import read_jsonl
from hf_repalign.models import embedded_model_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_json  # noqa: E402


def load_rows(path: Path, tokenizer, max_length: int) -> tuple[list[dict], int]:
    rows = read_jsonl(path)
    fits = [r for r in rows if max(len(tokenizer(r[k])["input_ids"]) for k in ("chosen", "rejected")) <= max_length]
    return fits, len(rows)


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[dict], bf16: bool = False) -> float:
    model.eval()
    wins = 0
    for row in rows:
        batch = tokenizer([row["chosen"], row["rejected"]], return_tensors="pt", padding=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            scores = model(**batch).logits.squeeze(-1).float()
        wins += int(scores[0] > scores[1])
    return wins / len(rows)


def train(train_rows, eval_rows, tokenizer, use_margin: bool, args) -> dict:
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(embedded_model_path()), num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    columns = ["chosen", "rejected"] + (["margin"] if use_margin else [])
    dataset = Dataset.from_list([{k: r[k] for k in columns} for r in train_rows])
    config = RewardConfig(
        output_dir=str(args.out / ("with_margin" if use_margin else "no_margin")), num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, max_length=args.max_length,
        seed=args.seed, data_seed=args.seed, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, bf16=args.bf16,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="SEQ_CLS",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=["score"])
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"eval_accuracy": round(accuracy(trainer.model, tokenizer, eval_rows, args.bf16), 4), "train_steps":
            trainer.state.global_step, "train_seconds": round(seconds, 1), "logged_losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotated", type=Path, default=Path("outputs/legend_real_data/harmless-base.jsonl"))
    parser.add_argument("--max_length", type=int, default=160)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training (fast on AVX512-BF16)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("outputs/legend_reward_models"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_path()))
    rows, total = load_rows(args.annotated, tokenizer, args.max_length)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    cut = int(0.8 * len(rows))
    train_rows, eval_rows = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    report = {"annotated_rows": total, f"rows_within_{args.max_length}_tokens": len(rows),
              "train_pairs": len(train_rows), "eval_pairs": len(eval_rows), "args": {k: str(v) for k, v in vars(args).items()}}
    for use_margin in (False, True):
        report["with_margin" if use_margin else "no_margin"] = train(train_rows, eval_rows, tokenizer, use_margin, args)
        print(json.dumps(report, indent=2), flush=True)
    write_json(args.out / "report.json", report)


if __name__ == "__main__":
    main()
