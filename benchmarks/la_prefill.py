"""Where the time of Linear Alignment at batch 1 goes: plain vs paired decoding, and the prefills alone.

    python benchmarks/la_prefill.py --model embedded --threads 1 --repeats 5

Same prompts as ``la_throughput.py`` (random, 128 plain tokens, the principle prompt 100 more tokens in front).
``paired`` runs each branch's first step at its own length; ``paired, joint first step`` runs both rows padded to
the longer one in one forward (the older way). Reports median wall and CPU seconds of this process, interleaved.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, parse_dtype, time_interleaved  # noqa: E402

import hf_repalign.linear_alignment.paired as paired_module  # noqa: E402
from hf_repalign import LinearAlignmentProcessor, paired_generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--principle-len", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, "cpu", parse_dtype(args.dtype))
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    plain = torch.randint(3, vocab, (1, args.prompt_len), generator=generator)
    principle = torch.cat([torch.randint(3, vocab, (1, args.principle_len), generator=generator), plain], 1)
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    split_prefill = paired_module._prefill

    def paired(joint: bool):
        def run():
            paired_module._prefill = (lambda *a: (None, None)) if joint else split_prefill
            proc = LinearAlignmentProcessor(model, principle, alpha=1.0)
            model.generate(plain, attention_mask=torch.ones_like(plain), logits_processor=[proc],
                           custom_generate=paired_generate, **common)
        return run

    def prefill(ids):
        return lambda: model(ids, logits_to_keep=1)

    runs = {
        "plain generate": lambda: model.generate(plain, attention_mask=torch.ones_like(plain), **common),
        "paired": paired(joint=False),
        "paired, joint first step": paired(joint=True),
        f"prefill {plain.shape[1]} tokens": prefill(plain),
        f"prefill {principle.shape[1]} tokens": prefill(principle),
        f"prefill 2 x {principle.shape[1]} tokens": prefill(torch.cat([principle, principle])),
    }
    try:
        with torch.inference_mode():
            wall, cpu = time_interleaved(runs, args.repeats, "cpu", with_cpu_time=True)
    finally:
        paired_module._prefill = split_prefill
    print(f"{args.model}, batch 1, {args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| run | wall s | CPU s | plain/run (CPU) |\n|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {wall[name]:.2f} | {cpu[name]:.2f} | {cpu['plain generate'] / cpu[name]:.2f} |")


if __name__ == "__main__":
    main()
