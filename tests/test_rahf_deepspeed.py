"""RAHF under DeepSpeed ZeRO-2 and ZeRO-3: 2 CPU processes (gloo) via `torchrun`; losses and LoRA match one process.

ZeRO-3 partitions every parameter here, so the early-exit forwards (``hidden_states_at`` raises from a hook) and
the adapter-disabled base forward run on gathered-then-released parameters.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_repalign.testing import tiny_model

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (optional: pip install 'hf_repalign[deepspeed]')")

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero2_and_zero3_two_cpu_processes_match_single_process(tmp_path, launcher, scit_adapter, tokenizer,
                                                                 free_port):
    torchrun, adapter = launcher("torchrun"), scit_adapter
    model_folder = tmp_path / "instructed_model"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(str(model_folder))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(HERE.parent)}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port), str(HERE / "rahf_deepspeed_worker.py"),
               str(adapter), str(model_folder), str(tmp_path / "ds"), "2", "3"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-4000:]

    sys.path.insert(0, str(HERE))
    try:
        from rahf_ddp_worker import ADAM_ATOL, run
    finally:
        sys.path.remove(str(HERE))
    single = run(str(adapter), str(tmp_path / "single"), per_device=2)
    losses = [entry["loss"] for entry in single.state.log_history if "loss" in entry]
    reference = {k: v for k, v in single.model.state_dict().items() if ".default." in k}
    assert len(losses) == 3 and losses[-1] < losses[0]
    for stage in (2, 3):
        folder = tmp_path / "ds" / f"stage{stage}"
        reports = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        for report in reports:
            assert report["loss"] == pytest.approx(losses, rel=1e-5), (stage, report["loss"], losses)
        weights = [load_file(str(folder / f"rank{rank}.safetensors")) for rank in (0, 1)]
        for saved in ("adapter", "checkpoint-3"):
            tensors = load_file(str(folder / saved / "adapter_model.safetensors"))  # PEFT drops the adapter name
            weights.append({name.replace(".weight", ".default.weight"): value for name, value in tensors.items()})
        for trained in weights:
            assert trained.keys() == reference.keys()
            for name in reference:
                torch.testing.assert_close(trained[name], reference[name], rtol=1e-4, atol=ADAM_ATOL)
        combined = load_file(str(folder / "combined" / "adapter_model.safetensors"))
        assert combined and all(t.numel() and torch.isfinite(t).all() for t in combined.values())  # not empty
        if stage == 3:
            assert reports[0]["partitioned"] == reports[0]["params"]  # nothing was kept whole
            assert reports[0]["gathered"] == 0  # the early exits left no parameter gathered
            assert "only as PEFT adapters" in reports[0]["refused"]  # not a crash on partitioned weights
