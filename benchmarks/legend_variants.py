"""Layer / pooling variants of the margin vector on HH-RLHF harmless-base (embedded model, CPU-sized).

Generates the model's answers to the first AdvBench goals once, fits one vector per (layer, pooling) variant from
the same pairs, and reports the share of harmless-base pairs with margin_raw > 0 for each.

    nice -n 10 .venv/bin/python benchmarks/legend_variants.py --rows 100 --variants 15:last " -1:mean"
    .venv/bin/python benchmarks/legend_variants.py --dtype bfloat16 --rows 0 --splits harmless-base helpful-base \
        --variants " -1:mean"                                  # whole splits
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_dtype  # noqa: E402

import hf_repalign  # noqa: E402, F401
from hf_repalign.data_files import read_advbench, read_jsonl, shared_data_dir  # noqa: E402
from hf_repalign.legend import MarginVector  # noqa: E402
from hf_repalign.legend.vector import DEFAULT_REFUSAL, generate_responses  # noqa: E402
from hf_repalign.models import load_model_and_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goals", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=100, help="first N rows of each split; 0 = all")
    parser.add_argument("--splits", nargs="+", default=["harmless-base"])
    parser.add_argument("--variants", nargs="+", default=["-1:last", "-1:mean", "15:last"], help="layer:pooling")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(dtype=parse_dtype(args.dtype))
    goals = read_advbench(shared_data_dir() / "advbench" / "harmful_behaviors.csv")[: args.goals]
    answers = generate_responses(model, tokenizer, goals, None, args.max_new_tokens, batch_size=len(goals))
    for variant, split in ((v, s) for v in args.variants for s in args.splits):
        rows = read_jsonl(shared_data_dir() / "hh-rlhf" / split / "test.jsonl.gz")[: args.rows or None]
        layer, pooling = variant.split(":")
        start = time.perf_counter()
        vec = MarginVector.fit(model, tokenizer, goals, [DEFAULT_REFUSAL] * len(goals), answers, layer=int(layer),
                               pooling=pooling)
        pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, device="cpu",
                        batch_size=8)
        raw = pipe.annotate(rows, num_bins=None, drop_invalid=True,
                            progress=False)["margin_raw"]
        share = sum(m > 0 for m in raw) / len(raw)
        print(f"layer {layer:>3} pooling {pooling:<4}: margin_raw > 0 in {share:.1%} of {len(raw)} {split} "
              f"pairs ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
