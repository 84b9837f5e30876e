"""Run by tests/test_rahf_ddp.py under `accelerate launch --cpu --num_processes 2` (gloo): RAHF training steps."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hf_repalign.rahf.trainer import RAHFConfig, RAHFTrainer  # noqa: E402
from hf_repalign.testing import tiny_model, tiny_tokenizer  # noqa: E402

# Unequal response lengths: the ranks' loss items are counted across processes (num_items_in_batch), so the
# result still equals one process on the global batch.
ROWS = [{"prompt": f"Question number {i}?", "chosen": "Yes" + "!" * (3 * i), "rejected": f"Nope {i:02d}"}
        for i in range(8)]

LEARNING_RATE, STEPS = 1e-2, 3
# Adam moves each weight by about lr per step whatever the gradient's size, so an element whose gradient is near
# zero can take a visibly different step when another process layout or CPU kernel rounds that gradient differently
# (measured: 1 of 256 elements off by 2.9e-5 on AVX512). Trained weights are therefore compared with an absolute
# tolerance of 1% of the largest total movement of an element, the sum of the step sizes (linear decay:
# 1e-2 + 6.7e-3 + 3.3e-3 = 2e-2), i.e. 2e-4; a real fault (unsynchronised gradients) moves elements by ~1e-2.
ADAM_ATOL = 0.01 * sum(LEARNING_RATE * (1 - step / STEPS) for step in range(STEPS))


def run(adapter: str, out: str, per_device: int, **overrides) -> RAHFTrainer:
    """Three RAHF steps on the tiny Llama; ``overrides`` replace RAHFConfig fields (e.g. ``deepspeed=...``)."""
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    config = dict(output_dir=out, per_device_train_batch_size=per_device, max_steps=STEPS,
                  learning_rate=LEARNING_RATE, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                  target_layers=[1, 3], preferred_instruction="Be kind.",
                  dispreferred_instruction="Be rude and wrong always.",
                  lora_dropout=0.0, logging_steps=1, max_response_tokens=8, dataloader_drop_last=True)
    args = RAHFConfig(**{**config, **overrides})
    trainer = RAHFTrainer(tiny_model("llama", vocab_size=len(tokenizer)), args, train_dataset=ROWS,
                          processing_class=tokenizer, instructed=adapter)
    trainer.train()
    return trainer


if __name__ == "__main__":
    adapter, out = sys.argv[1], sys.argv[2]
    trainer = run(adapter, out, per_device=1)
    rank = trainer.args.process_index
    assert trainer.args.world_size == 2, trainer.args.world_size
    weights = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items() if ".default." in k}
    save_file(weights, os.path.join(out, f"rank{rank}.safetensors"))
