"""Does ``repetition_penalty`` lower repetition under Linear Alignment as it does for plain decoding?

    python evals/la_penalty_check.py --data PATH --threads 1

SmolLM2-135M-Instruct, MT-Bench first turns, greedy, ``alpha=2``, principle "Always answer in French.".
Repeated-token rate: share of the generated tokens (up to EOS) that already occurred earlier in the same answer.
A penalty applied to the plain branch before the update rule would be turned into a boost by LA (that order gave
0.618 with LA + penalty 1.3 vs 0.410 without any penalty); ``paired_generate`` applies it to the aligned scores.
"""

from __future__ import annotations

import argparse

import torch

from hf_repalign import LinearAlignmentProcessor, build_principle_inputs, paired_generate
from hf_repalign.data_files import add_data_argument, load_mt_bench
from hf_repalign.models import load_model_and_tokenizer

PRINCIPLE = "Always answer in French."


def repeated_token_rate(rows: list[list[int]], eos: int) -> float:
    """Pooled over all answers (tokens after EOS, i.e. padding, are not counted)."""
    repeated = total = 0
    for row in rows:
        if eos in row:
            row = row[: row.index(eos)]
        seen = set()
        for token in row:
            repeated += token in seen
            total += 1
            seen.add(token)
    return repeated / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--penalty", type=float, default=1.3)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    add_data_argument(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer()
    questions = load_mt_bench(args.data)[: args.n]
    settings = {
        "plain": (False, 1.0),
        f"plain, repetition_penalty={args.penalty:g}": (False, args.penalty),
        f"linear alignment alpha={args.alpha:g}": (True, 1.0),
        f"linear alignment alpha={args.alpha:g}, repetition_penalty={args.penalty:g} (paired_generate)":
            (True, args.penalty),
    }
    print(f"\n{args.n} MT-Bench questions, greedy, {args.tokens} new tokens\n\n| setting | repeated-token rate |")
    print("|---|---|")
    for name, (aligned, penalty) in settings.items():
        outputs = []
        for start in range(0, len(questions), args.batch_size):
            plain, principle = build_principle_inputs(tokenizer, questions[start:start + args.batch_size], PRINCIPLE)
            kwargs = dict(max_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                          repetition_penalty=penalty)
            if aligned:
                proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"],
                                                alpha=args.alpha)
                kwargs.update(logits_processor=[proc], custom_generate=paired_generate)
            with torch.inference_mode():
                outputs += model.generate(**plain, **kwargs)[:, plain["input_ids"].shape[1]:].tolist()
        rate = repeated_token_rate(outputs, tokenizer.eos_token_id)
        print(f"| {name} | {rate:.3f} |", flush=True)


if __name__ == "__main__":
    main()
