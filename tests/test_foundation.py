"""Embedded model, hub helpers and CLI plumbing."""

import subprocess
import sys
from pathlib import Path

import pytest

from hf_repalign.cli import main as cli_main


@pytest.mark.embedded
def test_embedded_model_loads_and_generates(embedded):
    model, tokenizer = embedded
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.embedded
def test_embedded_cache_follows_hf_home_and_conversion_is_atomic(tmp_path, monkeypatch):
    import transformers

    from hf_repalign import models

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    target = models.embedded_model_cache_dir()
    assert target.parent == tmp_path / "hf_repalign"

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        models.embedded_model_path()
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_cli_yaml_config_and_unknown_keys(tmp_path, capsys, monkeypatch):
    from hf_repalign.linear_alignment import cli as la_cli

    seen = {}
    monkeypatch.setattr(la_cli, "run", lambda args: seen.setdefault("args", args) and 0)
    config = tmp_path / "c.yaml"
    config.write_text("alpha: 3.5\nmax_new_tokens: 7\n")
    assert cli_main(["generate", "q1", "--config", str(config), "--max_new_tokens", "9"]) == 0
    args = seen["args"]
    assert args.alpha == 3.5 and args.max_new_tokens == 9 and args.question == ["q1"]
    config.write_text("alpah: 1\n")
    assert cli_main(["generate", "q", "--config", str(config)]) == 2
    assert "repalign: error: --config: " in capsys.readouterr().err


def test_cli_requires_a_question(capsys):
    assert cli_main(["generate"]) == 2
    assert capsys.readouterr().err.strip() == "repalign: error: give at least one question (bare words or --question)."


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "hf_repalign.cli", "generate", "--help"], capture_output=True,
                         text=True, check=True)
    assert "--principle" in out.stdout and "--alpha" in out.stdout


def test_load_model_refuses_an_unknown_dtype_name():
    from hf_repalign.models import load_model_and_tokenizer

    with pytest.raises(ValueError, match="`dtype` must be a torch dtype name .* got 'bf16'"):
        load_model_and_tokenizer("/nonexistent", dtype="bf16")


def test_a_missing_local_model_path_is_reported_as_missing_and_offline_fails_at_once(monkeypatch):
    import time

    from hf_repalign.models import load_model_and_tokenizer

    with pytest.raises(FileNotFoundError, match="'./no/such/model' does not exist"):
        load_model_and_tokenizer("./no/such/model")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        load_model_and_tokenizer("someone-unknown/some-model")
    assert time.perf_counter() - start < 5


def test_saving_hub_cards_and_models_import_without_a_circle():
    """Imports anywhere in a module (lazy ones inside functions too) among the shared modules form no cycle, and the
    module that writes into users' folders imports none of the others."""
    import ast

    package = Path(__file__).resolve().parents[1] / "hf_repalign"
    shared = {"artifacts", "outputs", "hub", "cards", "models", "text_files", "data_files", "formats"}
    edges = {}
    for name in shared:
        tree = ast.parse((package / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
        edges[name] = found & shared
    assert edges["artifacts"] == set() and edges["outputs"] <= {"artifacts"}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in edges[start])

    assert [name for name in sorted(shared) if reaches(name, name)] == []
