"""Dual (RAHF step 1b): response-only SFT data, two adapters on one base, usable by RAHFTrainer."""

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from hf_repalign.formats import encode_pair
from hf_repalign.rahf.dual import DualConfig, dual_dataset, train_dual
from hf_repalign.rahf.instructions import instructed_template
from hf_repalign.rahf.trainer import RAHFConfig, RAHFTrainer
from hf_repalign.testing import tiny_model

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five, obviously!!"},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
    {"prompt": "Say hi.", "chosen": "Hello there, friend.", "rejected": "Go away."},
    {"prompt": "Count to three.", "chosen": "1, 2, 3.", "rejected": "7"},
]


def test_sft_data_masks_everything_but_the_response(tokenizer):
    data = dual_dataset(ROWS, tokenizer, "rejected")
    ids, n_prompt = encode_pair(tokenizer, ROWS[0]["prompt"], ROWS[0]["rejected"], instructed_template(tokenizer))
    assert data[0]["input_ids"] == ids
    assert data[0]["completion_mask"] == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tokenizer.decode([t for t, m in zip(ids, data[0]["completion_mask"]) if m]).startswith("Five")


def test_train_dual_gives_two_adapters_on_one_base(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    args = DualConfig(output_dir=str(tmp_path / "dual"), per_device_train_batch_size=2, max_steps=3, report_to="none",
                      use_cpu=True, save_strategy="no", learning_rate=1e-2, max_length=None)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    folders = train_dual(model, tokenizer, ROWS, args, peft_config=lora)
    good = load_file(str(folders["good"] / "adapter_model.safetensors"))
    bad = load_file(str(folders["bad"] / "adapter_model.safetensors"))
    assert good.keys() == bad.keys()
    assert any(not torch.equal(good[k], bad[k]) for k in good if "lora_B" in k)
    assert all(good[k].abs().sum() > 0 for k in good if "lora_B" in k)
    PeftModel.from_pretrained(tiny_model("llama", vocab_size=len(tokenizer)), str(folders["good"]))

    rahf = RAHFTrainer(tiny_model("llama", vocab_size=len(tokenizer)),
                       RAHFConfig(output_dir=str(tmp_path / "rahf"), method="dual", report_to="none", use_cpu=True,
                                  per_device_train_batch_size=2, max_steps=1, target_layers=[2], save_strategy="no"),
                       train_dataset=ROWS, processing_class=tokenizer,
                       instructed=(str(folders["good"]), str(folders["bad"])))
    batch = rahf.data_collator([rahf.train_dataset[i] for i in range(2)])
    assert rahf._difference(batch, batch["input_ids"]).abs().sum() > 0
    rahf.train()


def _dual_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "dual"), per_device_train_batch_size=2, max_steps=1, report_to="none",
                use_cpu=True, save_strategy="no", learning_rate=1e-2, max_length=None)
    base.update(kw)
    return DualConfig(**base)


def test_a_response_cut_away_by_max_length_is_an_error_naming_row_and_field(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    rows = ROWS[:2] + [{"prompt": "Please tell me a long story. " * 4, "chosen": "Fine.", "rejected": "No."}]
    lora = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="row 2, field 'chosen'.*max_length=100"):
        train_dual(model, tokenizer, rows, _dual_args(tmp_path, max_length=100), peft_config=lora)
    assert len(dual_dataset(rows, tokenizer, "chosen", max_length=200)) == 3


def test_interrupted_save_keeps_the_previous_adapter_folder(tmp_path, tokenizer, monkeypatch):
    lora = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    folders = train_dual(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, ROWS, _dual_args(tmp_path),
                         peft_config=lora)
    before = (folders["good"] / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LoraConfig, "save_pretrained", crash)  # after the weights file is written
    with pytest.raises(KeyboardInterrupt):
        train_dual(tiny_model("llama", vocab_size=len(tokenizer), seed=3), tokenizer, ROWS, _dual_args(tmp_path),
                   peft_config=lora)
    assert (folders["good"] / "adapter_model.safetensors").read_bytes() == before
    assert (folders["good"] / "adapter_config.json").is_file()
    assert not [p.name for p in (tmp_path / "dual").iterdir() if p.name.startswith(".")]


def test_a_checkpoint_cut_short_is_never_visible_as_checkpoint_n(tmp_path, tokenizer, monkeypatch):
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    args = DualConfig(output_dir=str(tmp_path / "dual"), per_device_train_batch_size=2, max_steps=2, report_to="none",
                      use_cpu=True, save_strategy="steps", save_steps=1, learning_rate=1e-2, max_length=None)
    lora = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    original = Trainer._save_rng_state

    def crash_at_step_2(self, output_dir):  # the last file of a checkpoint: model and optimizer are already there
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_dual(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, ROWS, args, peft_config=lora)
    checkpoints = tmp_path / "dual" / "good_checkpoints"
    assert get_last_checkpoint(str(checkpoints)) == str(checkpoints / "checkpoint-1")
    assert (checkpoints / "checkpoint-1" / "rng_state.pth").is_file()
