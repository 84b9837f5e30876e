"""`repalign rahf scit | dual | align --resume_from_checkpoint` resumes (only the remaining steps run) and ends
bit-identical to an uninterrupted run; Dual runs on a CPU with its defaults; bad optimizer numbers are refused."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from hf_repalign import cli
from hf_repalign.rahf import trainer_mixin

from rahf_helpers import write_model_and_data


@pytest.fixture()
def setup(tmp_path, tokenizer, monkeypatch):
    model_dir, data = write_model_and_data(tmp_path, tokenizer)
    common = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--report_to", "none", "--use_cpu",
              "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_steps", "2", "--seed", "3"]
    steps = []
    original = trainer_mixin.FiniteLossMixin.training_step

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_mixin.FiniteLossMixin, "training_step", counted)
    return tmp_path, common, steps


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_identical(a, b):
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


def _interrupt_after_step_2(run_dir, *finals):
    """What a kill after the save of step 2 leaves: checkpoint-2, no later checkpoint, no final artifact."""
    shutil.rmtree(run_dir / "checkpoint-4")
    for final in finals:
        for path in final.iterdir():
            if path.is_file():
                path.unlink()


def test_scit_and_align_resume_bit_identically(setup):
    tmp_path, common, steps = setup
    scit = ["rahf", "scit", *common, "--use_peft", "--peft_r", "4"]
    assert cli.main([*scit, "--output_dir", str(tmp_path / "a")]) == 0
    assert cli.main([*scit, "--output_dir", str(tmp_path / "b")]) == 0
    _interrupt_after_step_2(tmp_path / "b", tmp_path / "b")
    steps.clear()
    assert cli.main([*scit, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "true"]) == 0
    assert steps == [2, 3]  # only the remaining steps ran
    _assert_identical(_weights(tmp_path / "a"), _weights(tmp_path / "b"))

    align = ["rahf", "align", *common, "--instructed", str(tmp_path / "a"), "--target_layers", "1", "3",
             "--lora_dropout", "0.1"]  # dropout: the RNG state must be restored too
    assert cli.main([*align, "--output_dir", str(tmp_path / "ra")]) == 0
    assert cli.main([*align, "--output_dir", str(tmp_path / "rb")]) == 0
    _interrupt_after_step_2(tmp_path / "rb", tmp_path / "rb")
    steps.clear()
    assert cli.main([*align, "--output_dir", str(tmp_path / "rb"), "--resume_from_checkpoint",
                     str(tmp_path / "rb" / "checkpoint-2")]) == 0
    assert steps == [2, 3]
    _assert_identical(_weights(tmp_path / "ra"), _weights(tmp_path / "rb"))


def test_dual_resumes_each_side_bit_identically(setup):
    tmp_path, common, steps = setup
    dual = ["rahf", "dual", *common]
    assert cli.main([*dual, "--output_dir", str(tmp_path / "a")]) == 0
    assert cli.main([*dual, "--output_dir", str(tmp_path / "b")]) == 0
    # killed in the bad model's run, after its step-2 checkpoint: the good model is complete
    _interrupt_after_step_2(tmp_path / "b" / "bad_checkpoints", tmp_path / "b" / "bad")
    steps.clear()
    assert cli.main([*dual, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "true"]) == 0
    assert steps == [2, 3]  # the good model's run was complete; the bad one's last two steps
    for side in ("good", "bad"):
        _assert_identical(_weights(tmp_path / "a" / side), _weights(tmp_path / "b" / side))


def test_resume_errors_are_one_line(setup, capsys):
    tmp_path, common, _ = setup
    assert cli.main(["rahf", "scit", *common, "--output_dir", str(tmp_path / "x"), "--resume_from_checkpoint",
                     "true"]) == 2
    assert "holds no checkpoint-N folder" in capsys.readouterr().err
    assert cli.main(["rahf", "dual", *common, "--output_dir", str(tmp_path / "x"), "--resume_from_checkpoint",
                     str(tmp_path)]) != 0
    assert "give true to resume both" in capsys.readouterr().err


def test_dual_runs_on_a_cpu_with_its_defaults(setup, monkeypatch):
    tmp_path, common, _ = setup
    from hf_repalign.rahf import dual_config

    monkeypatch.setattr(dual_config, "bf16_accelerator", lambda: False)  # a CPU-only machine, whatever this one is
    plain = [c for c in common if c != "--use_cpu"]
    assert cli.main(["rahf", "dual", *plain, "--max_steps", "1", "--output_dir", str(tmp_path / "dual")]) == 0
    assert (tmp_path / "dual" / "good" / "adapter_model.safetensors").is_file()


def test_dual_trains_in_float32_on_a_cpu_unless_asked(tmp_path):
    from hf_repalign.rahf import DualConfig

    assert DualConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is False  # TRL's bf16 is emulated on CPUs
    assert DualConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True).bf16 is True


@pytest.mark.parametrize("flag,value", [("--max_grad_norm", "nan"), ("--weight_decay", "inf"),
                                        ("--adam_beta1", "nan"), ("--adam_beta2", "1.5"), ("--adam_epsilon", "nan")])
@pytest.mark.parametrize("command", ["scit", "dual", "align"])
def test_non_finite_optimizer_numbers_are_refused(setup, capsys, command, flag, value):
    tmp_path, common, _ = setup
    assert cli.main(["rahf", command, *common, flag, value, "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert flag.lstrip("-") in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
