"""CPU throughput of ``annotate`` against a naive one-pair-at-a-time loop, on a tiny and the embedded model, at
several batch sizes.

The naive loop is how the LEGEND authors' code embeds: each (prompt, response) text goes through its own full
forward with ``output_hidden_states=True`` (all layers, all hidden states, the LM head), one at a time, and the
state at the last token of the response is read. Tokenization is timed on both sides. Both sides produce the same
margins (checked); the candidates run interleaved in one process (median of ``--repeats``), so the ratios are
side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/legend_cpu_throughput.py --data PATH \\
        --tiny_pairs 128 --embedded_pairs 16 --batch_sizes 1 2 4 8 16 --threads 1 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_dtype, time_interleaved  # noqa: E402

import hf_repalign  # noqa: E402, F401
from hf_repalign.data_files import add_data_argument, load_hh_rlhf  # noqa: E402
from hf_repalign.formats import to_triplet  # noqa: E402
from hf_repalign.legend import MarginVector, usable_rows  # noqa: E402
from hf_repalign.legend.embedding import SIDES, encode_triplet  # noqa: E402
from hf_repalign.models import load_model_and_tokenizer  # noqa: E402
from hf_repalign.testing import tiny_model, tiny_tokenizer  # noqa: E402


def hh_rows(data: Path | None, n: int, tokenizer, max_tokens: int) -> list[dict]:
    """The first ``n`` usable harmless-base pairs with both sides within ``max_tokens``."""
    rows, _ = usable_rows(load_hh_rlhf("harmless-base", data))
    kept = []
    for i, row in enumerate(rows):
        item, _ = encode_triplet(tokenizer, to_triplet(row, i))
        if max(int(item[f"{side}_length"]) for side in SIDES) <= max_tokens:
            kept.append(row)
        if len(kept) == n:
            break
    return kept


@torch.no_grad()
def naive_margins(model, tokenizer, rows, vec: MarginVector) -> list[float]:
    out = []
    for i, row in enumerate(rows):
        item, _ = encode_triplet(tokenizer, to_triplet(row, i), vec.template)
        emb = []
        for side in SIDES:
            states = model(item[f"{side}_input_ids"].long(), output_hidden_states=True).hidden_states
            emb.append(states[vec.layer][0, int(item[f"{side}_response_end"]) - 1].float())
        out.append(float((emb[0] - emb[1]) @ vec.direction))
    return out


def measure(name, model, tokenizer, rows, vec, batch_sizes, repeats) -> None:
    pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, device="cpu")
    results = {}

    def annotate(batch_size):
        def run():
            results[batch_size] = pipe.annotate(rows, num_bins=None, batch_size=batch_size, progress=False)
        return run

    def naive():
        results["naive"] = naive_margins(model, tokenizer, rows, vec)

    runs = {"naive": naive, **{f"batch {b}": annotate(b) for b in batch_sizes}}
    # CPU seconds of this process as well as wall seconds: on a shared machine the former are steadier.
    seconds, cpu = time_interleaved(runs, repeats, "cpu", with_cpu_time=True)
    print(f"{name}: {len(rows)} pairs, naive loop {len(rows) / seconds['naive']:.2f} pairs/s "
          f"({len(rows) / cpu['naive']:.2f} per CPU-second)", flush=True)
    for b in batch_sizes:
        key = f"batch {b}"
        error = max(abs(x - y) for x, y in zip(results[b]["margin_raw"], results["naive"]))
        print(f"  annotate batch_size={b:>2}: {len(rows) / seconds[key]:.2f} pairs/s, "
              f"{seconds['naive'] / seconds[key]:.2f}x the naive loop (wall), {cpu['naive'] / cpu[key]:.2f}x "
              f"(CPU time), max |margin diff| {error:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny_pairs", type=int, default=128)
    parser.add_argument("--embedded_pairs", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=256, help="keep HH pairs up to this many tokens a side")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each candidate (median)")
    parser.add_argument("--dtype", default="float32", help="embedded model dtype")
    parser.add_argument("--threads", type=int, default=1)
    add_data_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data
    fit = (["How do I hurt someone?"] * 2, ["I can't answer that."] * 2, ["First, find", "Sure, here"])

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=4)
    rows = hh_rows(data, args.tiny_pairs, tokenizer, args.max_tokens * 2)  # byte-level: ~2x the tokens
    vec = MarginVector.fit(model, tokenizer, *fit)
    measure("tiny llama (4 layers, hidden 64, byte-level tokens)", model, tokenizer, rows, vec, args.batch_sizes,
            args.repeats)

    model, tokenizer = load_model_and_tokenizer(dtype=parse_dtype(args.dtype))
    rows = hh_rows(data, args.embedded_pairs, tokenizer, args.max_tokens)
    vec = MarginVector.fit(model, tokenizer, *fit)
    measure(f"embedded SmolLM2-135M-Instruct ({args.dtype})", model, tokenizer, rows, vec, args.batch_sizes,
            args.repeats)


if __name__ == "__main__":
    main()
