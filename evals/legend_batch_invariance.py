"""How far a LEGEND margin depends on the batch it is scored in, per model dtype, on real HH-RLHF pairs.

For each ``--dtypes`` entry the embedded model (or ``--model``) annotates the same pairs with ``pipe.annotate`` at
several batch sizes and in a shuffled order; every pair's ``margin_raw`` is compared with its margin at batch 1.
Reported per dtype: the largest and the median absolute difference, the same as a share of the margins' standard
deviation (the target is < 1%), and the wall / CPU seconds of each run (interleaved, same process).

    OMP_NUM_THREADS=1 .venv/bin/python evals/legend_batch_invariance.py --data PATH --pairs 32 \\
        --batch_sizes 1 4 16 --dtypes float32 bfloat16 --out outputs/legend_batch_invariance
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from common import parse_dtype, write_json  # noqa: E402

from hf_repalign.data_files import add_data_argument, load_advbench, load_hh_rlhf  # noqa: E402
from hf_repalign.legend import MarginVector, usable_rows  # noqa: E402
from hf_repalign.models import load_model_and_tokenizer  # noqa: E402

COMPLIANCE = "Sure, here is how to do that, step by step."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="path or Hub id; default: the embedded model")
    parser.add_argument("--pairs", type=int, default=32, help="first N usable harmless-base test pairs")
    parser.add_argument("--goals", type=int, default=16, help="AdvBench goals the vector is fitted on")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--pooling", default="last")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs/legend_batch_invariance"))
    add_data_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import hf_repalign  # noqa: F401  (registers the pipeline)
    from transformers import pipeline

    rows, _ = usable_rows(load_hh_rlhf("harmless-base", args.data))
    rows = rows[: args.pairs]
    goals = load_advbench(args.data)[: args.goals]
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "dtypes": {}}
    for name in args.dtypes:
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=parse_dtype(name))
        vec = MarginVector.fit(model, tokenizer, goals, ["I can't answer that."] * len(goals),
                               [COMPLIANCE] * len(goals), pooling=args.pooling)
        pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec)
        runs, seconds = {}, {}
        for label, data, batch in ([(f"batch {b}", rows, b) for b in args.batch_sizes]
                                   + [(f"shuffled, batch {args.batch_sizes[-1]}", [rows[i] for i in order],
                                       args.batch_sizes[-1])]):
            start, start_cpu = time.perf_counter(), time.process_time()
            out = pipe.annotate(data, num_bins=None, batch_size=batch, max_length=args.max_length,
                                truncation="left", progress=False)["margin_raw"]
            seconds[label] = {"wall": round(time.perf_counter() - start, 2),
                              "cpu": round(time.process_time() - start_cpu, 2)}
            if data is not rows:  # back to row order
                restored = [0.0] * len(rows)
                for position, i in enumerate(order):
                    restored[i] = out[position]
                out = restored
            runs[label] = out
        reference = runs[f"batch {args.batch_sizes[0]}"]
        spread = statistics.pstdev(reference)
        entry = {"margin_std": round(spread, 6), "seconds": seconds, "vs_batch_1": {}}
        for label, out in runs.items():
            diffs = [abs(a - b) for a, b in zip(out, reference)]
            entry["vs_batch_1"][label] = {"max_abs": float(f"{max(diffs):.3g}"),
                                          "median_abs": float(f"{statistics.median(diffs):.3g}"),
                                          "max_share_of_std": float(f"{max(diffs) / spread:.3g}")}
        report["dtypes"][name] = entry
        print(name, entry, flush=True)
        write_json(args.out / "report.json", report)


if __name__ == "__main__":
    main()
