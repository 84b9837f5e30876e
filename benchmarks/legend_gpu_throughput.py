"""GPU throughput of the legend-margin path against the raw forward of the same model (prepared, unattended).

A random-weight Llama-2-7B-shaped model in bf16; 2,000 pairs whose prompt + response are 200 to 600 tokens. We
time the same code ``annotate`` runs (every side sorted by its own length, right-padded batches without a mask,
early exit at the requested layer) and, in the same run, the raw decoder forward over the same number of tokens in
unpadded 512-token sequences. Target: annotate >= 80% of the raw forward's token throughput.

Needs only torch, transformers, peft/accelerate and hf_repalign (no trl/datasets):

    python benchmarks/legend_gpu_throughput.py                      # on one CUDA GPU (~3-5 min)
    python benchmarks/legend_gpu_throughput.py --model tiny --device cpu --pairs 64   # dry run on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, synchronize  # noqa: E402

from hf_repalign.legend.margin import margin_raw
from hf_repalign.legend.pipeline import LegendMarginPipeline
from hf_repalign.legend.vector import MarginVector
from hf_repalign.testing import tiny_tokenizer

def random_pairs(n: int, seed: int) -> list[dict]:
    """Byte-level text, so one character is one token: prompt 150-450, responses 50-150 tokens."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(rng.choices(string.ascii_lowercase + " ", k=k))

    return [{"prompt": text(rng.randint(150, 450)), "chosen": text(rng.randint(50, 150)),
             "rejected": text(rng.randint(50, 150))} for _ in range(n)]


def flops(config, lengths: list[int]) -> float:
    """Decoder FLOPs (no LM head): 2 x matmul params per token + causal attention scores and values."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_token = 2 * layers * (h * h * 2 + 2 * h * kv + 3 * h * inter)
    attention = sum(2 * layers * h * t * t for t in lengths)  # 4*h*t^2 per layer, halved by the causal mask
    return per_token * sum(lengths) + attention


@torch.inference_mode()
def raw_forward(model, total_tokens: int, seq_len: int, batch: int, device: str) -> tuple[float, list[int]]:
    n_seqs = max(1, round(total_tokens / seq_len))
    ids = torch.randint(5, 261, (batch, seq_len), device=device)
    model.model(input_ids=ids[:1], use_cache=False)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    done = 0
    while done < n_seqs:
        size = min(batch, n_seqs - done)
        model.model(input_ids=ids[:size], use_cache=False)
        done += size
    synchronize(device)
    return time.perf_counter() - start, [seq_len] * n_seqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama7b-random", "tiny"], default="llama7b-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=32, help="pairs per forward (2x sequences)")
    parser.add_argument("--raw_batch", type=int, default=64, help="512-token sequences per raw forward")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.model, args.device, dtype)
    tokenizer = tiny_tokenizer(chat_template=False)
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(model.config.hidden_size, generator=generator)
    vec = MarginVector(direction / direction.norm(), layer=-1, pooling="last", template="{prompt}{response}")
    pipe = LegendMarginPipeline(model=model, tokenizer=tokenizer, device=device, margin_vector=vec)
    rows = random_pairs(args.pairs, seed=0)

    view = (vec.layer, vec.pooling)

    def margins_of(items):
        embedded = pipe.embed_items(items, [view], args.batch_size)[view]
        return margin_raw(embedded[:, 0], embedded[:, 1], vec.direction)

    warm = [pipe.encode(row, i, margin_vector=vec, max_length=1024)[0] for i, row in enumerate(rows[: args.batch_size])]
    margins_of(warm)
    synchronize(args.device)
    start = time.perf_counter()
    items = [pipe.encode(row, i, margin_vector=vec, max_length=1024)[0] for i, row in enumerate(rows)]
    encode_s = time.perf_counter() - start
    margins = margins_of(items)
    synchronize(args.device)
    total_s = time.perf_counter() - start
    lengths = [item[f"{side}_input_ids"].shape[1] for item in items for side in ("chosen", "rejected")]
    assert torch.isfinite(margins).all() and margins.numel() == args.pairs

    raw_s, raw_lengths = raw_forward(model, sum(lengths), 512, args.raw_batch, args.device)
    ours_tflops = flops(model.config, lengths) / total_s / 1e12
    raw_tflops = flops(model.config, raw_lengths) / raw_s / 1e12
    ours_tok, raw_tok = sum(lengths) / total_s, sum(raw_lengths) / raw_s
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model, "dtype": str(dtype), "pairs": args.pairs, "tokens": sum(lengths),
        "annotate_pairs_per_s": round(args.pairs / total_s, 2), "annotate_seconds": round(total_s, 2),
        "tokenize_seconds": round(encode_s, 2), "annotate_tokens_per_s": round(ours_tok),
        "annotate_tflops": round(ours_tflops, 1), "raw_seqs512_per_s": round(len(raw_lengths) / raw_s, 2),
        "raw_tokens_per_s": round(raw_tok), "raw_tflops": round(raw_tflops, 1),
        "token_throughput_vs_raw": round(ours_tok / raw_tok, 3), "target": 0.8,
        "meets_target": ours_tok / raw_tok >= 0.8,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
