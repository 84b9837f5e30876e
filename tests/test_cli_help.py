"""``--help`` of the RAHF commands from a description of their parser (``hf_repalign/cli_help.py``): the same text
as the live parser at any width, without importing torch, and never stale."""

import argparse
import json
import subprocess
import sys

import pytest

from hf_repalign import cli, cli_help

HEAVY = [c for c in cli.COMMANDS if c.cached_help]
NAMES = ["-".join(c.path) for c in HEAVY]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def live():
    return {name: cli.leaf_parser(command) for name, command in zip(NAMES, HEAVY)}


@pytest.mark.parametrize("columns", ["40", "100", "250"])
@pytest.mark.parametrize("name", NAMES)
def test_rebuilt_help_equals_live(live, name, columns, monkeypatch):
    monkeypatch.setenv("COLUMNS", columns)
    parser, _ = live[name]
    description = json.loads(json.dumps(cli_help.describe(parser)))  # as read back from a file
    assert cli_help.rebuild(description).format_help() == parser.format_help()


def test_percent_signs_and_negative_flags_survive(live):
    text = cli_help.rebuild(cli_help.describe(live["rahf-dual"][0])).format_help()
    assert "~20% slower" in text and "--no_gradient_checkpointing" in text


def test_unsupported_parsers_are_refused():
    parser = argparse.ArgumentParser()
    parser.add_argument("--flag", action=argparse.BooleanOptionalAction)
    with pytest.raises(cli_help.Unsupported, match="BooleanOptionalAction"):
        cli_help.describe(parser)
    parser = argparse.ArgumentParser()
    parser.add_mutually_exclusive_group().add_argument("--a")
    with pytest.raises(cli_help.Unsupported, match="mutually exclusive"):
        cli_help.describe(parser)


def test_shipped_descriptions_are_current(live, home):
    shipped = json.loads(cli_help.SHIPPED.read_text())
    assert sorted(shipped) == sorted(NAMES)
    for name in NAMES:
        if shipped[name]["environment"] != cli_help.environment():  # a user's other versions: never used
            assert cli_help.lookup(name) is None
            continue
        assert shipped[name] == cli_help.entry(*live[name]), (
            f"hf_repalign/cli_help.json is stale for {name}: run `python -m hf_repalign.cli_help`")
        assert cli_help.lookup(name) == shipped[name]["parser"]


def _stale_copy(tmp_path, name):
    data = json.loads(cli_help.SHIPPED.read_text())
    entry = data[name]
    entry["environment"] = cli_help.environment()
    entry["sources"][sorted(entry["sources"])[0]] = "0" * 64  # as after an edit of that file
    path = tmp_path / "shipped.json"
    path.write_text(json.dumps(data))
    return path


def test_stale_or_foreign_descriptions_fall_back_to_the_live_parser(live, home, tmp_path, capsys):
    name = "rahf-align"
    shipped = _stale_copy(tmp_path, name)
    assert cli_help.lookup(name, shipped) is None
    calls = []

    def build():
        calls.append(1)
        return live[name]

    cli_help.print_help(name, build, shipped)
    assert calls and capsys.readouterr().out == live[name][0].format_help()
    cached = cli_help.user_cache(name)
    assert cached.is_file() and cli_help.lookup(name, shipped) is not None
    cli_help.print_help(name, build, shipped)  # the cached description, not the live parser
    assert len(calls) == 1 and capsys.readouterr().out == live[name][0].format_help()

    data = json.loads(cached.read_text())
    data["sources"] = {f: "0" * 64 for f in data["sources"]}
    cached.write_text(json.dumps(data))
    assert cli_help.lookup(name, shipped) is None
    for damaged in ("[1, 2]", "{not json", json.dumps({**data, "sources": [1]}), json.dumps({"parser": {}})):
        cached.write_text(damaged)
        assert cli_help.lookup(name, shipped) is None
    data = cli_help.entry(*live[name])
    data["parser"]["actions"][1]["kind"] = "no-such-action"  # damaged, though it claims to hold
    cached.write_text(json.dumps(data))
    cli_help.print_help(name, build, shipped)
    assert len(calls) == 2 and capsys.readouterr().out == live[name][0].format_help()


def test_console_help_imports_no_torch(live, tmp_path, monkeypatch):
    """The console script in a fresh process, an empty HF_HOME: torch is imported only when the shipped description
    does not hold (then once: the next call reads the cached one)."""
    script = ("import sys; sys.argv[0] = 'repalign'; from hf_repalign.cli import main; "
              "main(['rahf', 'scit', '--help']); "
              "sys.stderr.write(repr(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules)))")
    env = {"HF_HOME": str(tmp_path / "home"), "COLUMNS": "100", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
            for _ in range(2)]
    shipped_holds = cli_help.lookup("rahf-scit") is not None
    assert runs[0].stderr.endswith("[]" if shipped_holds else "['torch', 'transformers', 'trl']"), runs[0].stderr
    assert runs[1].stderr.endswith("[]"), runs[1].stderr
    monkeypatch.setenv("COLUMNS", "100")
    for run in runs:
        assert run.stdout == live["rahf-scit"][0].format_help()


def test_help_flag_before_the_command_word_is_the_groups_help(capsys):
    assert cli.main(["rahf", "--help", "scit"]) == 0
    assert "Step 2: train the RAHF LoRA adapter." in capsys.readouterr().out  # rahf's list of steps
    assert cli.main(["rahf", "scit", "--max_steps", "3", "--help"]) == 0
    assert "--label_smoothing" in capsys.readouterr().out
