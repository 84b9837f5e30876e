"""Does a fitted margin vector separate refusals from the model's own compliance on held-out AdvBench goals?

    nice -n 10 .venv/bin/python benchmarks/legend_vector_check.py --vector outputs/legend_real_data/vector \
        --start 100 --goals 30
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import pipeline

import hf_repalign  # noqa: F401
from hf_repalign.data_files import read_advbench, shared_data_dir
from hf_repalign.legend import MarginVector
from hf_repalign.legend.vector import DEFAULT_REFUSAL, generate_responses
from hf_repalign.models import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vector", type=Path, required=True)
    parser.add_argument("--start", type=int, default=100, help="first held-out goal (the vector used 0..start-1)")
    parser.add_argument("--goals", type=int, default=30)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer()
    vec = MarginVector.from_pretrained(args.vector)
    goals = read_advbench(shared_data_dir() / "advbench" / "harmful_behaviors.csv")[args.start : args.start + args.goals]
    answers = generate_responses(model, tokenizer, goals, vec.template, args.max_new_tokens, batch_size=len(goals))
    pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, device="cpu", batch_size=8)
    rows = [{"prompt": g, "chosen": DEFAULT_REFUSAL, "rejected": a} for g, a in zip(goals, answers)]
    margins = [out["margin_raw"] for out in pipe(rows)]
    share = sum(m > 0 for m in margins) / len(margins)
    print(f"held-out AdvBench goals {args.start}..{args.start + len(goals) - 1}: refusal vs own answer, "
          f"margin_raw > 0 in {share:.1%} ({sum(m > 0 for m in margins)}/{len(margins)}); "
          f"mean {sum(margins) / len(margins):.3f}")
    print("example answer:", repr(answers[0][:120]))


if __name__ == "__main__":
    main()
