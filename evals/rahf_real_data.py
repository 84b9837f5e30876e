"""Real-data check of RAHF: HH-RLHF helpful-base with the embedded SmolLM2-135M-Instruct, both arrangements.

Deterministic 80/20 split (seeded permutation) of ``helpful-base/test.jsonl.gz`` (the only helpful-base split in
the data folder). Trains SCIT and Dual (step 1, LoRA adapters) on the train part, then RAHF four times: after SCIT
and after Dual, each with the LoRA on the base (``lora_on="base"``) and on the step-1 model (``"instructed"``, the
authors' arrangement). Reports, on the held-out part:

* preference accuracy of base / step-1 / RAHF models: share of pairs whose chosen response has the higher
  length-normalised log-likelihood than the rejected one, given the prompt without instruction;
* TruthfulQA MC1: share of questions whose best (summed log-likelihood) answer is the true one;
* for every RAHF run, on a fixed held-out set of stimuli before and after training, per target layer: the RAHF
  loss (mean per-token ``||A_lora - (A_base + alpha v)||``), the relative distance
  ``||A_lora - (A_base + alpha v)|| / ||alpha v||`` (1 before training: a fresh LoRA leaves A_lora = A_base) and the
  cosine between the LoRA's shift ``A_lora - A_base`` and ``alpha v``.

95% confidence intervals: Wilson for each accuracy; for the change against the base model, the normal interval of
the paired per-item differences (the same pairs / questions for every model).

RAHF runs use the authors' preset (``preset="authors"``: LoRA on q_proj/v_proj, their layer band, stimuli and
response choice, constant schedule) except the learning rate and the step count, which the CPU budget sets.
``--bf16`` trains with bfloat16 autocast (the Trainer's ``bf16=True``) and evaluates under the same autocast.

    HF_REPALIGN_DATA=PATH nice -n 5 python evals/rahf_real_data.py --bf16 --threads 1 \\
        --work outputs/rahf_real_data --out docs/img/rahf_real_data
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel

from hf_repalign.data_files import add_data_argument, load_hh_rlhf, load_truthfulqa_mc
from hf_repalign.formats import PreferenceFormatError, encode_pair, to_triplet
from hf_repalign.models import load_model_and_tokenizer
from hf_repalign.rahf import (
    DualConfig,
    RAHFConfig,
    RAHFTrainer,
    SCITConfig,
    SCITTrainer,
    train_dual,
)
from hf_repalign.rahf.instructions import instructed_template
from hf_repalign.rahf.scit import pad_with_response_labels, response_logps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from common import save_figure, write_json  # noqa: E402

RAHF_RUNS = [f"rahf_{m}_{a}" for m in ("scit", "dual") for a in ("base", "instructed")]
STAGES = ("base", "scit", "dual", *RAHF_RUNS, "report")


def load_pairs(args, tokenizer):
    rows = load_hh_rlhf("helpful-base", args.data)
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
    held = list(itertools.islice((rows[i] for i in order[cut:] if short(i)), args.eval_pairs + args.probe_pairs))
    if skipped:
        print(f"skipped {len(skipped)} malformed HH rows while selecting: {skipped}", flush=True)
    # The probe set (representation distances) and the accuracy set are disjoint held-out pairs.
    return train, held[: args.eval_pairs], held[args.eval_pairs:], len(rows), cut


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


def preference_correct(model, tokenizer, held):
    triplets = [to_triplet(row, i) for i, row in enumerate(held)]
    chosen = loglik(model, tokenizer, [(t.prompt, t.chosen) for t in triplets], True)
    rejected = loglik(model, tokenizer, [(t.prompt, t.rejected) for t in triplets], True)
    return [int(c > r) for c, r in zip(chosen, rejected)]


def mc1_correct(model, tokenizer, questions):
    out = []
    for q in questions:
        answers = list(q["mc1_targets"])
        scores = loglik(model, tokenizer, [(q["question"], a) for a in answers], False)
        out.append(int(q["mc1_targets"][answers[max(range(len(answers)), key=scores.__getitem__)]] == 1))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return [centre - half, centre + half]


def paired_interval(items: list[int], base: list[int], z: float = 1.96) -> list[float]:
    """Normal 95% interval of the mean paired difference (items - base) over the same pairs / questions."""
    d = [a - b for a, b in zip(items, base)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1))
    return [mean - z * sd / math.sqrt(len(d)), mean + z * sd / math.sqrt(len(d))]


def evaluate(name, model, tokenizer, held, questions, work, bf16=False):
    model.eval()
    start = time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        result = {"preference": preference_correct(model, tokenizer, held),
                  "mc1": mc1_correct(model, tokenizer, questions)}
    result["seconds"] = time.time() - start
    write_json(work / f"result_{name}.json", result)
    print(f"[{name}] preference {sum(result['preference'])}/{len(held)}, MC1 {sum(result['mc1'])}/"
          f"{len(questions)}, {result['seconds']:.0f} s", flush=True)


@torch.no_grad()
def probe(trainer: RAHFTrainer, batch_size: int = 4) -> dict:
    """Per target layer on the trainer's eval set: RAHF loss, ||A_lora - target|| / ||alpha v||, cos(shift, alpha v)."""
    model = trainer.model.eval()
    n = len(trainer.layers)
    error_sq, target_sq, token_norms, dots, shift_sq, tokens = ([0.0] * n for _ in range(6))
    loader = torch.utils.data.DataLoader(trainer.eval_dataset, batch_size=batch_size,
                                         collate_fn=trainer.data_collator, shuffle=False)
    for batch in loader:
        lora, base, v = (t.float() for t in trainer.representations(model, batch))
        valid = batch["response_mask"].bool()
        goal = trainer.args.alpha * v
        error, shift = (lora - base - goal)[:, valid], (lora - base)[:, valid]
        goal = goal[:, valid]
        for i in range(n):
            error_sq[i] += error[i].pow(2).sum().item()
            target_sq[i] += goal[i].pow(2).sum().item()
            token_norms[i] += error[i].norm(dim=-1).sum().item()
            dots[i] += (shift[i] * goal[i]).sum().item()
            shift_sq[i] += shift[i].pow(2).sum().item()
            tokens[i] += error.shape[1]
    model.train()
    return {str(layer): {"rahf_loss": token_norms[i] / tokens[i],
                         "relative_distance": math.sqrt(error_sq[i] / target_sq[i]),
                         "cosine_shift_target": dots[i] / math.sqrt(shift_sq[i] * target_sq[i])
                         if shift_sq[i] > 0 else 0.0}
            for i, layer in enumerate(trainer.layers)}


def save_curve(work, name, log_history, seconds):
    curve = {"loss": [e["loss"] for e in log_history if "loss" in e], "seconds": seconds}
    write_json(work / f"curve_{name}.json", curve)


def common(args, out, **kw):
    return dict(output_dir=str(out), per_device_train_batch_size=args.batch_size, report_to="none", use_cpu=True,
                save_strategy="no", logging_steps=1, seed=args.seed, lr_scheduler_type="constant", bf16=args.bf16,
                **kw)


def report(work: Path, out: Path, args, rows) -> dict:
    results = {f.stem[len("result_"):]: json.loads(f.read_text()) for f in sorted(work.glob("result_*.json"))}
    base = results.get("base")
    table = {}
    for name, result in results.items():
        entry = {}
        for metric in ("preference", "mc1"):
            items = result[metric]
            entry[metric] = {"accuracy": sum(items) / len(items), "correct": sum(items), "n": len(items),
                             "ci95": wilson(sum(items), len(items))}
            if base is not None and name != "base":
                entry[metric]["change_vs_base"] = (sum(items) - sum(base[metric])) / len(items)
                entry[metric]["change_ci95"] = paired_interval(items, base[metric])
        entry["seconds"] = result["seconds"]
        table[name] = entry
    probes = {f.stem[len("probe_"):]: json.loads(f.read_text()) for f in sorted(work.glob("probe_*.json"))}
    curves = {f.stem[len("curve_"):]: json.loads(f.read_text()) for f in sorted(work.glob("curve_*.json"))}
    summary = {"args": vars(args), "rows": rows, "results": table, "probes": probes, "curves": curves}
    write_json(out.with_suffix(".json"), summary)
    if curves:
        plot({n: c["loss"] for n, c in curves.items()}, out.with_suffix(".png"))
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/rahf_real_data")
    parser.add_argument("--work", default="outputs/rahf_real_data")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="run these stages; each saves its result in --work, so stages can run in separate "
                             "processes and 'report' gathers them")
    parser.add_argument("--train_rows", type=int, default=120)
    parser.add_argument("--eval_pairs", type=int, default=120)
    parser.add_argument("--probe_pairs", type=int, default=16, help="held-out pairs for the representation probe")
    parser.add_argument("--mc1_questions", type=int, default=60)
    parser.add_argument("--step1_steps", type=int, default=25)
    parser.add_argument("--rahf_steps", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--max_prompt_tokens", type=int, default=128)
    parser.add_argument("--max_response_tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training and evaluation")
    parser.add_argument("--threads", type=int, default=None)
    add_data_argument(parser)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_model_and_tokenizer()
    train, held, probe_rows, total, cut = load_pairs(args, tokenizer)
    questions = load_truthfulqa_mc(args.data)[: args.mc1_questions]
    rows = {"total": total, "train_part": cut, "train_used": len(train), "heldout_used": len(held),
            "probe_pairs": len(probe_rows), "mc1_questions": len(questions)}
    print(f"HH helpful-base: {rows}", flush=True)
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    fresh = lambda: load_model_and_tokenizer()[0].train()  # noqa: E731
    step1 = {"scit": [work / "scit_adapter"], "dual": [work / "dual" / "good", work / "dual" / "bad"]}

    if "base" in args.stages:
        evaluate("base", base, tokenizer, held, questions, work, args.bf16)
    if "scit" in args.stages:
        start = time.time()
        scit = SCITTrainer(fresh(), SCITConfig(**common(args, work / "scit", max_steps=args.step1_steps,
                                                        learning_rate=args.lr)),
                           train_dataset=train, processing_class=tokenizer, peft_config=LoraConfig(**lora))
        scit.train()
        scit.save_model(str(step1["scit"][0]))
        save_curve(work, "SCIT (Eq. 1)", scit.state.log_history, time.time() - start)
        evaluate("scit_step1", PeftModel.from_pretrained(fresh(), str(step1["scit"][0])), tokenizer, held,
                 questions, work, args.bf16)
    if "dual" in args.stages:
        start = time.time()
        folders = train_dual(fresh(), tokenizer, train, DualConfig(**common(
            args, work / "dual", max_steps=args.step1_steps, learning_rate=args.lr), max_length=None,
            gradient_checkpointing=False), peft_config=LoraConfig(**lora))
        for side in ("good", "bad"):
            state = json.loads((folders[side] / "trainer_state.json").read_text())
            save_curve(work, f"Dual {side} (SFT)", state["log_history"], time.time() - start)
        evaluate("dual_good_step1", PeftModel.from_pretrained(fresh(), str(folders["good"])), tokenizer, held,
                 questions, work, args.bf16)
    for run in RAHF_RUNS:
        if run not in args.stages:
            continue
        _, method, arrangement = run.split("_")
        instructed = [str(p) for p in step1[method]]
        start = time.time()
        config = RAHFConfig(**common(args, work / run, max_steps=args.rahf_steps, learning_rate=args.lr),
                            method=method, preset="authors", lora_on=arrangement, alpha=args.alpha,
                            dataset_name="Anthropic HH-RLHF helpful-base (80% split)")
        trainer = RAHFTrainer(fresh(), config, train_dataset=train, eval_dataset=probe_rows,
                              processing_class=tokenizer, instructed=instructed[0] if method == "scit" else instructed)
        before = probe(trainer)
        trainer.train()
        after = probe(trainer)
        write_json(work / f"probe_{run}.json", {"layers": trainer.layers, "before": before, "after": after,
                                                "probe_examples": len(trainer.eval_dataset)})
        save_curve(work, f"RAHF {method.upper()} on {arrangement}", trainer.state.log_history, time.time() - start)
        folder = trainer.save_pretrained(work / f"{run}_adapter")  # one adapter, the step-1 adapter folded in
        evaluate(run, PeftModel.from_pretrained(fresh(), str(folder)), tokenizer, held, questions, work, args.bf16)
    if "report" in args.stages:
        print(markdown(report(work, out, args, rows)))


def markdown(summary: dict) -> str:
    """The docs' tables: accuracies with Wilson intervals and paired changes; per-layer probes before/after."""
    def cell(entry):
        text = f"{entry['accuracy']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"
        if "change_vs_base" in entry:
            low, high = entry["change_ci95"]
            text += f"; {entry['change_vs_base']:+.3f} [{low:+.3f}, {high:+.3f}]"
        return text

    results = summary["results"]
    lines = [f"| model | preference accuracy ({next(iter(results.values()))['preference']['n']} pairs) | "
             f"TruthfulQA MC1 ({next(iter(results.values()))['mc1']['n']} questions) |", "|---|---|---|"]
    order = ["base", "scit_step1", "rahf_scit_base", "rahf_scit_instructed", "dual_good_step1", "rahf_dual_base",
             "rahf_dual_instructed"]
    for name in [n for n in order if n in results]:
        lines.append(f"| {name} | {cell(results[name]['preference'])} | {cell(results[name]['mc1'])} |")
    for run, probe_result in summary["probes"].items():
        lines += ["", f"{run} ({probe_result['probe_examples']} held-out stimuli):", "",
                  "| layer | RAHF loss before -> after | relative distance before -> after | cos(shift, alpha v) after |",
                  "|---|---|---|---|"]
        for layer in map(str, probe_result["layers"]):
            b, a = probe_result["before"][layer], probe_result["after"][layer]
            lines.append(f"| {layer} | {b['rahf_loss']:.2f} -> {a['rahf_loss']:.2f} | "
                         f"{b['relative_distance']:.3f} -> {a['relative_distance']:.3f} | "
                         f"{a['cosine_shift_target']:.3f} |")
    return "\n".join(lines)


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.0), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        ax.plot(range(1, len(values) + 1), values)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("training loss")
    fig.suptitle("RAHF on HH-RLHF helpful-base, SmolLM2-135M-Instruct (CPU)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
