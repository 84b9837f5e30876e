"""The ``repalign`` console script: ``repalign generate | legend ... | rahf ...``, in the manner of ``trl``.

Arguments are dataclasses (TRL style). ``--config file.yaml`` supplies any of them, required ones included, and
flags on the command line override it (TRL's ``TrlParser``). Every user error ends in one line
``repalign: error: ...`` with exit code 2 (bad arguments) or 1 (failed at run time); ``--debug`` (or
``REPALIGN_DEBUG=1``) also prints the traceback.

One vocabulary, TRL's: ``--model_name_or_path`` (alias ``--model``), ``--dataset_name`` (a Hub id or a local path)
with ``--dataset_config`` / ``--dataset_split``, ``--output_dir``, ``--push_to_hub`` + ``--hub_model_id``. Older
names still work as aliases and print a deprecation note. An unknown flag is named with the command's usage and the
closest valid option.

Only the chosen command's argument module is imported: ``repalign generate|legend ... --help`` answers in a fraction
of a second; the RAHF commands' arguments are ``TrainingArguments`` (which import torch), so their ``--help`` takes
as long as ``trl sft --help`` (docs/cli.md).

Example:
    $ repalign generate "How do I pick a lock?" --principle "Be harmless." --alpha 2
    $ repalign legend fit-vector --config fit.yaml --num_prompts 50
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DType = Literal["auto", "float32", "bfloat16", "float16"]  # a --dtype flag: argparse checks the choice
PROG = "repalign"
KEPT_ALIASES = {"--model"}  # other aliases of an option are its older names: using one prints a deprecation note


class UsageError(ValueError):
    """A bad argument value found after parsing (exit code 2, like argparse's own errors)."""


@dataclass(frozen=True)
class Command:
    """One leaf command; ``args`` and ``run`` are ``module:name`` strings imported only when the command is used."""

    path: tuple[str, ...]
    help: str
    args: str
    run: str
    positional: str | None = None  # a list field that may also be given as bare words


GROUPS = {
    "legend": "LEGEND safety margins for preference datasets.",
    "rahf": "RAHF: SCIT or Dual instructed models, then representation alignment with a LoRA.",
}
COMMANDS = (
    Command(("generate",), "Answer with plain, principle-prompted and Linear-Alignment decoding, side by side.",
            "hf_repalign.linear_alignment.cli:GenerateArguments", "hf_repalign.linear_alignment.cli:run",
            positional="question"),
    Command(("export-custom-generate",), "Write Linear Alignment as a custom_generate repository (no install needed).",
            "hf_repalign.linear_alignment.cli:ExportArguments", "hf_repalign.linear_alignment.cli:run_export",
            positional="output_dir"),
    Command(("legend", "fit-vector"), "Fit a LEGEND margin vector: harmful prompts (safety) or any contrast data.",
            "hf_repalign.legend.cli:FitVectorArguments", "hf_repalign.legend.cli:run_fit_vector"),
    Command(("legend", "annotate"), "Add LEGEND `margin_raw` and binned `margin` columns to a preference dataset.",
            "hf_repalign.legend.cli:AnnotateArguments", "hf_repalign.legend.cli:run_annotate"),
    Command(("rahf", "scit"), "Step 1a: contrastive instruction tuning (Eq. 1).",
            "hf_repalign.rahf.cli:SCITCommand", "hf_repalign.rahf.cli:run_scit"),
    Command(("rahf", "dual"), "Step 1b: good and bad models on chosen / rejected.",
            "hf_repalign.rahf.cli:DualCommand", "hf_repalign.rahf.cli:run_dual"),
    Command(("rahf", "align"), "Step 2: train the RAHF LoRA adapter.",
            "hf_repalign.rahf.cli:AlignCommand", "hf_repalign.rahf.cli:run_align"),
)


def _load(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def one_line(message: object) -> str:
    """An error message on one line (library messages often span several)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= 600 else text[:597] + "..."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {one_line(message)}\n")


def _leaf_parser_class():
    from trl.scripts.utils import TrlParser  # light: argparse + TRL's copy of HfArgumentParser

    class LeafParser(TrlParser):
        def format_usage(self) -> str:  # a command's full usage is as long as its --help (TrainingArguments)
            positional = "".join(f" [{a.metavar} ...]" for a in self._actions if not a.option_strings)
            return f"usage: {self.prog} [--config FILE.yaml] [OPTIONS]{positional}  ({self.prog} --help lists them)\n"

        error = _Parser.error

    return LeafParser


def _select(argv: Sequence[str]) -> Command | None:
    words = [a for a in argv if not a.startswith("-")]
    for command in COMMANDS:
        if tuple(words[: len(command.path)]) == command.path:
            return command
    return None


def build_parser(selected: Command | None = None) -> argparse.ArgumentParser:
    """The ``repalign`` parser; only ``selected`` gets its arguments (the others are listed with their help)."""
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="Print the traceback of an error.")
    leaf_class = _leaf_parser_class() if selected is not None else _Parser
    top = parser.add_subparsers(dest="command", required=True, metavar="{generate,legend,rahf}",
                                parser_class=leaf_class)
    groups = {}
    for command in COMMANDS:
        if len(command.path) == 2 and command.path[0] not in groups:
            group = top.add_parser(command.path[0], help=GROUPS[command.path[0]], description=GROUPS[command.path[0]])
            groups[command.path[0]] = group.add_subparsers(dest=f"{command.path[0]}_command", required=True,
                                                           parser_class=leaf_class)
        subparsers = groups[command.path[0]] if len(command.path) == 2 else top
        if command is not selected:
            subparsers.add_parser(command.path[-1], help=command.help, description=command.help)
            continue
        args_class = _load(command.args)
        leaf = subparsers.add_parser(command.path[-1], help=command.help, description=command.help,
                                     dataclass_types=[args_class])
        leaf.add_argument("--config", type=Path, default=None,
                          help="YAML file of arguments (required ones included); flags override it.")
        if command.positional is not None:
            leaf.add_argument("_positional", nargs="*", metavar=command.positional.upper(),
                              help=f"same as --{command.positional}")
        parser.set_defaults(_leaf=leaf, _args_class=args_class)
    return parser


def _primary(action: argparse.Action) -> str:
    return action.option_strings[0]


def option_aliases(leaf: argparse.ArgumentParser) -> dict[str, str]:
    """Every other name of an option of ``leaf`` (``--model``, ``--output``, ...) -> its current name."""
    aliases = {}
    for action in leaf._actions:
        if not action.option_strings or not action.option_strings[0].startswith("--"):
            continue
        current = {f"--{action.dest}", f"--{action.dest.replace('_', '-')}"}
        for option in action.option_strings:
            if option not in current and not option.startswith(("--no_", "--no-")):
                aliases[option] = _primary(action)
    return aliases


def renamed_options(leaf: argparse.ArgumentParser) -> dict[str, str]:
    """Older option names still accepted by ``leaf`` (aliases not in :data:`KEPT_ALIASES`) -> the current name."""
    return {old: new for old, new in option_aliases(leaf).items() if old not in KEPT_ALIASES}


def _closest(word: str, leaf: argparse.ArgumentParser) -> str | None:
    """The current name of the option closest to ``word`` (a typo), if one is close."""
    owner = {o: _primary(a) for a in leaf._actions for o in a.option_strings if o.startswith("--")}
    match = difflib.get_close_matches(word, list(owner), n=1, cutoff=0.6)
    return owner[match[0]] if match else None


def _suggest(word: str, leaf: argparse.ArgumentParser) -> str:
    closest = _closest(word, leaf)
    return f"{word} (did you mean {closest}?)" if closest else word


def _refuse_unknown_flags(leaf: argparse.ArgumentParser, argv: list[str]) -> None:
    """Name unknown flags (and the option each probably meant) before argparse reports a missing required one."""
    required = [a for a in leaf._actions if a.required]
    for action in required:
        action.required = False
    try:
        _, extras = leaf.parse_known_args(argv)
    finally:
        for action in required:
            action.required = True
    unknown = [e.split("=", 1)[0] for e in extras if e.startswith("--") or (e.startswith("-") and len(e) == 2)]
    if unknown:
        leaf.error(f"{leaf.prog.removeprefix(PROG + ' ')}: unrecognized argument{'s' if len(unknown) > 1 else ''} "
                   f"{', '.join(_suggest(u, leaf) for u in unknown)}")


def _note_renamed(leaf: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Warn once per older option name used; ``--push_to_hub REPO_ID`` (the old form) becomes
    ``--push_to_hub --hub_model_id REPO_ID``."""
    renamed = renamed_options(leaf)
    out = []
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[0]
        if name in renamed:
            _warn(f"{name} is deprecated; use {renamed[name]}.")
        out.append(arg)
        value = argv[i + 1] if i + 1 < len(argv) else None
        if (arg == "--push_to_hub" and value is not None and not value.startswith("-") and "--hub_model_id"
                in leaf._option_string_actions and value.lower() not in ("true", "false", "yes", "no", "1", "0")):
            _warn(f"--push_to_hub {value} is deprecated; use --push_to_hub --hub_model_id {value}.")
            out.append("--hub_model_id")
    return out


def _warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def _apply_config(leaf, argv: list[str]) -> list[str]:
    """Make a ``--config`` YAML supply defaults (TRL's ``set_defaults_with_config``); returns argv without it."""
    import yaml

    from .text_files import TextFileError, read_text

    if "--config" not in argv:
        return argv
    at = argv.index("--config")
    if at + 1 >= len(argv):
        raise UsageError("argument --config: expected a YAML file path.")
    path = Path(argv[at + 1])
    argv = argv[:at] + argv[at + 2:]
    if not path.is_file():
        raise UsageError(f"--config: {path} does not exist.")
    try:
        values = yaml.safe_load(read_text(path, "--config"))
    except TextFileError as err:
        raise UsageError(str(err)) from None
    except yaml.YAMLError as err:
        raise UsageError(f"--config: {path} is not valid YAML: {one_line(err)}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config: {path} must hold a mapping of argument names to values.")
    for old, new in option_aliases(leaf).items():
        if old[2:] in values:
            if old not in KEPT_ALIASES:
                _warn(f"--config: {path}: key {old[2:]!r} is deprecated; use {new[2:]!r}.")
            values[new[2:]] = values.pop(old[2:])
    unknown = leaf.set_defaults_with_config(**values)[::2]
    if unknown:
        names = ", ".join(repr(u[2:]) + ("" if _closest(u, leaf) is None else f" (did you mean "
                                          f"{_closest(u, leaf)[2:]!r}?)") for u in unknown)
        raise UsageError(f"--config: {path} has unknown argument(s) {names}; `{leaf.prog} --help` lists them.")
    for action in leaf._actions:  # argparse checks choices of command-line values only
        if action.dest in values and action.choices is not None:
            chosen = values[action.dest]
            for value in chosen if isinstance(chosen, list) else [chosen]:
                if value is not None and value not in action.choices:
                    raise UsageError(f"--config: {action.dest}: invalid choice {value!r} (choose from "
                                     f"{', '.join(map(repr, action.choices))}).")
    return argv


def check_finite(args: object) -> None:
    """Refuse ``nan``/``inf`` in any float argument (argparse's ``float`` accepts them)."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"argument --{f.name}: must be a finite number, got {value}.")


def leaf_parser(command: Command) -> tuple[argparse.ArgumentParser, type]:
    """``command``'s own parser (the one that prints its ``--help``) and its arguments dataclass."""
    parser = build_parser(command)
    return parser._defaults["_leaf"], parser._defaults["_args_class"]


def _owner(args_class: type, name: str) -> type:
    return next(c for c in args_class.__mro__ if name in c.__dict__.get("__annotations__", {}))


def _cell(action: argparse.Action) -> str:
    if action.required:
        return "required"
    default = action.default
    text = "" if default is None or default == [] else repr(default.value if hasattr(default, "value") else default)
    return f"`{text[:40]}`" if text else "-"


SHARED_TRAINER_OPTIONS = ("output_dir", "push_to_hub", "hub_model_id")  # TrainingArguments' words we use everywhere


def options_table() -> str:
    """Every option of every command as Markdown, from the parsers (docs/cli.md). The options the RAHF commands
    inherit from ``TrainingArguments`` / TRL's configs are left out (they change with those libraries' versions),
    except the shared vocabulary (:data:`SHARED_TRAINER_OPTIONS`)."""
    rows: dict[str, dict] = {}
    names = [" ".join(c.path) for c in COMMANDS]
    for command, name in zip(COMMANDS, names):
        leaf, args_class = leaf_parser(command)
        fields = {f.name for f in dataclasses.fields(args_class)}
        for action in leaf._actions:
            if not action.option_strings or action.dest == "help" or action.option_strings[0].startswith("--no_"):
                continue
            if action.dest in fields and action.dest not in SHARED_TRAINER_OPTIONS and _owner(
                    args_class, action.dest).__module__.startswith(("transformers.", "trl.")):
                continue
            row = rows.setdefault(action.option_strings[0], {
                "aliases": [], "help": one_line(action.help or "").replace("|", "\\|"), "cells": {}})
            row["aliases"] += [o for o in action.option_strings[1:] if o != "--" + action.dest.replace("_", "-")
                               and o not in row["aliases"]]
            row["cells"][name] = _cell(action)
    lines = ["| option | " + " | ".join(names) + " | help |", "|---" * (len(names) + 2) + "|"]
    for option, row in rows.items():
        flag = f"`{option}`" + "".join(f" (`{a}`)" for a in row["aliases"])
        lines.append(f"| {flag} | " + " | ".join(row["cells"].get(c, "") for c in names) + f" | {row['help']} |")
    return "\n".join(lines) + "\n"


def _parse(argv: list[str]) -> tuple[Command, object]:
    command = _select(argv)
    parser = build_parser(command)
    if command is None or argv[:len(command.path)] != list(command.path):  # no command, or a group's --help
        parser.parse_args(argv)  # prints the usage error or help and exits
        raise UsageError(f"unknown command {' '.join(argv)!r}.")
    leaf = parser._defaults["_leaf"]
    argv = _note_renamed(leaf, argv[len(command.path):])
    if not {"-h", "--help"} & set(argv):
        argv = _apply_config(leaf, argv)
        _refuse_unknown_flags(leaf, argv)
    namespace = leaf.parse_args(argv)
    args_class = parser._defaults["_args_class"]
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(args_class) if f.init}
    if command.positional and namespace._positional:
        values[command.positional] = list(values[command.positional] or []) + namespace._positional
    try:
        args = args_class(**values)
    except (ValueError, TypeError) as err:  # __post_init__ checks (TrainingArguments' included)
        raise UsageError(str(err)) from err
    check_finite(args)
    return command, args


HUB_UNREACHABLE = ("ConnectError", "ConnectTimeout", "ConnectionError", "NameResolutionError", "MaxRetryError",
                   "gaierror", "ProxyError")  # httpx, requests, urllib3 and socket names for "no connection"


def cannot_reach_hub(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a failed connection, not an answer from the Hub (offline, the
    libraries' own errors say what is missing from the cache)."""
    from .hub import hub_offline

    if hub_offline():
        return False
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConnectionError) or any(c.__name__ in HUB_UNREACHABLE for c in type(err).__mro__):
            return True
        err = err.__cause__ or err.__context__
    return False


def hub_unreachable_message(what: str) -> str:
    return (f"cannot reach the Hugging Face Hub for {what}; set HF_HUB_OFFLINE=1 to use local files and the HF "
            "cache only, or check the network (HF_ENDPOINT, HTTPS_PROXY).")


@contextlib.contextmanager
def reaching_hub(what: str) -> Iterator[None]:
    """Turn a failed connection inside the block into one :class:`ConnectionError` naming ``what`` was wanted."""
    try:
        yield
    except Exception as err:
        if cannot_reach_hub(err):
            raise ConnectionError(hub_unreachable_message(what)) from err
        raise


def load_hub_dataset(name: str, config: str | None = None, split: str = "train", what: str = "--dataset_name"):
    """``datasets.load_dataset(name, config, split=split)``, with one-line errors for a Hub that cannot be used."""
    from datasets import load_dataset

    from .hub import HubAccessError, hub_offline

    with reaching_hub(f"the dataset {name!r} ({what})"):
        try:
            return load_dataset(name, config, split=split)
        except Exception as err:  # datasets' offline errors vary; the cause is one
            if not hub_offline():
                raise
            raise HubAccessError(f"{what} {name!r} is not a local path and HF_HUB_OFFLINE=1 forbids downloading it "
                                 "from the Hub (it is not in the datasets cache).") from err


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``repalign``; returns the exit code (0 ok, 1 failed at run time, 2 bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("REPALIGN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]

    def fail(err: BaseException, code: int, message: str | None = None) -> int:
        if debug:
            traceback.print_exception(err)
        sys.stderr.write(f"{PROG}: error: {one_line(message or err)}\n")
        return code

    try:
        command, args = _parse(argv)
    except SystemExit as exit:  # argparse: --help (0) or a usage error it printed (2)
        return exit.code if isinstance(exit.code, int) else 2
    except UsageError as err:
        return fail(err, 2)
    run: Callable[[object], int | None] = _load(command.run)
    if getattr(args, "disable_tqdm", False):  # our bars and transformers' (trainers read it from their arguments)
        from transformers.utils import logging

        logging.disable_progress_bar()
    try:
        if command.path[0] == "legend":
            from . import register_pipeline

            register_pipeline()
        return int(run(args) or 0)
    except KeyboardInterrupt as err:
        return fail(err, 130, "interrupted")
    except UsageError as err:
        return fail(err, 2)
    except SystemExit as exit:
        if isinstance(exit.code, int) or exit.code is None:
            return exit.code or 0
        return fail(exit, 1, str(exit.code).removeprefix(f"{PROG}: error: "))
    except Exception as err:  # noqa: BLE001  (a CLI reports, the library raises)
        if cannot_reach_hub(err) and "cannot reach the Hugging Face Hub" not in str(err):
            return fail(err, 1, hub_unreachable_message(f"`{PROG} {' '.join(command.path)}`"))
        expected = isinstance(err, (ValueError, OSError, KeyError, ImportError, RuntimeError))
        message = str(err) if expected else f"{type(err).__name__}: {err}"
        if isinstance(err, KeyError):
            message = str(err.args[0]) if err.args else message
        if isinstance(err, RuntimeError) and "out of memory" in str(err).lower():
            message = f"out of memory: {err}; lower --batch_size."
        return fail(err, 1, message + ("" if debug or expected else " (run with --debug for the traceback)"))


if __name__ == "__main__":
    raise SystemExit(main())
