"""Linear Alignment decoding throughput against plain ``generate`` and transformers' own CFG, side by side.

CPU:  python benchmarks/la_throughput.py --model tiny embedded --batch 1 8
GPU:  python benchmarks/la_throughput.py --model llama7b-random --device cuda --dtype bfloat16 --batch 1 8 \
          --prompt-len 128 --principle-len 100 --new-tokens 128

Every run generates exactly ``--new-tokens`` tokens per row (min_new_tokens = max_new_tokens), greedy, from random
prompts: the plain prompt has ``--prompt-len`` tokens, the principle-conditioned one ``prompt-len + principle-len``.
CFG gets the principle prompt as its ``negative_prompt_ids``, so both guided methods read the same contexts.
Throughput is from wall time; the last column is the paired/plain ratio of this process's CPU seconds, steadier when
other jobs share the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import LogitsProcessorList

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, parse_dtype, time_interleaved  # noqa: E402

from hf_repalign import LinearAlignmentProcessor, paired_generate  # noqa: E402


def bench(model, batch: int, prompt_len: int, principle_len: int, new_tokens: int, repeats: int, device: str):
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    plain = torch.randint(3, vocab, (batch, prompt_len), generator=generator).to(device)
    principle = torch.cat([torch.randint(3, vocab, (batch, principle_len), generator=generator).to(device), plain], 1)
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    mask = torch.ones_like(plain)

    def processor(**extra):
        proc = LinearAlignmentProcessor(model, principle, alpha=1.0)
        return lambda: model.generate(plain, attention_mask=mask, logits_processor=LogitsProcessorList([proc]),
                                      **common, **extra)

    runs = {
        "plain": lambda: model.generate(plain, attention_mask=mask, **common),
        "hf_cfg": lambda: model.generate(plain, attention_mask=mask, guidance_scale=2.0,
                                         negative_prompt_ids=principle, **common),
        "la_processor": processor(),
        "la_paired": processor(custom_generate=paired_generate),
    }
    with torch.inference_mode():
        wall, cpu = time_interleaved(runs, repeats, device, with_cpu_time=True)
    # CPU seconds of this process: steadier than wall time on a shared machine (on a GPU, use wall time).
    return {name: batch * new_tokens / s for name, s in wall.items()}, {name: cpu["plain"] / cpu[name] for name in cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["tiny", "embedded"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--principle-len", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, prompt {args.prompt_len}, "
          f"principle +{args.principle_len}, new tokens {args.new_tokens}, median of {args.repeats}")
    header = f"{'model':<16}{'batch':>6}{'plain tok/s':>13}{'HF CFG':>10}{'LA proc':>10}{'LA paired':>11}" \
             f"{'CFG/plain':>11}{'proc/plain':>11}{'paired/plain':>13}{'paired/CFG':>12}{'paired/plain CPU s':>19}"
    print(header)
    for name in args.model:
        model = build_model(name, args.device, parse_dtype(args.dtype))
        for batch in args.batch:
            r, cpu = bench(model, batch, args.prompt_len, args.principle_len, args.new_tokens, args.repeats,
                           args.device)
            print(f"{name:<16}{batch:>6}{r['plain']:>13.1f}{r['hf_cfg']:>10.1f}{r['la_processor']:>10.1f}"
                  f"{r['la_paired']:>11.1f}{r['hf_cfg'] / r['plain']:>11.2f}{r['la_processor'] / r['plain']:>11.2f}"
                  f"{r['la_paired'] / r['plain']:>13.2f}{r['la_paired'] / r['hf_cfg']:>12.2f}{cpu['la_paired']:>19.2f}",
                  flush=True)
        del model


if __name__ == "__main__":
    main()
