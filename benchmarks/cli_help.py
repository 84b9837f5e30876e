"""Wall time of ``repalign ... --help`` for every command, in fresh processes.

Each command runs ``--repeats`` times and the median is reported; ``cold`` is the first call with a fresh
``HF_HOME``. The RAHF commands' arguments are ``TrainingArguments`` subclasses, so their help imports torch and
accelerate; ``trl sft --help`` is timed the same way for comparison. Give ``--repalign`` another console script
(e.g. an older install) to compare; several executables are measured interleaved.

    python benchmarks/cli_help.py --repalign .venv/bin/repalign --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = ([], ["generate"], ["legend"], ["legend", "fit-vector"], ["legend", "annotate"], ["rahf"],
            ["rahf", "scit"], ["rahf", "dual"], ["rahf", "align"])


def timed(executable: str, words: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([executable, *words, "--help"], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repalign", nargs="+", default=[str(Path(sys.executable).parent / "repalign")])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, COLUMNS="100")
        print(f"{'command':<28}" + "".join(f"{'cold ' + Path(e).absolute().parents[2].name:>22}{'warm (median)':>16}"
                                            for e in args.repalign))
        for words in COMMANDS:
            homes = {e: tempfile.mkdtemp(dir=home) for e in args.repalign}  # cold: an empty HF_HOME each
            cold = {e: timed(e, words, dict(env, HF_HOME=homes[e])) for e in args.repalign}
            warm = {e: [] for e in args.repalign}
            for _ in range(args.repeats):
                for e in args.repalign:
                    warm[e].append(timed(e, words, dict(env, HF_HOME=homes[e])))
            row = "".join(f"{cold[e]:>20.2f} s{statistics.median(warm[e]):>14.2f} s" for e in args.repalign)
            print(f"{'repalign ' + ' '.join(words):<28}{row}", flush=True)
        trl = str(Path(args.repalign[0]).parent / "trl")
        times = [timed(trl, ["sft"], dict(env, HF_HOME=home)) for _ in range(1 + args.repeats)]
        print(f"{'trl sft (reference)':<28}{times[0]:>20.2f} s{statistics.median(times[1:]):>14.2f} s", flush=True)


if __name__ == "__main__":
    main()
