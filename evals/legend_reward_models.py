"""LEGEND's Table-1 analogue at small scale: reward models trained with and without the binned margins, several
seeds, with confidence intervals.

1. Take HH-RLHF harmless-base test pairs whose chosen and rejected dialogues (plain HH text, as TRL tokenizes them)
   fit in ``--max_length`` tokens (TRL would drop longer ones, and the two conditions must see identical data), and
   split them once (seed 0) into ``--train`` training and ``--eval`` held-out pairs.
2. Annotate the training pairs with a margin vector (``--vector`` folder, or ``--directions`` + ``--view`` from
   ``legend_evidence.py``) through ``pipe.annotate`` (10 equal-frequency bins).
3. For each seed, train two LoRA + score-head reward models on the embedded SmolLM2-135M-Instruct with
   ``trl.RewardTrainer`` -- identical but for the ``margin`` column -- and measure pairwise accuracy on the held-out
   pairs.
4. Report each run's accuracy (95% Wilson interval), the per-seed paired difference, the mean difference with a
   95% bootstrap interval (eval pairs resampled, averaged over seeds), how many eval pairs change outcome, and the
   effect an unpaired comparison of this size could resolve (1.96 standard errors).

    OMP_NUM_THREADS=1 .venv/bin/python evals/legend_reward_models.py --data PATH \\
        --directions outputs/legend_evidence/directions.pt --view=-1:last --train 240 --eval 400 --seeds 0 1 2 \\
        --max_length 128 --bf16 --threads 1
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
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
from trl import RewardConfig, RewardTrainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from common import write_json  # noqa: E402
from legend_evidence import wilson  # noqa: E402

import hf_repalign  # noqa: E402, F401
from hf_repalign.data_files import add_data_argument, load_hh_rlhf  # noqa: E402
from hf_repalign.formats import to_triplet  # noqa: E402
from hf_repalign.legend.embedding import encode_triplets, response_length  # noqa: E402
from hf_repalign.legend import MarginVector, usable_rows  # noqa: E402
from hf_repalign.hub import EMBEDDED_HUB_ID  # noqa: E402
from hf_repalign.models import embedded_model_path, load_model_and_tokenizer  # noqa: E402


def fitting_rows(data: Path | None, tokenizer, max_length: int) -> tuple[list[dict], int]:
    rows, _ = usable_rows(load_hh_rlhf("harmless-base", data))
    lengths = {k: [len(ids) for ids in tokenizer([r[k] for r in rows])["input_ids"]] for k in ("chosen", "rejected")}
    # TRL appends an EOS token before its own length filter: leave room for it so no pair is dropped there.
    fits = [r for i, r in enumerate(rows) if max(lengths["chosen"][i], lengths["rejected"][i]) < max_length - 1]
    return fits, len(rows)


def load_vector(args) -> MarginVector:
    if args.vector is not None:
        return MarginVector.from_pretrained(args.vector)
    directions = torch.load(args.directions)
    layer, pooling = args.view.split(":")
    return MarginVector(directions[args.view], layer=int(layer), pooling=pooling,
                        model_name_or_path=EMBEDDED_HUB_ID)


@torch.no_grad()
def wins(model, tokenizer, rows: list[dict], bf16: bool, batch_size: int = 16) -> list[int]:
    """1 where the held-out pair's chosen response scores higher, per pair."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            batch = tokenizer([r["chosen"] for r in part] + [r["rejected"] for r in part], return_tensors="pt",
                              padding=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                scores = model(**batch).logits.squeeze(-1).float()
            out.extend(int(c > r) for c, r in zip(scores[: len(part)], scores[len(part) :]))
    finally:
        tokenizer.padding_side = side
    return out


def train(train_rows, eval_rows, tokenizer, use_margin: bool, seed: int, args) -> dict:
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(embedded_model_path()), num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    columns = ["chosen", "rejected"] + (["margin"] if use_margin else [])
    dataset = Dataset.from_list([{k: r[k] for k in columns} for r in train_rows])
    config = RewardConfig(
        output_dir=str(args.out / f"{'with' if use_margin else 'no'}_margin_seed{seed}"), num_train_epochs=1,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, max_length=args.max_length,
        seed=seed, data_seed=seed, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, bf16=args.bf16,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="SEQ_CLS",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=["score"])
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    won = wins(trainer.model, tokenizer, eval_rows, args.bf16)
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    return {"wins": won, "accuracy": round(sum(won) / len(won), 4), "ci95": wilson(sum(won), len(won)),
            "train_steps": trainer.state.global_step, "train_seconds": round(seconds, 1), "logged_losses": losses}


def bootstrap_difference(with_wins: list[list[int]], without_wins: list[list[int]], samples: int = 4000):
    """Mean over seeds of (accuracy with - without), and its 95% interval from resampling the eval pairs."""
    with_t = torch.tensor(with_wins, dtype=torch.float64)  # (seeds, pairs)
    without_t = torch.tensor(without_wins, dtype=torch.float64)
    diff = (with_t - without_t).mean(dim=0)  # per eval pair, averaged over seeds
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, diff.numel(), (samples, diff.numel()), generator=generator)
    means = diff[idx].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return round(float(diff.mean()), 4), (round(low, 4), round(high, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vector", type=Path, default=None, help="a saved MarginVector folder")
    parser.add_argument("--directions", type=Path, default=None, help="directions.pt from legend_evidence.py")
    parser.add_argument("--view", default="-1:last", help="layer:pooling key in --directions")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on AVX512-BF16 CPUs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs/legend_reward_models"))
    add_data_argument(parser)
    parser.add_argument("--summarize", type=Path, default=None, help="only recompute the summary of a report.json")
    args = parser.parse_args()
    if args.summarize is None and (args.vector is None) == (args.directions is None):
        parser.error("give exactly one of --vector and --directions")
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_path()))
    rows, total = fitting_rows(args.data, tokenizer, args.max_length)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    if args.train + args.eval > len(rows):
        parser.error(f"only {len(rows)} pairs fit in {args.max_length} tokens; lower --train/--eval")
    train_rows = [rows[i] for i in order[: args.train]]
    eval_rows = [rows[i] for i in order[args.train : args.train + args.eval]]
    if args.summarize is not None:  # the same split as the run that wrote the report
        report = json.loads(args.summarize.read_text())
        summarize(report, args.seeds, length_differences(tokenizer, eval_rows))
        write_json(args.summarize, report)
        print(json.dumps({k: report[k] for k in ("difference_with_minus_without", "length_baseline")}))
        return

    vector = load_vector(args)
    model, annotator_tokenizer = load_model_and_tokenizer(dtype=torch.bfloat16 if args.bf16 else None)
    pipe = pipeline("legend-margin", model=model, tokenizer=annotator_tokenizer, margin_vector=vector, device="cpu")
    start = time.perf_counter()
    annotated, diagnostics = pipe.annotate(train_rows, num_bins=10, with_diagnostics=True, progress=False)
    train_rows = annotated.to_list()
    report = {"usable_rows": total, f"rows_within_{args.max_length}_tokens": len(rows), "train_pairs": len(train_rows),
              "eval_pairs": len(eval_rows), "vector": repr(vector), "annotate_seconds":
              round(time.perf_counter() - start, 1), "length_diagnostics": diagnostics,
              "train_margin_raw_positive": round(sum(r["margin_raw"] > 0 for r in train_rows) / len(train_rows), 4),
              "args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    del model, pipe
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)

    for seed in args.seeds:
        for use_margin in (False, True):
            result = train(train_rows, eval_rows, tokenizer, use_margin, seed, args)
            report["runs"][f"{'with' if use_margin else 'no'}_margin_seed{seed}"] = result
            print(seed, use_margin, {k: v for k, v in result.items() if k != "wins"}, flush=True)
            write_json(args.out / "report.json", report)
    summarize(report, args.seeds, length_differences(tokenizer, eval_rows))
    write_json(args.out / "report.json", report)
    print(json.dumps({k: report[k] for k in ("difference_with_minus_without", "length_baseline")}), flush=True)


def length_differences(tokenizer, rows: list[dict]) -> list[int]:
    """Response tokens of chosen minus rejected (the annotator's text normalisation), per held-out pair."""
    items = [item for item, _ in encode_triplets(tokenizer, [to_triplet(r, i) for i, r in enumerate(rows)])]
    return [response_length(item, "chosen") - response_length(item, "rejected") for item in items]


def summarize(report: dict, seeds: list[int], length_diff: list[int]) -> None:
    """The with-minus-without difference, its paired bootstrap interval, and the effect an unpaired comparison of
    this size could resolve (1.96 standard errors of a difference of two accuracies over all seeds' eval pairs);
    the length-only baseline ("the shorter response is better") on the held-out pairs, and every run's accuracy
    on the pairs whose chosen response is shorter / longer."""
    shorter = [i for i, d in enumerate(length_diff) if d < 0]
    longer = [i for i, d in enumerate(length_diff) if d > 0]
    score = sum(1.0 if d < 0 else 0.5 if d == 0 else 0.0 for d in length_diff)
    report["length_baseline"] = {"accuracy": round(score / len(length_diff), 4),
                                 "ci95": wilson(score, len(length_diff)), "chosen_shorter": len(shorter),
                                 "chosen_longer": len(longer)}
    for run in report["runs"].values():
        run["accuracy_chosen_shorter"] = round(sum(run["wins"][i] for i in shorter) / max(len(shorter), 1), 4)
        run["accuracy_chosen_longer"] = round(sum(run["wins"][i] for i in longer) / max(len(longer), 1), 4)
    with_wins = [report["runs"][f"with_margin_seed{s}"]["wins"] for s in seeds]
    without_wins = [report["runs"][f"no_margin_seed{s}"]["wins"] for s in seeds]
    mean, ci = bootstrap_difference(with_wins, without_wins)
    n = sum(len(w) for w in with_wins)
    p = (sum(map(sum, with_wins)) + sum(map(sum, without_wins))) / (2 * n)
    report["difference_with_minus_without"] = {
        "per_seed": [round((sum(w) - sum(o)) / len(w), 4) for w, o in zip(with_wins, without_wins)],
        "mean": mean, "paired_bootstrap_ci95": ci,
        "eval_pairs_whose_outcome_differs": [sum(a != b for a, b in zip(w, o))
                                             for w, o in zip(with_wins, without_wins)],
        "seed_spread_without": round(max(map(sum, without_wins)) / len(without_wins[0])
                                     - min(map(sum, without_wins)) / len(without_wins[0]), 4),
        "unpaired_resolvable_effect": round(1.96 * (2 * p * (1 - p) / n) ** 0.5, 4)}


if __name__ == "__main__":
    main()
