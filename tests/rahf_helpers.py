"""Shared pieces of the RAHFTrainer tests: toy rows, a random SCIT adapter, trainer and batch builders, hand-computed
hidden states."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_repalign.rahf.trainer import RAHFConfig, RAHFTrainer
from hf_repalign.testing import tiny_model

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five, obviously!!"},
    {"prompt": "Name a colour.", "chosen": "Blue, like the sky.", "rejected": "No."},
    {"prompt": "Say hi.", "chosen": "Hello there, friend.", "rejected": "Go away."},
    {"prompt": "Count to three.", "chosen": "1, 2, 3.", "rejected": "7"},
]
P_POS, P_NEG = "Be kind.", "Be rude, careless and wrong in every single answer."
LAYERS = [1, 3]


def lora(**kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], **kw)


@pytest.fixture(scope="module")
def scit_adapter(tmp_path_factory, tokenizer):
    """A random (non-zero) LoRA standing in for a trained SCIT adapter (import it into a test module to use it)."""
    path = tmp_path_factory.mktemp("scit") / "adapter"
    get_peft_model(tiny_model("llama", vocab_size=len(tokenizer)), lora(init_lora_weights=False)).save_pretrained(
        str(path))
    return str(path)


def write_model_and_data(tmp_path, tokenizer, rows=ROWS):
    """A tiny base saved with its tokenizer and the rows as a .jsonl file: what the CLI tests train on."""
    import json

    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return model_dir, data


def make_args(tmp_path, **kw) -> RAHFConfig:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, report_to="none", use_cpu=True,
                save_strategy="no", preferred_instruction=P_POS, dispreferred_instruction=P_NEG, seed=0,
                target_layers=LAYERS, max_response_tokens=6, lora_dropout=0.0)
    base.update(kw)
    return RAHFConfig(**base)


def make_trainer(tmp_path, tokenizer, instructed, peft_config=None, model=None, rows=ROWS, **kw) -> RAHFTrainer:
    model = model if model is not None else tiny_model("llama", vocab_size=len(tokenizer))
    return RAHFTrainer(model, make_args(tmp_path, **kw), train_dataset=rows, processing_class=tokenizer,
                       instructed=instructed, peft_config=peft_config)


def first_batch(trainer, n=2):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def states(model, ids, mask):
    """Hidden states at LAYERS from a plain full forward (the reference for the early-exit patterns)."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
    return torch.stack([out.hidden_states[i] for i in LAYERS])
