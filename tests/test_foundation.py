"""Embedded model, hub helpers and CLI plumbing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_repalign import hub
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
    from hf_repalign import models

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    target = models.embedded_model_cache_dir()
    assert target.parent == tmp_path / "hf_repalign"

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        models.embedded_model_path()
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_save_folder_is_atomic_and_round_trips(tmp_path):
    tensors = {"direction": torch.randn(4)}
    folder = hub.save_folder(tmp_path / "vec", tensors, {"layer": -1}, card="# card")
    loaded, config = hub.load_folder(folder)
    assert torch.equal(loaded["direction"], tensors["direction"]) and config == {"layer": -1}
    assert (folder / "README.md").read_text() == "# card"

    class Boom(dict):
        def items(self):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        hub.save_folder(tmp_path / "vec", Boom(), {"layer": 3})
    loaded, config = hub.load_folder(folder)  # the old folder survives a failed overwrite
    assert config == {"layer": -1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vec"]
    with pytest.raises(FileNotFoundError, match="config.json"):
        hub.load_folder(tmp_path)


def test_atomic_write_text(tmp_path):
    hub.atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    assert (tmp_path / "a" / "b.txt").read_text() == "hello"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.txt"]


def test_cli_yaml_config_and_unknown_keys(tmp_path, capsys, monkeypatch):
    from hf_repalign.linear_alignment import cli as la_cli

    seen = {}
    monkeypatch.setattr(la_cli, "run", lambda args: seen.setdefault("args", args) and 0)
    config = tmp_path / "c.yaml"
    config.write_text("alpha: 3.5\nmax_new_tokens: 7\n")
    # register() captured the original run; patch through the parser default instead
    from hf_repalign import cli

    parser = cli.build_parser()
    ns = parser.parse_args(["generate", "q1", "--config", str(config), "--max_new_tokens", "9"])
    cli._apply_yaml(ns._parser, ns._args_class, ns.config)
    ns = parser.parse_args(["generate", "q1", "--config", str(config), "--max_new_tokens", "9"])
    assert ns.alpha == 3.5 and ns.max_new_tokens == 9 and ns._positional == ["q1"]
    config.write_text("alpah: 1\n")
    with pytest.raises(SystemExit, match="unknown argument"):
        cli_main(["generate", "q", "--config", str(config)])


def test_cli_requires_a_question():
    with pytest.raises(SystemExit, match="at least one question"):
        cli_main(["generate"])


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "hf_repalign.cli", "generate", "--help"], capture_output=True,
                         text=True, check=True)
    assert "--principle" in out.stdout and "--alpha" in out.stdout


def test_load_model_refuses_an_unknown_dtype_name():
    from hf_repalign.models import load_model_and_tokenizer

    with pytest.raises(ValueError, match="`dtype` must be a torch dtype name .* got 'bf16'"):
        load_model_and_tokenizer("/nonexistent", dtype="bf16")
