"""Layer / pooling variants of the margin vector on HH-RLHF harmless-base (embedded model, CPU-sized).

Generates the model's answers to the first AdvBench goals once, fits one vector per (layer, pooling) variant from
the same pairs, and reports the share of harmless-base pairs with margin_raw > 0 for each.

    nice -n 10 .venv/bin/python benchmarks/legend_variants.py --rows 100 --variants 15:last " -1:mean"
"""

from __future__ import annotations

import argparse
import time

from transformers import pipeline

import hf_repalign  # noqa: F401
from hf_repalign.data_files import read_advbench, read_jsonl, shared_data_dir
from hf_repalign.legend import MarginVector, usable_rows
from hf_repalign.legend.vector import DEFAULT_REFUSAL, generate_responses
from hf_repalign.models import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goals", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--variants", nargs="+", default=["-1:last", "-1:mean", "15:last"], help="layer:pooling")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer()
    goals = read_advbench(shared_data_dir() / "advbench" / "harmful_behaviors.csv")[: args.goals]
    answers = generate_responses(model, tokenizer, goals, None, args.max_new_tokens, batch_size=len(goals))
    rows, _ = usable_rows(read_jsonl(shared_data_dir() / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"))
    rows = rows[: args.rows]
    for variant in args.variants:
        layer, pooling = variant.split(":")
        start = time.perf_counter()
        vec = MarginVector.fit(model, tokenizer, goals, [DEFAULT_REFUSAL] * len(goals), answers, layer=int(layer),
                               pooling=pooling)
        pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, device="cpu",
                        batch_size=8)
        raw = pipe.annotate(rows, num_bins=None, max_length=512, truncation="left", progress=False)["margin_raw"]
        share = sum(m > 0 for m in raw) / len(raw)
        print(f"layer {layer:>3} pooling {pooling:<4}: margin_raw > 0 in {share:.1%} of {len(raw)} harmless-base "
              f"pairs ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
