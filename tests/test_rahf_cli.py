"""`repalign rahf scit | dual | align` end to end on a tiny model, with flags and with a YAML config."""

import json
from types import SimpleNamespace

import pytest
from peft import PeftModel

from hf_repalign import cli
from hf_repalign.testing import tiny_model

from rahf_helpers import write_model_and_data

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five, obviously!!"},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
    {"prompt": "Say hi.", "chosen": "Hello there.", "rejected": "Go."},
]


@pytest.fixture()
def setup(tmp_path, tokenizer):
    model_dir, data = write_model_and_data(tmp_path, tokenizer, ROWS)
    common = ["--model_name_or_path", str(model_dir), "--dataset", str(data), "--report_to", "none", "--use_cpu",
              "--per_device_train_batch_size", "2", "--max_steps", "1", "--save_strategy", "no"]
    return tmp_path, model_dir, common


def test_scit_then_align_with_flags_and_yaml(setup, tokenizer):
    tmp_path, model_dir, common = setup
    assert cli.main(["rahf", "scit", *common, "--use_peft", "--peft_r", "4", "--peft_alpha", "12",
                     "--output_dir", str(tmp_path / "scit")]) == 0
    adapter = json.loads((tmp_path / "scit" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 12)
    config = tmp_path / "align.yaml"
    config.write_text(f"alpha: 2.0\ntarget_layers: [1, 2]\ninstructed: ['{tmp_path / 'scit'}']\n"
                      f"output_dir: {tmp_path / 'rahf'}\n")
    assert cli.main(["rahf", "align", "--config", str(config), *common]) == 0
    card = (tmp_path / "rahf" / "README.md").read_text()
    assert "| alpha | 2.0 |" in card and "1, 2" in card
    assert "prefs.jsonl" not in card  # --dataset_name is the data: a local path is not recorded, a Hub id is
    PeftModel.from_pretrained(tiny_model("llama", vocab_size=len(tokenizer)), str(tmp_path / "rahf"))


def test_dual_then_align(setup):
    tmp_path, model_dir, common = setup
    assert cli.main(["rahf", "dual", *common, "--output_dir", str(tmp_path / "dual")]) == 0
    good, bad = tmp_path / "dual" / "good", tmp_path / "dual" / "bad"
    assert (good / "adapter_model.safetensors").is_file() and (bad / "adapter_model.safetensors").is_file()
    assert cli.main(["rahf", "align", *common, "--method", "dual", "--instructed", str(good), str(bad),
                     "--target_layers", "2", "--output_dir", str(tmp_path / "rahf")]) == 0
    assert (tmp_path / "rahf" / "adapter_model.safetensors").is_file()


def test_missing_dataset_is_a_clear_error(setup, capsys):
    tmp_path, model_dir, _ = setup
    assert cli.main(["rahf", "scit", "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "x"),
                     "--report_to", "none"]) == 2
    assert "repalign: error: --dataset_name is required" in capsys.readouterr().err


def test_align_takes_lora_flags_not_peft_flags(setup, capsys):
    tmp_path, model_dir, common = setup
    assert cli.main(["rahf", "align", *common, "--peft_r", "4", "--output_dir", str(tmp_path / "x")]) == 2
    assert "--peft_r" in capsys.readouterr().err
    argv = ["rahf", "align", "--lora_r", "4", "--lora_alpha", "12", "--output_dir", "x"]
    namespace = cli.build_parser(cli._select(argv)).parse_args(argv)
    assert (namespace.lora_r, namespace.lora_alpha) == (4, 12)


def test_align_on_precomputed_targets_loads_no_instructed_model(setup, tokenizer, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model

    from hf_repalign.rahf import trainer as rahf_trainer

    tmp_path, model_dir, common = setup
    adapter = tmp_path / "scit"
    get_peft_model(tiny_model("llama", vocab_size=len(tokenizer)),
                   LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(str(adapter))
    args = rahf_trainer.RAHFConfig(output_dir=str(tmp_path / "pre"), report_to="none", use_cpu=True)
    live = rahf_trainer.RAHFTrainer(tiny_model("llama", vocab_size=len(tokenizer)), args, train_dataset=ROWS,
                                    processing_class=tokenizer, instructed=str(adapter))
    targets = live.precompute_targets(tmp_path / "targets")

    def forbidden(*args, **kwargs):
        raise AssertionError("an instructed model was loaded")

    monkeypatch.setattr(rahf_trainer, "_load_adapter", forbidden)
    monkeypatch.setattr(rahf_trainer, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=forbidden))
    assert cli.main(["rahf", "align", *common, "--precomputed_targets", str(targets), "--instructed", str(adapter),
                     "--output_dir", str(tmp_path / "rahf")]) == 2
    assert "exclude each other" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not both"):
        rahf_trainer.RAHFTrainer(tiny_model("llama", vocab_size=len(tokenizer)),
                                 rahf_trainer.RAHFConfig(output_dir="x", report_to="none", use_cpu=True,
                                                         precomputed_targets=str(targets)),
                                 train_dataset=ROWS, processing_class=tokenizer, instructed=str(adapter))
    assert cli.main(["rahf", "align", *common, "--precomputed_targets", str(targets),
                     "--output_dir", str(tmp_path / "rahf")]) == 0
    assert (tmp_path / "rahf" / "adapter_model.safetensors").is_file()


def test_authors_presets_end_to_end(setup, monkeypatch):
    """SCIT adapter -> align --preset authors (LoRA on q/v, stacked on the SCIT adapter), Dual likewise, and a full
    SCIT model that carries the LoRA itself (the base is then never loaded)."""
    from hf_repalign.rahf import trainer as rahf_trainer

    tmp_path, model_dir, common = setup
    assert cli.main(["rahf", "scit", *common, "--use_peft", "--output_dir", str(tmp_path / "scit")]) == 0
    stacks = []
    original = rahf_trainer.RAHFTrainer._resolve_sources

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        stacks.append(result[2])
        return result

    monkeypatch.setattr(rahf_trainer.RAHFTrainer, "_resolve_sources", staticmethod(spy))
    # The byte-level test tokenizer makes the authors' instructions ~400 tokens, past the preset's 256.
    long_prompts = ["--max_prompt_length", "1000"]
    assert cli.main(["rahf", "align", *common, "--preset", "authors", *long_prompts, "--instructed",
                     str(tmp_path / "scit"), "--output_dir", str(tmp_path / "rahf"), "--save_as", "stacked"]) == 0
    config = json.loads((tmp_path / "rahf" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and stacks[-1] == ["rahf_scit"]

    assert cli.main(["rahf", "dual", *common, "--output_dir", str(tmp_path / "dual")]) == 0
    assert cli.main(["rahf", "align", *common, "--method", "dual", "--preset", "authors", *long_prompts,
                     "--instructed", str(tmp_path / "dual" / "good"), str(tmp_path / "dual" / "bad"),
                     "--output_dir", str(tmp_path / "rahf_dual")]) == 0
    assert stacks[-1] == ["rahf_good"]

    assert cli.main(["rahf", "scit", *common, "--output_dir", str(tmp_path / "scit_full")]) == 0
    from hf_repalign.rahf import cli as rahf_cli

    monkeypatch.setattr(rahf_cli, "_load", lambda args: (_ for _ in ()).throw(AssertionError("base loaded")))
    assert cli.main(["rahf", "align", *common, "--preset", "authors", *long_prompts, "--instructed",
                     str(tmp_path / "scit_full"), "--output_dir", str(tmp_path / "rahf_full")]) == 0
    assert stacks[-1] == []


def test_scit_refuses_a_foreign_readme_unless_overwrite(setup, capsys):
    tmp_path, model_dir, common = setup
    out = tmp_path / "scit"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    (out / "notes.txt").write_text("mine")
    assert cli.main(["rahf", "scit", *common, "--use_peft", "--output_dir", str(out)]) == 1
    assert "README.md" in capsys.readouterr().err and (out / "README.md").read_text() == "# my notes\n"
    assert cli.main(["rahf", "scit", *common, "--use_peft", "--output_dir", str(out), "--overwrite"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
    assert not (out / "training_args.bin").exists() and (out / "training_args.json").is_file()


def test_dual_refuses_a_foreign_readme_unless_overwrite(setup, capsys):
    tmp_path, model_dir, common = setup
    out = tmp_path / "dual"
    (out / "good").mkdir(parents=True)
    (out / "good" / "README.md").write_text("# my notes\n")
    (out / "good" / "notes.txt").write_text("mine")
    assert cli.main(["rahf", "dual", *common, "--use_peft", "--output_dir", str(out)]) == 1
    assert "README.md" in capsys.readouterr().err and (out / "good" / "README.md").read_text() == "# my notes\n"
    assert cli.main(["rahf", "dual", *common, "--use_peft", "--output_dir", str(out), "--overwrite"]) == 0
    for side in ("good", "bad"):
        assert (out / side / "adapter_model.safetensors").is_file()
    assert (out / "good" / "notes.txt").read_text() == "mine"
