"""Two principles at once: "Always answer in French." and "Answer in one short sentence.", each alone and composed.

    python evals/la_principles.py --data PATH --threads 1

Embedded SmolLM2-135M-Instruct, MT-Bench first turns, greedy, through the ``custom_generate`` method's ``generate``
(principles as text). Composition: ``mu0 + sum_i (1 + alpha_i) (mu_i - mu0)`` in one forward of 3B rows per step.
Reports the French-word share and the words per answer (the two attributes), and the repeated-3-gram rate.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_repalign.data_files import add_data_argument, load_mt_bench
from hf_repalign.linear_alignment import build_principle_inputs
from hf_repalign.linear_alignment.method import generate
from hf_repalign.models import load_model_and_tokenizer
from la_real_data import BRIEF_PRINCIPLE, FRENCH_PRINCIPLE, french_share, mean, repeated_trigram_rate, word_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-mtbench", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    add_data_argument(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer()
    questions = load_mt_bench(args.data)[: args.n_mtbench]
    a = args.alpha
    settings = {
        "plain (alpha=-1)": dict(principle=FRENCH_PRINCIPLE, alpha=-1.0),
        f"French alone, alpha={a:g}": dict(principle=FRENCH_PRINCIPLE, alpha=a),
        f"brevity alone, alpha={a:g}": dict(principle=BRIEF_PRINCIPLE, alpha=a),
        f"French + brevity, alphas=[{a:g}, {a:g}]": dict(principles=[FRENCH_PRINCIPLE, BRIEF_PRINCIPLE], alphas=[a, a]),
        "both in one prompt, alpha=0": dict(principle=f"{FRENCH_PRINCIPLE} {BRIEF_PRINCIPLE}", alpha=0.0),
    }
    print(f"{len(questions)} MT-Bench first turns, greedy, {args.max_new_tokens} new tokens\n")
    print("| setting | French-word share | words per answer | repeated 3-grams | seconds |\n|---|---|---|---|---|")
    for name, principle in settings.items():
        start, answers = time.perf_counter(), []
        for first in range(0, len(questions), args.batch_size):
            plain, _ = build_principle_inputs(tokenizer, questions[first:first + args.batch_size], FRENCH_PRINCIPLE)
            with torch.inference_mode():
                out = generate(model, **plain, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id, **principle)
            answers += tokenizer.batch_decode(out[:, plain["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"| {name} | {mean(map(french_share, answers)):.3f} | {mean(map(word_count, answers)):.1f} | "
              f"{mean(map(repeated_trigram_rate, answers)):.3f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
