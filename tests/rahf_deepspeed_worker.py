"""Run by tests/test_rahf_deepspeed.py under `torchrun --nproc_per_node 2` (CPU, gloo): RAHF with DeepSpeed ZeRO.

Usage: rahf_deepspeed_worker.py ADAPTER MODEL OUT STAGE [STAGE ...]. ADAPTER is the SCIT adapter; MODEL a model
folder that ZeRO-3 must refuse as a separate instructed model. For each ZeRO stage it writes OUT/stage{s}/:
rank{r}.json (logged losses, partition counts, the refusal), rank{r}.safetensors (the trained LoRA, gathered),
adapter/ (RAHFTrainer.save_pretrained) and checkpoint-3/ (the Trainer's checkpoint).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import importlib  # noqa: E402

import deepspeed  # noqa: E402
import torch  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from rahf_ddp_worker import ROWS, run  # noqa: E402

from hf_repalign.rahf.trainer import RAHFConfig, RAHFTrainer  # noqa: E402
from hf_repalign.testing import tiny_model, tiny_tokenizer  # noqa: E402

_prepare_backend = PartialState._prepare_backend


def _cpu_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    """Accelerate finds no DeepSpeed backend without a GPU (each process then trains alone): use gloo."""
    return _prepare_backend(self, True, sagemaker_dp, backend)


def zero_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        # Partition every parameter (the default threshold keeps a tiny model's whole) and release each one as
        # soon as its module is done, so a parameter left gathered by an early exit shows.
        zero.update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0, stage3_max_live_parameters=0)
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero, "zero_allow_untested_optimizer": True}


def train(adapter: str, model_folder: str, out: str, stage: int) -> None:
    trainer = run(adapter, out, per_device=1, deepspeed=zero_config(stage), use_cpu=False, save_strategy="steps",
                  save_steps=3)  # checkpoint-3 as well
    assert trainer.is_deepspeed_enabled and trainer.args.world_size == 2, trainer.args.world_size
    with torch.no_grad():  # forwards that end early with no backward after them
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.compute_loss(trainer.model_wrapped, batch)
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    everything = list(model.parameters())
    partitioned = sum(hasattr(p, "ds_numel") and p.numel() < p.ds_numel for p in everything)
    gathered = sum(hasattr(p, "ds_status") and p.ds_status.name != "NOT_AVAILABLE" for p in everything)
    lora = [(name, p) for name, p in model.named_parameters() if ".default." in name]
    with deepspeed.zero.GatheredParameters([p for _, p in lora]):  # a no-op below ZeRO-3
        weights = {name: p.detach().clone().contiguous() for name, p in lora}
    # every process: ZeRO-3 gathers the adapters; "stacked" is the trained LoRA alone, the default folds the step-1
    # adapter in (its weights gathered too)
    trainer.save_pretrained(os.path.join(out, "adapter"), save_as="stacked")
    trainer.save_pretrained(os.path.join(out, "combined"))
    rank = trainer.args.process_index
    save_file(weights, os.path.join(out, f"rank{rank}.safetensors"))
    report = {"refused": None}
    if stage == 3:  # a separate instructed model loaded under ZeRO-3 is partitioned without gather hooks
        tokenizer = tiny_tokenizer()
        try:
            args = RAHFConfig(output_dir=out, deepspeed=zero_config(3), use_cpu=False, report_to="none",
                              target_layers=[1, 3], lora_on="base")  # "instructed" would train on it instead
            RAHFTrainer(tiny_model("llama", vocab_size=len(tokenizer)), args, train_dataset=ROWS,
                        processing_class=tokenizer, instructed=model_folder)
        except ValueError as err:
            report["refused"] = str(err)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({**report, "loss": losses, "partitioned": partitioned, "gathered": gathered,
                   "params": len(everything)}, handle)


if __name__ == "__main__":
    PartialState._prepare_backend = _cpu_backend
    # An inference-only all-reduce kernel: skip its C++ build (minutes on 2 cores, needs a compiler).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    adapter, model_folder, out, stages = sys.argv[1], sys.argv[2], sys.argv[3], [int(s) for s in sys.argv[4:]]
    for stage in stages:
        train(adapter, model_folder, os.path.join(out, f"stage{stage}"), stage)
