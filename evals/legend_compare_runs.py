"""Compare the margins of two annotated files on the pairs they share (e.g. a float32 and a bfloat16 run).

    .venv/bin/python evals/legend_compare_runs.py run_fp32/harmless-base.jsonl run_bf16/harmless-base.jsonl

Prints the number of shared pairs, the share with margin_raw > 0 in each, sign agreement and Pearson correlation.
"""

from __future__ import annotations

import argparse
import json

import torch

from hf_repalign.text_files import read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()

    def key(row):
        return json.dumps([row.get("prompt"), row["chosen"], row["rejected"]])

    b = {key(row): row["margin_raw"] for row in read_jsonl(args.b)}
    shared = [(row["margin_raw"], b[key(row)]) for row in read_jsonl(args.a) if key(row) in b]
    if not shared:
        raise SystemExit("the two files share no pairs.")
    x, y = torch.tensor(shared, dtype=torch.float64).T
    print(json.dumps({
        "shared_pairs": len(shared),
        "share_positive_a": round(float((x > 0).double().mean()), 4),
        "share_positive_b": round(float((y > 0).double().mean()), 4),
        "sign_agreement": round(float(((x > 0) == (y > 0)).double().mean()), 4),
        "pearson": round(float(torch.corrcoef(torch.stack([x, y]))[0, 1]), 4),
    }, indent=2))


if __name__ == "__main__":
    main()
