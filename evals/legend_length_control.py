"""Length-controlled LEGEND margins on HH-RLHF: does removing response length leave anything that agrees with people?

One pass on the embedded model (or ``--model``), layer -1, poolings ``last`` / ``mean`` / ``mean_all``:

1. Fit the margin direction from the first ``--goals`` AdvBench goals as ``MarginVector.induce`` does (the model's
   greedy answers vs the fixed refusal), plain and with ``length_control=True`` (the length direction, estimated
   from the same embeddings, projected out).
2. Score the first ``--rows`` usable test pairs of HH-RLHF harmless-base and helpful-base with four annotators per
   pooling: plain; length-controlled direction (fit time); margin regressed on the length difference (annotate
   time, ``annotate(..., length_control=True)``); both. A pair whose response alone is longer than
   ``--max_length`` is left out and listed in the report.
3. Per annotator: Spearman rho of the margin with the response-length difference (chosen minus rejected, tokens);
   agreement with the human label (margin > 0 means chosen is preferred; a margin within ``--epsilon`` of 0 is a
   tie and counts half, for every annotator alike, the length-only ones included); the length-only annotator
   ("the shorter response is preferred") and its mirror ("the longer is preferred"); 95% bootstrap intervals
   (``--bootstrap`` resamples of the pairs) of the agreement and of the paired differences annotator minus each
   length-only one. ``--rescore`` recomputes the tables from the saved margins.

    OMP_NUM_THREADS=1 .venv/bin/python evals/legend_length_control.py --data PATH --rows 300 \\
        --out outputs/legend_length_control
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from common import parse_dtype  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from legend_evidence import EPSILON, agreement, save_split  # noqa: E402

from hf_repalign.data_files import add_data_argument, load_advbench, load_hh_rlhf  # noqa: E402
from hf_repalign.formats import PreferenceFormatError, PreferenceTriplet, to_triplet  # noqa: E402
from hf_repalign.legend import usable_rows  # noqa: E402
from hf_repalign.legend.diagnostics import length_diagnostics  # noqa: E402
from hf_repalign.legend.embedding import embed_pairs, encode_triplets, response_length  # noqa: E402
from hf_repalign.legend.margin import (  # noqa: E402
    length_direction,
    length_slope,
    margin_direction,
    margin_raw,
    remove_direction,
    remove_length,
)
from hf_repalign.legend.vector import DEFAULT_REFUSAL, generate_responses  # noqa: E402
from hf_repalign.models import load_model_and_tokenizer  # noqa: E402

POOLINGS = ("last", "mean", "mean_all")


def agreement_scores(scores: list[float], epsilon: float) -> torch.Tensor:
    """Per pair: 1 if the score prefers chosen, 0.5 for a tie (|score| <= epsilon), 0 otherwise."""
    return torch.tensor([agreement(s, epsilon) for s in scores], dtype=torch.float64)


def bootstrap(values: torch.Tensor, resamples: torch.Tensor) -> list[float]:
    means = values[resamples].mean(dim=1)
    return [round(float(means.quantile(0.025)), 4), round(float(means.quantile(0.975)), 4)]


def embed(model, tokenizer, triplets, views, batch_size, max_length=None):
    """Embeddings and encoded items of the pairs that fit ``max_length`` once the prompt is cut; the rows whose
    response alone is longer are left out and returned, so the report can count them."""
    items, too_long = [], []
    for row, triplet in enumerate(triplets):
        try:
            items.append(encode_triplets(tokenizer, [triplet], None, max_length, "left", rows=[row])[0][0])
        except PreferenceFormatError:
            too_long.append(row)
    with torch.no_grad():
        return embed_pairs(model, items, views, batch_size), items, too_long


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--goals", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=300, help="first N usable pairs of each HH split")
    parser.add_argument("--splits", nargs="+", default=["harmless-base", "helpful-base"])
    parser.add_argument("--max_length", type=int, default=512, help="longer pairs have their prompt cut (left)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=EPSILON, help="|margin| at or below this is a tie")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs/legend_length_control"))
    parser.add_argument("--rescore", action="store_true",
                        help="recompute the tables of --out from its saved margins, without the model")
    add_data_argument(parser)
    args = parser.parse_args()
    if args.rescore:
        return rescore(args)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=parse_dtype(args.dtype))
    views = [(-1, pooling) for pooling in POOLINGS]
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    start = time.perf_counter()
    goals = load_advbench(args.data)[: args.goals]
    answers = generate_responses(model, tokenizer, goals, None, args.max_new_tokens, batch_size=16)
    emb, items, _ = embed(model, tokenizer, [PreferenceTriplet(g, DEFAULT_REFUSAL, a) for g, a in zip(goals, answers)],
                          views, args.batch_size)
    lengths = {side: [response_length(it, side) for it in items] for side in ("chosen", "rejected")}
    directions = {}
    for view in views:
        plain = margin_direction(emb[view][:, 0], emb[view][:, 1])
        along = length_direction([emb[view][:, 0], emb[view][:, 1]], [lengths["chosen"], lengths["rejected"]])
        directions[view] = {"plain": plain, "length-controlled": remove_direction(plain, along),
                            "cos_plain_length": round(float(plain @ along), 4)}
    report["fit"] = {"seconds": round(time.perf_counter() - start, 1),
                     "harmful_answer_tokens": {"min": min(lengths["rejected"]), "max": max(lengths["rejected"])},
                     "cos_direction_vs_length_direction": {v[1]: directions[v]["cos_plain_length"] for v in views}}
    print("fitted", report["fit"], flush=True)

    for split in args.splits:
        rows, _ = usable_rows(load_hh_rlhf(split, args.data))
        rows = rows[: args.rows]
        start = time.perf_counter()
        emb, items, too_long = embed(model, tokenizer, [to_triplet(r, i) for i, r in enumerate(rows)], views,
                                     args.batch_size, args.max_length)
        diff = [response_length(it, "chosen") - response_length(it, "rejected") for it in items]
        saved = {"length_diff": diff}
        for view in views:
            for kind in ("plain", "length-controlled"):
                projected = margin_raw(emb[view][:, 0], emb[view][:, 1], directions[view][kind]).tolist()
                saved[f"{view[1]}, {kind}"] = projected
                saved[f"{view[1]}, {kind} + regressed"] = remove_length(projected, diff, length_slope(projected, diff))
        table = {"left_out_response_longer_than_max_length": too_long, "seconds": round(time.perf_counter() - start, 1),
                 **score(saved, args.epsilon, args.bootstrap)}
        save_split(args.out, report, split, table, saved)


def score(saved: dict, epsilon: float, resamples: int) -> dict:
    """The table of one split from its saved margins: agreement, both length-only annotators, paired differences,
    rho with the length difference. The bootstrap is seeded per split, so a rescore gives the same intervals."""
    diff = saved["length_diff"]
    n = len(diff)
    draws = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(0))
    shorter = agreement_scores([-d for d in diff], epsilon)
    longer = agreement_scores(diff, epsilon)
    table = {"pairs": n, "chosen_shorter": sum(d < 0 for d in diff), "chosen_longer": sum(d > 0 for d in diff),
             "length_only": {"agreement": round(float(shorter.mean()), 4), "ci95": bootstrap(shorter, draws)},
             "longer_only": {"agreement": round(float(longer.mean()), 4), "ci95": bootstrap(longer, draws)}}
    for label, margins in saved.items():
        if label == "length_diff":
            continue
        agree = agreement_scores(margins, epsilon)
        table[label] = {
            "agreement": round(float(agree.mean()), 4), "ci95": bootstrap(agree, draws),
            "minus_length_only": round(float((agree - shorter).mean()), 4),
            "minus_length_only_ci95": bootstrap(agree - shorter, draws),
            "minus_longer_only": round(float((agree - longer).mean()), 4),
            "minus_longer_only_ci95": bootstrap(agree - longer, draws),
            "spearman_vs_length_diff": length_diagnostics(margins, diff)["spearman_margin_vs_length_diff"],
        }
    return table


def rescore(args: argparse.Namespace) -> None:
    """Recompute the tables of ``--out`` from its saved margins (no model): ``--rescore``."""
    report = json.loads((args.out / "report.json").read_text())
    for split in args.splits:
        saved = json.loads((args.out / f"{split}.margins.json").read_text())
        kept = {k: report[split][k] for k in ("left_out_response_longer_than_max_length", "seconds")
                if k in report.get(split, {})}
        save_split(args.out, report, split, {**kept, **score(saved, args.epsilon, args.bootstrap)}, saved)


if __name__ == "__main__":
    main()
