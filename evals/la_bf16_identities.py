"""Which Linear Alignment identities hold in bf16: fp32 vs bf16 on the embedded model.

    python evals/la_bf16_identities.py --data PATH --threads 1

Greedy, MT-Bench first turns, principle "Always answer in French.". For each dtype it reports the share of rows whose
tokens are identical for: ``alpha=0`` (paired) vs ``generate`` on the principle prompts, ``alpha=-1`` (paired) vs
plain ``generate``, and the bare processor vs ``paired_generate`` at ``alpha=2``; plus the largest first-step logit
difference between the plain rows run alone (B rows) and inside the 2B-row paired batch.
"""

from __future__ import annotations

import argparse

import torch

from hf_repalign import LinearAlignmentProcessor, build_principle_inputs, paired_generate
from hf_repalign.data_files import add_data_argument, load_mt_bench
from hf_repalign.linear_alignment.forward import cached_step
from hf_repalign.models import load_model_and_tokenizer

PRINCIPLE = "Always answer in French."


def same_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).all(dim=1).float().mean())


def run(dtype: str, questions: list[str], tokens: int) -> list[float]:
    model, tokenizer = load_model_and_tokenizer(dtype=dtype)
    plain, principle = build_principle_inputs(tokenizer, questions, PRINCIPLE)
    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def la(alpha: float, paired: bool) -> torch.Tensor:
        proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=alpha)
        extra = {"custom_generate": paired_generate} if paired else {}
        return model.generate(**plain, logits_processor=[proc], **gen, **extra)[:, plain["input_ids"].shape[1]:]

    with torch.inference_mode():
        prompted = model.generate(**principle, **gen)[:, principle["input_ids"].shape[1]:]
        plain_out = model.generate(**plain, **gen)[:, plain["input_ids"].shape[1]:]
        alone, _ = cached_step(model, plain["input_ids"], plain["attention_mask"])
        width = max(plain["input_ids"].shape[1], principle["input_ids"].shape[1])
        pad = tokenizer.pad_token_id

        def left(x, value):
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        both, _ = cached_step(model, torch.cat([left(plain["input_ids"], pad), left(principle["input_ids"], pad)]),
                              torch.cat([left(plain["attention_mask"], 0), left(principle["attention_mask"], 0)]))
        noise = float((both[: len(questions)] - alone).abs().max())
        return [same_rows(la(0.0, True), prompted), same_rows(la(-1.0, True), plain_out),
                same_rows(la(2.0, False), la(2.0, True)), noise]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    add_data_argument(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_mt_bench(args.data)[: args.n]
    print(f"\n{args.n} MT-Bench questions, greedy, {args.tokens} tokens; share of rows with identical tokens\n")
    print("| dtype | alpha=0 vs principle prompt | alpha=-1 vs plain | bare vs paired (alpha=2) | "
          "max first-step logit diff, B vs 2B rows |")
    print("|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        values = run(dtype, questions, args.tokens)
        print(f"| {dtype} | " + " | ".join(f"{v:.3f}" if i < 3 else f"{v:.2e}" for i, v in enumerate(values)) + " |",
              flush=True)


if __name__ == "__main__":
    main()
