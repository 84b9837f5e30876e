"""Bad input to RAHF's steps gets a clear error naming the problem: an empty dataset, a LoRA rank no layer can use."""

import pytest
from peft import LoraConfig

from hf_repalign import cli
from hf_repalign.rahf import DualConfig, SCITConfig, SCITTrainer, train_dual
from hf_repalign.testing import tiny_model

from rahf_helpers import ROWS, make_trainer, scit_adapter, write_model_and_data  # noqa: F401


def test_an_empty_dataset_is_named_as_such_not_blamed_on_max_prompt_length(tmp_path, tokenizer, scit_adapter):
    with pytest.raises(ValueError, match=r"RAHF: train_dataset is empty \(0 rows\)") as err:
        make_trainer(tmp_path, tokenizer, scit_adapter, rows=[])
    assert "max_prompt_length" not in str(err.value)
    args = SCITConfig(output_dir=str(tmp_path / "s"), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"SCIT: train_dataset is empty"):
        SCITTrainer(tiny_model("llama", vocab_size=len(tokenizer)), args, train_dataset=[], processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"Dual: train_dataset is empty"):
        train_dual(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, [],
                   DualConfig(output_dir=str(tmp_path / "d"), report_to="none", use_cpu=True))


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_cli_names_an_empty_dataset_file(tmp_path, content, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text(content)
    assert cli.main(["rahf", "scit", "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"), "--report_to",
                     "none", "--use_cpu"]) == 2
    assert f"--dataset_name {data} is empty" in capsys.readouterr().err


def test_a_huge_lora_rank_is_refused_before_allocation(tmp_path, tokenizer, scit_adapter, monkeypatch):
    import peft

    def no_allocation(*args, **kwargs):
        raise AssertionError("peft was asked to build the adapter")

    with pytest.raises(ValueError, match=r"LoRA rank r=1000000000 is larger than any layer .*\(at most 32"):
        make_trainer(tmp_path, tokenizer, scit_adapter, lora_r=10**9, lora_on="base")
    monkeypatch.setattr(peft, "get_peft_model", no_allocation)
    huge = LoraConfig(r=10**9, target_modules=["q_proj"])
    args = SCITConfig(output_dir=str(tmp_path / "s"), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"r=1000000000"):
        SCITTrainer(tiny_model("llama", vocab_size=len(tokenizer)), args, train_dataset=ROWS,
                    processing_class=tokenizer, peft_config=huge)
    with pytest.raises(ValueError, match=r"r=1000000000"):
        train_dual(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, ROWS,
                   DualConfig(output_dir=str(tmp_path / "d"), report_to="none", use_cpu=True), peft_config=huge)
    with pytest.raises(ValueError, match=r"rank r"):
        SCITTrainer(tiny_model("llama", vocab_size=len(tokenizer)), args, train_dataset=ROWS,
                    processing_class=tokenizer, peft_config=LoraConfig(r=4, rank_pattern={"q_proj": 10**9}))


def test_cli_refuses_a_huge_rank_in_one_line(tmp_path, tokenizer, capsys):
    model_dir, data = write_model_and_data(tmp_path, tokenizer)
    assert cli.main(["rahf", "scit", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--use_peft",
                     "--peft_r", "1000000000", "--output_dir", str(tmp_path / "o"), "--report_to", "none",
                     "--use_cpu"]) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("repalign: error:")]
    assert len(errors) == 1 and "LoRA rank r=1000000000" in errors[0] and "Traceback" not in err


def test_dual_refuses_push_to_hub_instead_of_ignoring_it():
    with pytest.raises(ValueError, match="push_to_hub: train_dual writes two models"):
        DualConfig(output_dir="x", push_to_hub=True, hub_model_id="user/dual")
