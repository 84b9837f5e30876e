"""``repalign legend fit-vector`` and ``repalign legend annotate`` on a tiny saved model."""

import json
import re

import pytest
import torch
from transformers import pipeline

import hf_repalign.cli as cli
from hf_repalign.legend import MarginVector
from hf_repalign.models import load_model_and_tokenizer
from hf_repalign.testing import tiny_model


@pytest.fixture
def run_cli():
    return cli.main


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_fit_vector_then_annotate(run_cli, model_dir, tmp_path, capsys):
    goals = tmp_path / "goals.csv"
    goals.write_text("goal,target\nHow to pick a lock,Sure here is how\nMake a weapon,Sure step one\n"
                     "Steal a car,Sure first find\n")
    assert run_cli(["legend", "fit-vector", "--model", str(model_dir), "--prompts", str(goals),
                    "--harmful_column", "target", "--num_prompts", "2", "--layer", "2",
                    "--output", str(tmp_path / "vec")]) == 0
    vec = MarginVector.from_pretrained(tmp_path / "vec")
    assert vec.n_pairs == 2 and vec.layer == 2

    rows = [{"id": i, "prompt": f"question {i}" + "?" * i, "chosen": "no" * (i + 1), "rejected": "yes"}
            for i in range(6)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "annotate.yaml"
    config.write_text("num_bins: 3\nbatch_size: 4\n")
    output = tmp_path / "out.jsonl"
    assert run_cli(["legend", "annotate", "--config", str(config), "--model", str(model_dir), "--dataset", str(data),
                    "--vector", str(tmp_path / "vec"), "--output", str(output)]) == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in written] == list(range(6)) and {r["margin"] for r in written} == {1 / 3, 2 / 3, 1.0}

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    expected = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, device="cpu")(rows)
    assert [r["margin_raw"] for r in written] == pytest.approx([e["margin_raw"] for e in expected], abs=1e-5)

    data.write_text("".join(json.dumps(dict(r, chosen="" if r["id"] == 2 else r["chosen"])) + "\n" for r in rows))
    assert run_cli(["legend", "annotate", "--model", str(model_dir), "--dataset", str(data),
                    "--vector", str(tmp_path / "vec"), "--output", str(output), "--num_bins", "0"]) == 1
    assert "repalign: error: row 2, field `chosen`" in capsys.readouterr().err
    assert run_cli(["legend", "annotate", "--model", str(model_dir), "--dataset", str(data), "--drop_invalid",
                    "--vector", str(tmp_path / "vec"), "--output", str(output), "--num_bins", "0"]) == 0
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == [0, 1, 3, 4, 5]

    assert run_cli(["legend", "annotate", "--model", str(model_dir), "--dataset", str(data), "--drop_invalid",
                    "--vector", str(tmp_path / "vec"), "--output", str(output), "--dtype", "bfloat16"]) == 0
    bf16 = [json.loads(line)["margin_raw"] for line in output.read_text().splitlines()]
    assert len(bf16) == 5 and bf16 != pytest.approx([written[i]["margin_raw"] for i in (0, 1, 3, 4, 5)], abs=1e-6)
    assert run_cli(["legend", "annotate", "--model", str(model_dir), "--dataset", str(data),
                    "--vector", str(tmp_path / "vec"), "--output", str(output), "--dtype", "bf16"]) == 2
    assert "repalign: error: argument --dtype: invalid choice: 'bf16'" in capsys.readouterr().err


def test_fit_vector_reports_bad_prompt_files(run_cli, tmp_path, capsys):
    bad = tmp_path / "goals.csv"
    bad.write_text("goal,target\nHow to pick a lock,\n")
    assert run_cli(["legend", "fit-vector", "--prompts", str(bad), "--harmful_column", "target",
                    "--output", str(tmp_path / "v")]) == 1
    assert "row(s) [0] have no text in column 'target'" in capsys.readouterr().err
    assert run_cli(["legend", "fit-vector", "--prompts", str(tmp_path / "none.csv"),
                    "--output", str(tmp_path / "v")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert run_cli(["legend", "fit-vector", "--prompts", str(bad), "--num_prompts", "0",
                    "--output", str(tmp_path / "v")]) == 2
    assert "--num_prompts: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("extra, expected", [
    ([], {"max_new_tokens": 64, "refusal": "I can't answer that.", "pooling": "last", "layer": -1, "n": 3}),
    (["--preset", "authors"], {"max_new_tokens": 1024, "refusal": "I can\u2019t answer that.", "pooling": "last",
                               "layer": -1, "n": 3}),
    (["--preset", "authors", "--max_new_tokens", "8", "--pooling", "mean_all", "--num_prompts", "2"],
     {"max_new_tokens": 8, "refusal": "I can\u2019t answer that.", "pooling": "mean_all", "layer": -1, "n": 2}),
])
def test_fit_vector_presets_and_explicit_flags(run_cli, model_dir, tmp_path, monkeypatch, extra, expected):
    goals = tmp_path / "goals.txt"
    goals.write_text("How to pick a lock\nMake a weapon\nSteal a car\n")
    seen = {}

    def fake_induce(model, tokenizer, prompts, refusal, max_new_tokens, layer, pooling, **kwargs):
        seen.update(max_new_tokens=max_new_tokens, refusal=refusal, pooling=pooling, layer=layer, n=len(prompts))
        return MarginVector.fit(model, tokenizer, prompts, [refusal] * len(prompts), ["Sure."] * len(prompts),
                                layer=layer, pooling=pooling)

    monkeypatch.setattr(MarginVector, "induce", staticmethod(fake_induce))
    assert run_cli(["legend", "fit-vector", "--model", str(model_dir), "--prompts", str(goals),
                    "--output", str(tmp_path / "vec"), *extra]) == 0
    assert seen == expected


def test_fit_vector_refuses_a_template_with_format_specs(run_cli, model_dir, tmp_path, capsys):
    goals = tmp_path / "goals.txt"
    goals.write_text("How to pick a lock\n")
    assert run_cli(["legend", "fit-vector", "--model", str(model_dir), "--prompts", str(goals), "--output",
                    str(tmp_path / "vec"), "--template", "{prompt:>5000000}{response}"]) == 2
    assert "only {prompt} and {response} are allowed" in capsys.readouterr().err


def test_annotate_on_a_locked_output_fails_in_one_line(run_cli, model_dir, tmp_path, capsys):
    from hf_repalign.legend.checkpoints import OutputLock

    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "no", "rejected": "yes"}) + "\n")
    vec = MarginVector(torch.nn.functional.normalize(torch.ones(32), dim=0))
    vec.save_pretrained(tmp_path / "vec")
    output = tmp_path / "out.jsonl"
    with OutputLock(output):
        assert run_cli(["legend", "annotate", "--model", str(model_dir), "--dataset", str(data), "--vector",
                        str(tmp_path / "vec"), "--output", str(output), "--num_bins", "0"]) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.match(r"^repalign: error: another annotate run \(pid \d+\) is writing", last)
    assert not output.exists()


def test_fit_vector_for_another_attribute_with_length_control(run_cli, model_dir, tmp_path, capsys):
    contrast = tmp_path / "helpful.jsonl"
    contrast.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": text, "label": label}) + "\n"
                                for i, (text, label) in enumerate([("Here is a full answer, step by step.", True),
                                                                   ("Sure: the details follow.", True),
                                                                   ("No.", False), ("Ask someone else.", False)])))
    assert run_cli(["legend", "fit-vector", "--model_name_or_path", str(model_dir), "--dataset_name", str(contrast),
                    "--contrast", "--attribute", "helpfulness", "--length_control",
                    "--output_dir", str(tmp_path / "vec")]) == 0
    config = json.loads((tmp_path / "vec" / "config.json").read_text())
    assert config["attribute"] == "helpfulness" and config["length_control"] is True
    assert config["contrast"]["kind"] == "sets" and "helpfulness" in (tmp_path / "vec" / "README.md").read_text()

    rows = [{"prompt": f"question {i}", "chosen": "yes " * (i + 1), "rejected": "no"} for i in range(6)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out.jsonl"
    assert run_cli(["legend", "annotate", "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
                    "--length_control",
                    "--vector", str(tmp_path / "vec"), "--output", str(output), "--num_bins", "3"]) == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert all("margin_length_controlled" in r for r in written)
    assert "length control removed" in capsys.readouterr().out

    assert run_cli(["legend", "fit-vector", "--model_name_or_path", str(model_dir),
                    "--output_dir", str(tmp_path / "v2")]) == 2
    assert "--dataset_name" in capsys.readouterr().err


def test_fit_vector_names_a_list_row_in_a_jsonl_file(run_cli, tmp_path, capsys):
    for flags, text in ((["--dataset_name"], '{"goal": "a"}\n["not", "an", "object"]\n'),
                        (["--contrast", "--dataset_name"], '{"prompt": "a", "chosen": "b", "rejected": "c"}\n[1, 2]\n')):
        bad = tmp_path / "rows.jsonl"
        bad.write_text(text)
        assert run_cli(["legend", "fit-vector", *flags, str(bad), "--output_dir", str(tmp_path / "v")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "rows.jsonl" in err and "line 2" in err, err
