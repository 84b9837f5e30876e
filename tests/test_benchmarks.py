"""The prepared GPU benchmark script, run on the CPU with a tiny model so a GPU session cannot fail on a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"la_throughput.log", "legend_throughput.log", "rahf_step.log"}
    assert "paired/plain" in (tmp_path / "la_throughput.log").read_text()
    assert "token_throughput_vs_raw" in (tmp_path / "legend_throughput.log").read_text()
    (row,) = json.loads((tmp_path / "rahf_step.json").read_text())
    assert min(row["dpo_step_s"], row["rahf_step_s"], row["rahf_precomputed_step_s"]) > 0
