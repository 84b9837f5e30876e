"""docs/cli.md lists every option of every command, generated from the parsers: it must match them.

Rewrite the table after changing an option: ``python tests/test_cli_docs.py``.
"""

import dataclasses
import re
import sys
from pathlib import Path

from hf_repalign import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
START, END = "<!-- options table: start -->\n", "<!-- options table: end -->"


def _with_table(text: str) -> str:
    before, rest = text.split(START)
    _, after = rest.split(END)
    return before + START + cli.options_table() + END + after


def test_the_options_table_in_docs_is_current():
    text = DOC.read_text(encoding="utf-8")
    assert text == _with_table(text), "docs/cli.md's options table is stale: run `python tests/test_cli_docs.py`"


def test_the_table_lists_every_option_but_the_inherited_trainer_ones():
    from transformers import TrainingArguments
    from trl import SFTConfig

    inherited = {f.name for f in dataclasses.fields(SFTConfig)} | {f.name for f in dataclasses.fields(
        TrainingArguments)}
    table = cli.options_table()
    listed = set(re.findall(r"^\| `(--[a-z_]+)`", table, re.M))
    for command in cli.COMMANDS:
        leaf, _ = cli.leaf_parser(command)
        for action in leaf._actions:
            if action.option_strings and action.dest != "help" and not action.option_strings[0].startswith("--no_"):
                option = action.option_strings[0]
                assert option in listed or action.dest in inherited, (command.path, option)
    assert {"--output_dir", "--push_to_hub", "--hub_model_id", "--model_name_or_path", "--dataset_name"} <= listed
    assert "--learning_rate" not in listed  # the trainer's own options change with transformers' versions


if __name__ == "__main__":
    DOC.write_text(_with_table(DOC.read_text(encoding="utf-8")), encoding="utf-8")
    sys.stdout.write(f"wrote {DOC}\n")
