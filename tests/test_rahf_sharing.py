"""What RAHF saves and pushes loads with plain transformers + peft, in a fresh process without hf_repalign, as exactly
the trained model; pushes are one upload of one complete, pickle-free artifact (against a fake HfApi)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hf_repalign.testing import tiny_model

from rahf_helpers import lora, make_trainer

PLAIN_LOAD = Path(__file__).with_name("rahf_plain_load.py")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


@pytest.fixture()
def base_dir(tmp_path, tokenizer):
    """A tiny base saved to a folder (what the adapters name as their base) and a non-zero step-1 adapter on it."""
    folder = tmp_path / "base"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora(init_lora_weights=False)).save_pretrained(
        str(tmp_path / "scit"))
    return folder


def _trained(tmp_path, tokenizer, base_dir, **kw):
    trainer = make_trainer(tmp_path, tokenizer, str(tmp_path / "scit"), model=AutoModelForCausalLM.from_pretrained(
        base_dir), max_steps=2, learning_rate=1e-2, **kw)
    trainer.train()
    with torch.no_grad():
        logits = trainer.model.eval()(input_ids=IDS).logits
    save_file({"input_ids": IDS, "logits": logits.contiguous()}, str(tmp_path / "expected.safetensors"))
    return trainer, logits


def _load_plain(folder, base_dir, kind, tmp_path):
    """Load ``folder`` in a fresh process where hf_repalign is not importable, from another working directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, str(PLAIN_LOAD), str(folder), str(base_dir),
                             str(tmp_path / "expected.safetensors"), kind],
                            capture_output=True, text=True, cwd=elsewhere, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


def test_default_save_loads_alone_as_the_trained_model_with_plain_peft(tmp_path, tokenizer, base_dir):
    trainer, logits = _trained(tmp_path, tokenizer, base_dir)  # lora_on="instructed" on the step-1 adapter
    with torch.no_grad():  # negative control: the base alone is far from the trained model
        assert (AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=IDS).logits - logits).abs().max() > 1e-2
    out = trainer.save_pretrained(tmp_path / "rahf")
    signature = json.loads((out / "hf_repalign_base.json").read_text())
    assert signature["save_as"] == "adapter" and signature["stacked_on"] == []
    assert not (out / "training_args.bin").exists() and (out / "tokenizer.json").is_file()
    output = _load_plain(out, base_dir, "adapter", tmp_path)
    assert "AutoPeftModelForCausalLM" in output and "PeftModel" in output and output.strip().endswith("ok")
    # the card's snippet loads the folder by its absolute path: it runs from any directory
    assert f'AutoPeftModelForCausalLM.from_pretrained("{out.absolute()}")' in (out / "README.md").read_text()


def test_merged_save_is_a_plain_transformers_model_equal_to_the_trained_one(tmp_path, tokenizer, base_dir):
    trainer, logits = _trained(tmp_path, tokenizer, base_dir)
    out = trainer.save_pretrained(tmp_path / "merged", save_as="merged")
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert "library_name: transformers" in (out / "README.md").read_text()
    _load_plain(out, base_dir, "merged", tmp_path)
    with torch.no_grad():  # the trained model itself is untouched: a copy was merged
        assert torch.equal(trainer.model(input_ids=IDS).logits, logits)


def test_stacked_save_says_so_and_is_not_the_model_alone(tmp_path, tokenizer, base_dir):
    trainer, logits = _trained(tmp_path, tokenizer, base_dir)
    out = trainer.save_pretrained(tmp_path / "stacked", save_as="stacked")
    signature = json.loads((out / "hf_repalign_base.json").read_text())
    assert signature["save_as"] == "stacked" and signature["stacked_on"] == [str(tmp_path / "scit")]
    assert "Loaded alone it is NOT the trained model" in (out / "README.md").read_text()
    with torch.no_grad():
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
        assert not torch.allclose(alone(input_ids=IDS).logits, logits, atol=1e-4)


def test_dual_default_save_folds_the_good_adapter(tmp_path, tokenizer, base_dir):
    bad = tmp_path / "bad"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora(init_lora_weights=False)).save_pretrained(
        str(bad))
    trainer = make_trainer(tmp_path, tokenizer, [str(tmp_path / "scit"), str(bad)], method="dual",
                           model=AutoModelForCausalLM.from_pretrained(base_dir), max_steps=1, learning_rate=1e-2,
                           lora_target_modules=["q_proj", "o_proj"])  # other modules than the good adapter's
    trainer.train()
    out = trainer.save_pretrained(tmp_path / "rahf")
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=IDS).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_save_as_is_checked():
    from hf_repalign.rahf import RAHFConfig

    with pytest.raises(ValueError, match="save_as must be one of"):
        RAHFConfig(output_dir="x", save_as="gguf")
