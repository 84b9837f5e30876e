"""Real-data check of RAHF (issue section 6): HH-RLHF helpful-base with the embedded SmolLM2-135M-Instruct.

Deterministic 80/20 split (seeded permutation) of ``helpful-base/test.jsonl.gz`` (the only helpful-base split in
``../shared/data``). Runs SCIT -> RAHF and Dual -> RAHF on the train part and reports, on the held-out part,
before and after:

* preference accuracy: share of pairs whose chosen response has the higher length-normalised log-likelihood
  than the rejected one, given the prompt without instruction;
* TruthfulQA MC1: share of questions whose best (summed log-likelihood) answer is the true one.

To fit the CPU budget, only pairs whose prompt and responses are short are used (``--max_prompt_tokens``,
``--max_response_tokens``), and the step counts are small; the flags say how many.

    nice -n 10 .venv/bin/python benchmarks/rahf_real_data.py --out docs/img/rahf_real_data

``--bf16`` trains with bfloat16 autocast (the Trainer's ``bf16=True``) and evaluates under the same autocast:
about 3x faster on a CPU with AVX512-BF16, which buys a larger budget in the same hour.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel

from hf_repalign.data_files import read_jsonl, read_truthfulqa_mc, shared_data_dir
from hf_repalign.formats import PreferenceFormatError, encode_pair, to_triplet
from hf_repalign.models import load_model_and_tokenizer
from hf_repalign.rahf import DualConfig, RAHFConfig, RAHFTrainer, SCITConfig, SCITTrainer, train_dual
from hf_repalign.rahf.instructions import instructed_template
from hf_repalign.rahf.scit import pad_with_response_labels, response_logps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save_figure, write_json  # noqa: E402

def load_pairs(args, tokenizer):
    rows = read_jsonl(shared_data_dir() / "hh-rlhf/helpful-base/test.jsonl.gz")
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    cut = int(0.8 * len(rows))
    template = instructed_template(tokenizer)

    skipped = []

    def short(index):
        try:
            triplet = to_triplet(rows[index], index)
        except PreferenceFormatError:  # a few HH rows have no shared prompt or an empty response
            skipped.append(index)
            return False
        for response in (triplet.chosen, triplet.rejected):
            ids, n = encode_pair(tokenizer, triplet.prompt, response, template)
            if n > args.max_prompt_tokens or len(ids) - n > args.max_response_tokens:
                return False
        return True

    train = list(itertools.islice((rows[i] for i in order[:cut] if short(i)), args.train_rows))
    held = list(itertools.islice((rows[i] for i in order[cut:] if short(i)), args.eval_pairs))
    if skipped:
        print(f"skipped {len(skipped)} malformed HH rows while selecting: {skipped}", flush=True)
    return train, held, len(rows), cut


@torch.no_grad()
def loglik(model, tokenizer, items, normalize, batch_size=8):
    """Log-likelihood of each (prompt, response), no instruction, batched with right padding."""
    template = instructed_template(tokenizer)
    out = []
    for start in range(0, len(items), batch_size):
        encoded = [encode_pair(tokenizer, p, r, template) for p, r in items[start : start + batch_size]]
        batch = pad_with_response_labels(encoded, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        out += response_logps(logits, batch["labels"], normalize).tolist()
    return out


def preference_accuracy(model, tokenizer, held):
    triplets = [to_triplet(row, i) for i, row in enumerate(held)]
    chosen = loglik(model, tokenizer, [(t.prompt, t.chosen) for t in triplets], True)
    rejected = loglik(model, tokenizer, [(t.prompt, t.rejected) for t in triplets], True)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(triplets)


def truthfulqa_mc1(model, tokenizer, questions):
    correct = 0
    for q in questions:
        answers = list(q["mc1_targets"])
        scores = loglik(model, tokenizer, [(q["question"], a) for a in answers], False)
        correct += q["mc1_targets"][answers[max(range(len(answers)), key=scores.__getitem__)]] == 1
    return correct / len(questions)


STAGES = ("base", "scit", "dual", "rahf_scit", "rahf_dual", "report")


def evaluate(name, model, tokenizer, held, questions, work, bf16=False):
    model.eval()
    start = time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        result = {"preference_accuracy": preference_accuracy(model, tokenizer, held),
                  "truthfulqa_mc1": truthfulqa_mc1(model, tokenizer, questions), "seconds": time.time() - start}
    write_json(work / f"result_{name}.json", result)
    print(f"[{name}] {result}", flush=True)


def save_curve(work, name, log_history, seconds):
    curve = {"loss": [e["loss"] for e in log_history if "loss" in e], "seconds": seconds}
    write_json(work / f"curve_{name}.json", curve)


def common(args, out, **kw):
    return dict(output_dir=str(out), per_device_train_batch_size=args.batch_size, report_to="none", use_cpu=True,
                save_strategy="no", logging_steps=1, seed=args.seed, lr_scheduler_type="constant", bf16=args.bf16,
                **kw)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/rahf_real_data")
    parser.add_argument("--work", default="outputs/rahf_real_data")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="run these stages; each saves its result in --work, so stages can run in parallel "
                             "processes and 'report' gathers them")
    parser.add_argument("--train_rows", type=int, default=60)
    parser.add_argument("--eval_pairs", type=int, default=60)
    parser.add_argument("--mc1_questions", type=int, default=50)
    parser.add_argument("--step1_steps", type=int, default=12)
    parser.add_argument("--rahf_steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--max_prompt_tokens", type=int, default=128)
    parser.add_argument("--max_response_tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training and evaluation")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_model_and_tokenizer()
    train, held, total, cut = load_pairs(args, tokenizer)
    questions = read_truthfulqa_mc(shared_data_dir() / "truthfulqa/mc_task.json")[: args.mc1_questions]
    rows = {"total": total, "train_part": cut, "train_used": len(train), "heldout_used": len(held),
            "mc1_questions": len(questions)}
    print(f"HH helpful-base: {rows}", flush=True)
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    fresh = lambda: load_model_and_tokenizer()[0].train()  # noqa: E731

    if "base" in args.stages:
        evaluate("base", base, tokenizer, held, questions, work, args.bf16)
    if "scit" in args.stages:
        start = time.time()
        scit = SCITTrainer(fresh(), SCITConfig(**common(args, work / "scit", max_steps=args.step1_steps,
                                                        learning_rate=args.lr)),
                           train_dataset=train, processing_class=tokenizer, peft_config=LoraConfig(**lora))
        scit.train()
        scit.model.save_pretrained(str(work / "scit_adapter"))
        save_curve(work, "SCIT (Eq. 1)", scit.state.log_history, time.time() - start)
    if "dual" in args.stages:
        start = time.time()
        folders = train_dual(fresh(), tokenizer, train, DualConfig(**common(
            args, work / "dual", max_steps=args.step1_steps, learning_rate=args.lr), max_length=None,
            gradient_checkpointing=False), peft_config=LoraConfig(**lora))
        for side in ("good", "bad"):
            state = json.loads((folders[side] / "trainer_state.json").read_text())
            save_curve(work, f"Dual {side} (SFT)", state["log_history"], time.time() - start)
    for method in ("scit", "dual"):
        if f"rahf_{method}" not in args.stages:
            continue
        instructed = str(work / "scit_adapter") if method == "scit" else (str(work / "dual" / "good"),
                                                                          str(work / "dual" / "bad"))
        start = time.time()
        trainer = RAHFTrainer(fresh(), RAHFConfig(**common(
            args, work / f"rahf_{method}", max_steps=args.rahf_steps, learning_rate=args.lr), method=method,
            alpha=args.alpha, dataset_name="Anthropic HH-RLHF helpful-base (80% split)"),
            train_dataset=train, processing_class=tokenizer, instructed=instructed)
        trainer.train()
        save_curve(work, f"RAHF after {method.upper()}", trainer.state.log_history, time.time() - start)
        trainer.save_pretrained(work / f"rahf_{method}_adapter")
        tuned = PeftModel.from_pretrained(load_model_and_tokenizer()[0], str(work / f"rahf_{method}_adapter"))
        evaluate(f"{method.upper()} -> RAHF", tuned, tokenizer, held, questions, work, args.bf16)
    if "report" in args.stages:
        results = {f.stem[len("result_"):]: json.loads(f.read_text()) for f in sorted(work.glob("result_*.json"))}
        order = ["SCIT (Eq. 1)", "Dual good (SFT)", "Dual bad (SFT)", "RAHF after SCIT", "RAHF after DUAL"]
        curves = {n: json.loads((work / f"curve_{n}.json").read_text()) for n in order
                  if (work / f"curve_{n}.json").is_file()}
        summary = {"args": vars(args), "rows": rows, "results": results, "curves": curves}
        write_json(out.with_suffix(".json"), summary)
        plot({n: c["loss"] for n, c in curves.items()}, out.with_suffix(".png"))
        print(json.dumps(results, indent=1))


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2))
    for ax, (name, values) in zip(axes, curves.items()):
        ax.plot(range(1, len(values) + 1), values)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss")
    fig.suptitle("RAHF on HH-RLHF helpful-base, SmolLM2-135M-Instruct (CPU)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
