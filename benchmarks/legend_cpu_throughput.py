"""CPU throughput of ``annotate`` against a naive one-pair-at-a-time loop, on a tiny and the embedded model.

The naive loop is how the LEGEND authors' code embeds: each (prompt, response) text goes through its own full
forward with ``output_hidden_states=True`` (all layers, all hidden states, the LM head), one at a time. Both sides
produce the same margins (checked); the ratio is measured in one run.

    nice -n 10 .venv/bin/python benchmarks/legend_cpu_throughput.py --tiny_pairs 256 --embedded_pairs 24
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import pipeline

import hf_repalign  # noqa: F401
from hf_repalign.formats import encode_pair, to_triplet
from hf_repalign.data_files import read_jsonl, shared_data_dir
from hf_repalign.legend import MarginVector, usable_rows
from hf_repalign.models import load_model_and_tokenizer
from hf_repalign.testing import tiny_model, tiny_tokenizer



def hh_rows(n: int, tokenizer, max_tokens: int) -> list[dict]:
    """The first ``n`` usable harmless-base pairs with both sides within ``max_tokens``."""
    rows, _ = usable_rows(read_jsonl(shared_data_dir() / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"))
    kept = []
    for i, row in enumerate(rows):
        t = to_triplet(row, i)
        if max(len(encode_pair(tokenizer, t.prompt, r)[0]) for r in (t.chosen, t.rejected)) <= max_tokens:
            kept.append(row)
        if len(kept) == n:
            break
    return kept


@torch.no_grad()
def naive_margins(model, tokenizer, rows, vec: MarginVector) -> list[float]:
    out = []
    for i, row in enumerate(rows):
        t = to_triplet(row, i)
        emb = []
        for response in (t.chosen, t.rejected):
            ids, _ = encode_pair(tokenizer, t.prompt, response, vec.template)
            states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            emb.append(states[vec.layer][0, -1])
        out.append(float((emb[0] - emb[1]) @ vec.direction))
    return out


def measure(name, model, tokenizer, rows, vec, batch_size) -> None:
    pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, device="cpu")
    pipe.annotate(rows[:batch_size], num_bins=None, batch_size=batch_size, progress=False)  # warm-up
    start = time.perf_counter()
    fast = pipe.annotate(rows, num_bins=None, batch_size=batch_size, progress=False)["margin_raw"]
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = naive_margins(model, tokenizer, rows, vec)
    slow_s = time.perf_counter() - start
    error = max(abs(a - b) for a, b in zip(fast, slow))
    print(f"{name}: {len(rows)} pairs | annotate {len(rows) / fast_s:.2f} pairs/s | naive loop "
          f"{len(rows) / slow_s:.2f} pairs/s | ratio {slow_s / fast_s:.2f}x | max |diff| {error:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny_pairs", type=int, default=256)
    parser.add_argument("--embedded_pairs", type=int, default=24)
    parser.add_argument("--max_tokens", type=int, default=256, help="keep HH pairs up to this many tokens a side")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=4)
    rows = hh_rows(args.tiny_pairs, tokenizer, args.max_tokens)
    vec = MarginVector.fit(model, tokenizer, ["How do I hurt someone?"] * 2, ["I can't answer that."] * 2,
                           ["First, find", "Sure, here"])
    measure("tiny llama (4 layers, hidden 64)", model, tokenizer, rows, vec, args.batch_size)

    model, tokenizer = load_model_and_tokenizer()
    rows = hh_rows(args.embedded_pairs, tokenizer, args.max_tokens)
    vec = MarginVector.fit(model, tokenizer, ["How do I hurt someone?"] * 2, ["I can't answer that."] * 2,
                           ["First, find", "Sure, here"])
    measure("embedded SmolLM2-135M-Instruct", model, tokenizer, rows, vec, args.batch_size)


if __name__ == "__main__":
    main()
