"""RAHF under DDP: 2 CPU processes (gloo) via `accelerate launch`; the ranks stay in sync and match one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_cpu_processes_match_single_process(tmp_path, launcher, scit_adapter, free_port):
    accelerate, adapter = launcher("accelerate"), scit_adapter
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port),
               str(HERE / "rahf_ddp_worker.py"),
               str(adapter), str(tmp_path / "ddp")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))

    sys.path.insert(0, str(HERE))
    try:
        from rahf_ddp_worker import ADAM_ATOL, run
    finally:
        sys.path.remove(str(HERE))
    single = run(str(adapter), str(tmp_path / "single"), per_device=2)
    reference = {k: v for k, v in single.model.state_dict().items() if ".default." in k}
    assert rank0.keys() == rank1.keys() == reference.keys()
    changed = False
    for name in rank0:
        # The ranks apply the same all-reduced gradients with the same kernels: bit-identical.
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], reference[name], rtol=1e-4, atol=ADAM_ATOL)
        changed |= bool(rank0[name].abs().sum() > 0) and "lora_B" in name
    assert changed
