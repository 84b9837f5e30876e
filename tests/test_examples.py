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
def test_legend_reward_model_example(embedded, tmp_path, capsys):
    argv = ["--goals", "2", "--pairs", "4", "--steps", "1", "--max_new_tokens", "4", "--max_chars", "250"]
    losses = _load("legend_reward_model").main(argv + ["--out", str(tmp_path)])
    assert len(losses) == 1 and losses[0] > 0
    assert "columns ['chosen', 'rejected', 'margin_raw', 'margin']" in capsys.readouterr().out
    assert (tmp_path / "annotated.jsonl").is_file() and (tmp_path / "margin-vector" / "config.json").is_file()
