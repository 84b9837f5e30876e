"""The examples run end to end on the embedded model (few tokens)."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.embedded
def test_linear_alignment_personal_preferences_example(embedded, capsys):
    answers = _load("linear_alignment_personal_preferences").main(["--max-new-tokens", "12"])
    assert len(answers) == 3 and all(isinstance(a, str) and a.strip() for a in answers)
    assert answers[2] == answers[0]  # the pipeline reproduces the first row of the batched call
    assert "for a vegetarian" in capsys.readouterr().out


@pytest.mark.embedded
def test_legend_reward_model_example(embedded, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_REPALIGN_DATA", raising=False)  # no data: the shipped sample (the tests run offline)
    argv = ["--goals", "2", "--pairs", "4", "--steps", "1", "--max_new_tokens", "4", "--max_chars", "250"]
    losses = _load("legend_reward_model").main(argv + ["--out", str(tmp_path)])
    assert len(losses) == 1 and losses[0] > 0
    out = capsys.readouterr().out
    assert "columns ['chosen', 'rejected', 'margin_raw', 'margin']" in out and f"wrote {tmp_path}" in out
    assert (tmp_path / "annotated.jsonl").is_file() and (tmp_path / "margin-vector" / "config.json").is_file()
    assert (tmp_path / "reward-model" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "reward-model" / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", ["legend_reward_model", "rahf_hh_pipeline"])
def test_examples_name_a_missing_data_folder_in_one_line(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_REPALIGN_DATA", str(tmp_path / "nowhere"))
    module = _load(name)  # importing an example reads no data
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"data folder {tmp_path / 'nowhere'} (from `HF_REPALIGN_DATA`) does not exist" in error
    with pytest.raises(SystemExit):
        module.main(["--out", str(tmp_path / "out"), "--data", str(tmp_path)])  # a folder without the files
    assert "not found in the data folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was started
