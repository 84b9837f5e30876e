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
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel

from hf_repalign.data_files import read_jsonl, read_truthfulqa_mc, shared_data_dir
from hf_repalign.formats import PreferenceFormatError, encode_pair, to_triplet
from hf_repalign.models import load_model_and_tokenizer
from hf_repalign.rahf import DualConfig, RAHFConfig, RAHFTrainer, SCITConfig, SCITTrainer, train_dual
from hf_repalign.rahf.instructions import instructed_template
from hf_repalign.rahf.scit import response_logps

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
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (seq, n) in enumerate(encoded):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, n : len(seq)] = torch.tensor(seq[n:])
        logits = model(input_ids=ids, attention_mask=mask).logits
        out += response_logps(logits, labels, normalize).tolist()
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


def evaluate(name, model, tokenizer, held, questions, results):
    model.eval()
    start = time.time()
    results[name] = {"preference_accuracy": preference_accuracy(model, tokenizer, held),
                     "truthfulqa_mc1": truthfulqa_mc1(model, tokenizer, questions)}
    print(f"[{name}] {results[name]} ({time.time() - start:.0f} s)", flush=True)


def common(args, out, **kw):
    return dict(output_dir=str(out), per_device_train_batch_size=args.batch_size, report_to="none", use_cpu=True,
                save_strategy="no", logging_steps=1, seed=args.seed, lr_scheduler_type="constant", **kw)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/rahf_real_data")
    parser.add_argument("--work", default="outputs/rahf_real_data")
    parser.add_argument("--train_rows", type=int, default=60)
    parser.add_argument("--eval_pairs", type=int, default=60)
    parser.add_argument("--mc1_questions", type=int, default=50)
    parser.add_argument("--step1_steps", type=int, default=12)
    parser.add_argument("--rahf_steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--max_prompt_tokens", type=int, default=128)
    parser.add_argument("--max_response_tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    work, out = Path(args.work), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_model_and_tokenizer()
    train, held, total, cut = load_pairs(args, tokenizer)
    questions = read_truthfulqa_mc(shared_data_dir() / "truthfulqa/mc_task.json")[: args.mc1_questions]
    print(f"HH helpful-base: {total} rows, train part {cut} -> {len(train)} short pairs used; held-out part "
          f"{total - cut} -> {len(held)} short pairs evaluated; TruthfulQA MC1: {len(questions)} questions", flush=True)
    results, curves, timings = {}, {}, {}
    evaluate("base", base, tokenizer, held, questions, results)
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")

    start = time.time()
    scit = SCITTrainer(load_model_and_tokenizer()[0].train(), SCITConfig(**common(
        args, work / "scit", max_steps=args.step1_steps, learning_rate=2e-4)), train_dataset=train,
        processing_class=tokenizer, peft_config=LoraConfig(**lora))
    scit.train()
    scit.model.save_pretrained(str(work / "scit_adapter"))
    curves["SCIT (Eq. 1)"] = [e["loss"] for e in scit.state.log_history if "loss" in e]
    timings["scit"] = time.time() - start
    print(f"SCIT trained in {timings['scit']:.0f} s", flush=True)

    start = time.time()
    folders = train_dual(load_model_and_tokenizer()[0].train(), tokenizer, train, DualConfig(**common(
        args, work / "dual", max_steps=args.step1_steps, learning_rate=2e-4), max_length=None,
        gradient_checkpointing=False), peft_config=LoraConfig(**lora))
    timings["dual"] = time.time() - start
    print(f"Dual trained in {timings['dual']:.0f} s", flush=True)
    for side in ("good", "bad"):
        state = json.loads((folders[side] / "trainer_state.json").read_text())
        curves[f"Dual {side} (SFT)"] = [e["loss"] for e in state["log_history"] if "loss" in e]

    for method, instructed in (("scit", str(work / "scit_adapter")),
                               ("dual", (str(folders["good"]), str(folders["bad"])))):
        start = time.time()
        trainer = RAHFTrainer(load_model_and_tokenizer()[0].train(), RAHFConfig(**common(
            args, work / f"rahf_{method}", max_steps=args.rahf_steps, learning_rate=2e-4), method=method,
            alpha=args.alpha, dataset_name="Anthropic HH-RLHF helpful-base (80% split)"),
            train_dataset=train, processing_class=tokenizer, instructed=instructed)
        trainer.train()
        timings[f"rahf_{method}"] = time.time() - start
        curves[f"RAHF after {method.upper()}"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        trainer.save_pretrained(work / f"rahf_{method}_adapter")
        tuned = PeftModel.from_pretrained(load_model_and_tokenizer()[0], str(work / f"rahf_{method}_adapter"))
        evaluate(f"{method.upper()} -> RAHF", tuned, tokenizer, held, questions, results)

    summary = {"args": vars(args), "rows": {"total": total, "train_part": cut, "train_used": len(train),
               "heldout_used": len(held), "mc1_questions": len(questions)}, "results": results,
               "train_seconds": timings, "curves": curves}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(curves, out.with_suffix(".png"))
    print(json.dumps({"results": results, "train_seconds": timings}, indent=1))


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
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
