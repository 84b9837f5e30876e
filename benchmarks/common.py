"""Shared helpers for the benchmarks: model choice, timing, a random-weight Llama-2-7B shape for GPUs, outputs."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hf_repalign.artifacts import atomic_write_text


def build_model(name: str, device: str, dtype: torch.dtype):
    """``tiny`` (code-built Llama), ``embedded`` (SmolLM2-135M), ``llama7b-random``, or a local path / Hub id."""
    if name == "tiny":
        from hf_repalign.testing import tiny_model

        return tiny_model("llama", vocab_size=261, hidden_size=64, num_layers=4).to(device=device, dtype=dtype)
    if name == "llama7b-random":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        return model.eval()
    from hf_repalign.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(None if name == "embedded" else name, dtype=dtype)
    return model.to(device).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int, device: str, with_cpu_time: bool = False):
    """Median seconds per run, the candidates interleaved so drift hits them all alike (one warm-up each).

    ``with_cpu_time=True`` also returns the medians of this process's CPU seconds (``time.process_time``, steadier
    on a shared CPU), measured on the same runs: ``(wall, cpu)``.
    """
    for fn in runs.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    medians = [{name: statistics.median(values) for name, values in samples.items()} for samples in (wall, cpu)]
    return tuple(medians) if with_cpu_time else medians[0]


def parse_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def write_json(path: str | os.PathLike, data) -> None:
    """Results are written atomically, so an interrupted benchmark never leaves a half-written file."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
