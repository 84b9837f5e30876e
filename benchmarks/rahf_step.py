"""RAHF training step vs DPO with LoRA (the alternative a user would pick): step time and peak memory.

Same model, batch, lengths and LoRA config, measured side by side in one run (steps interleaved):

* ``rahf``: ``RAHFTrainer.training_step`` (base + p+ + p- targets under no_grad, LoRA forward/backward, all
  stopping after the top target layer) + optimizer step;
* ``rahf_precomputed``: the same with the difference vectors precomputed once (``precompute_targets``), so a step
  is the base forward plus the LoRA forward/backward (the orientation numbers in docs/evidence/rahf.md assume this shape);
* ``dpo``: TRL ``DPOTrainer.training_step`` with ``peft_config`` (policy on chosen+rejected with backward, the
  reference = adapter disabled) + optimizer step (``--backend trl``), or the same computation written in plain
  torch + peft (``--backend plain``, for machines without TRL; its log-probs use full logits instead of TRL's
  fused lm_head).

Every stimulus has ``--prompt-len`` prompt and ``--response-len`` response tokens (random ids), so a DPO sequence
and a RAHF stimulus have the same length. Peak memory: CUDA ``max_memory_allocated`` during the steps; on CPU the
peak resident set (VmHWM) during the steps minus the resident set before them, each method in its own process.

CPU: python benchmarks/rahf_step.py --model tiny embedded --batch 2 --prompt-len 256 --response-len 64
GPU: python benchmarks/rahf_step.py --model llama7b-random --device cuda --dtype bfloat16 --backend plain \
         --batch 8 --prompt-len 256 --response-len 64 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, parse_dtype, time_interleaved, write_json  # noqa: E402

METHODS = ("dpo", "rahf", "rahf_precomputed")
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _rows(tokenizer, vocab: int, n: int, prompt_len: int, response_len: int, seed: int = 0) -> list[dict]:
    """Texts decoded from random ids (DPO tokenizes text) and their re-encoded ids (for RAHF), same for both."""
    g = torch.Generator().manual_seed(seed)
    top = min(vocab, len(tokenizer))

    def text(k):
        # Re-encoding decoded random ids can change the count a little; trim to k tokens.
        ids = tokenizer(tokenizer.decode(torch.randint(len(tokenizer.all_special_ids) + 1, top, (2 * k,), generator=g)
                                         .tolist(), skip_special_tokens=True), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:k])

    rows = []
    for _ in range(n):
        row = {"prompt": text(prompt_len), "chosen": text(response_len), "rejected": text(response_len)}
        for key in ("prompt", "chosen", "rejected"):
            row[f"{key}_ids"] = tokenizer(row[key], add_special_tokens=False)["input_ids"]
        rows.append(row)
    return rows


def _tokenizer(name: str):
    if name == "embedded":
        from hf_repalign.models import load_model_and_tokenizer

        return load_model_and_tokenizer()[1]
    from hf_repalign.testing import tiny_tokenizer

    return tiny_tokenizer()


def _common_args(device: str, dtype: torch.dtype, batch: int, out: str) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=batch, report_to="none", use_cpu=device == "cpu",
                bf16=dtype == torch.bfloat16, gradient_checkpointing=False, save_strategy="no", learning_rate=1e-4)


def rahf_step(model, tokenizer, rows, args, device, dtype, work, precomputed: bool = False):
    """A callable running one RAHF optimizer step (the library's own training_step).

    ``precomputed``: the difference vectors are computed once (``precompute_targets``) and read from disk, so a
    step is the base forward (adapter disabled, no grad) plus the LoRA forward/backward only.
    """
    from peft import LoraConfig, get_peft_model

    from hf_repalign.rahf import RAHFConfig, RAHFTrainer

    adapter = Path(work) / "scit_adapter"  # a random adapter on the same base stands in for the SCIT model
    scit = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False))
    scit.save_pretrained(str(adapter))
    model = scit.unload()
    data = [{"prompt_ids": r["prompt_ids"], "positive_prompt_ids": r["prompt_ids"],
             "negative_prompt_ids": r["prompt_ids"][::-1], "response_ids": r["chosen_ids"], "example_index": i}
            for i, r in enumerate(rows)]
    config = RAHFConfig(**_common_args(device, dtype, args.batch, str(Path(work) / "rahf")), lora_r=LORA["r"],
                        lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                        lora_target_modules=LORA["target_modules"], max_response_tokens=args.response_len,
                        max_prompt_length=10**6)
    trainer = RAHFTrainer(model, config, train_dataset=data, processing_class=tokenizer, instructed=str(adapter))
    if precomputed:
        targets = trainer.precompute_targets(Path(work) / "targets")
        model = trainer.model.unload()  # drop both adapters: a plain base model again
        del trainer
        config = dataclasses.replace(config, precomputed_targets=str(targets))
        trainer = RAHFTrainer(model, config, train_dataset=data, processing_class=tokenizer)
    return _stepper(trainer, trainer.data_collator(data[: args.batch]))


def dpo_step_trl(model, tokenizer, rows, args, device, dtype, work):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**_common_args(device, dtype, args.batch, str(Path(work) / "dpo")), max_length=None)
    texts = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    trainer = DPOTrainer(model, args=config, train_dataset=Dataset.from_list(texts), processing_class=tokenizer,
                         peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"))
    batch = next(iter(trainer.get_train_dataloader()))
    return _stepper(trainer, batch)


def _stepper(trainer, batch):
    trainer.create_optimizer()
    optimizer, model = trainer.optimizer, trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass
    batch = trainer._prepare_inputs(batch)

    def step():
        trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dpo_step_plain(model, tokenizer, rows, args, device, dtype, work, beta: float = 0.1):
    """DPO with LoRA in plain torch + peft: what TRL's DPOTrainer computes for one step."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from hf_repalign.rahf.scit import pad_with_response_labels, response_logps

    policy = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM")).train()
    batch_rows = rows[: args.batch]
    sequences = [(r["prompt_ids"] + r[side], len(r["prompt_ids"])) for side in ("chosen_ids", "rejected_ids")
                 for r in batch_rows]
    batch = {k: v.to(device) for k, v in pad_with_response_labels(sequences, pad_token_id=0).items()}
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            logits = policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            policy_logps = response_logps(logits, labels)
            with torch.no_grad(), policy.disable_adapter():
                ref_logits = policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                ref_logps = response_logps(ref_logits, labels)
        chosen, rejected = policy_logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        loss = -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build(method, args, model_name, work):
    dtype = parse_dtype(args.dtype)
    model = build_model(model_name, args.device, dtype).train()
    tokenizer = _tokenizer(model_name)
    rows = _rows(tokenizer, model.config.vocab_size, max(args.batch, 2), args.prompt_len, args.response_len)
    if method.startswith("rahf"):
        return rahf_step(model, tokenizer, rows, args, args.device, dtype, work, method == "rahf_precomputed")
    builder = dpo_step_trl if args.backend == "trl" else dpo_step_plain
    return builder(model, tokenizer, rows, args, args.device, dtype, work)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_memory(method: str, args, model_name: str) -> float:
    """Run in a child process: MiB of peak resident set above the resident set before the steps."""
    with tempfile.TemporaryDirectory() as work:
        step = build(method, args, model_name, work)
        step()  # warm-up: optimizer states exist afterwards, as in training
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib("VmRSS")
        for _ in range(2):
            step()
        return (_rss_kib("VmHWM") - before) / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["tiny", "embedded"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", choices=["trl", "plain"], default="trl")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--_memory_child", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args._memory_child:
        print(json.dumps({"peak_mib": cpu_peak_memory(args._memory_child[0], args, args._memory_child[1])}))
        return
    results = []
    for model_name in args.model:
        with tempfile.TemporaryDirectory() as work:
            runs, peaks = {}, {}
            for method in METHODS:
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    runs[method] = build(method, args, model_name, str(Path(work) / method))
                    runs[method]()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    runs[method]()
                    peaks[method] = (torch.cuda.max_memory_allocated() - before) / 2**20
                    peaks[f"{method}_total"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                else:
                    runs[method] = build(method, args, model_name, str(Path(work) / method))
                    child = [sys.executable, __file__, "--_memory_child", method, model_name, "--device", args.device,
                             "--dtype", args.dtype, "--backend", args.backend, "--batch", str(args.batch),
                             "--prompt-len", str(args.prompt_len), "--response-len", str(args.response_len)]
                    output = subprocess.run(child, capture_output=True, text=True, check=True).stdout
                    peaks[method] = json.loads(output.strip().splitlines()[-1])["peak_mib"]
            times, cpu = time_interleaved(runs, args.repeats, args.device, with_cpu_time=True)
            cpu = cpu if args.device == "cpu" else None
            row = {"model": model_name, "device": args.device, "dtype": args.dtype, "backend": args.backend,
                   "batch": args.batch, "prompt_tokens": args.prompt_len, "response_tokens": args.response_len,
                   "dpo_step_s": times["dpo"], "dpo_peak_mib": peaks["dpo"]}
            for method in METHODS[1:]:
                row.update({f"{method}_step_s": times[method], f"{method}_time_ratio": times[method] / times["dpo"],
                            f"{method}_peak_mib": peaks[method],
                            f"{method}_memory_ratio": peaks[method] / peaks["dpo"] if peaks["dpo"] else float("nan")})
                if cpu is not None:  # CPU seconds of this process: less sensitive to other jobs on the machine
                    row.update({f"{method}_step_cpu_s": cpu[method],
                                f"{method}_cpu_time_ratio": cpu[method] / cpu["dpo"]})
                if args.device.startswith("cuda"):
                    row[f"{method}_total_mib"] = peaks[f"{method}_total"]
            if args.device.startswith("cuda"):
                row["dpo_total_mib"] = peaks["dpo_total"]
            results.append(row)
            print(json.dumps(row), flush=True)
            del runs
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
