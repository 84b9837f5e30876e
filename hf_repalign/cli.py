"""The ``repalign`` console script: ``repalign generate | legend ... | rahf ...``, in the manner of ``trl``.

Arguments are dataclasses (TRL style). ``--config file.yaml`` supplies any of them, required ones included, and
flags on the command line override it (TRL's ``TrlParser``). Every user error ends in one line
``repalign: error: ...`` with exit code 2 (bad arguments) or 1 (failed at run time); ``--debug`` (or
``REPALIGN_DEBUG=1``) also prints the traceback.

Only the chosen command's argument module is imported, and the argument modules are light, so ``--help`` answers
fast; the RAHF commands' arguments are ``TrainingArguments`` (which import torch), so their help is printed from a
description of their parser (``cli_help.py``).

Example:
    $ repalign generate "How do I pick a lock?" --principle "Be harmless." --alpha 2
    $ repalign legend fit-vector --config fit.yaml --num_prompts 50
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DType = Literal["auto", "float32", "bfloat16", "float16"]  # a --dtype flag: argparse checks the choice
PROG = "repalign"


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
    cached_help: bool = False  # its arguments import torch: --help from a description (cli_help.py)


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
            "hf_repalign.rahf.cli:SCITCommand", "hf_repalign.rahf.cli:run_scit", cached_help=True),
    Command(("rahf", "dual"), "Step 1b: good and bad models on chosen / rejected.",
            "hf_repalign.rahf.cli:DualCommand", "hf_repalign.rahf.cli:run_dual", cached_help=True),
    Command(("rahf", "align"), "Step 2: train the RAHF LoRA adapter.",
            "hf_repalign.rahf.cli:AlignCommand", "hf_repalign.rahf.cli:run_align", cached_help=True),
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
    unknown = leaf.set_defaults_with_config(**values)[::2]
    if unknown:
        known = sorted(a.dest for a in leaf._actions if a.dest not in ("help", "config", "_positional"))
        raise UsageError(f"--config: {path} has unknown argument(s) {[u[2:] for u in unknown]}; known: {known}.")
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


def _print_help(argv: list[str], command: Command | None) -> bool:
    """Print a heavy command's ``--help`` without importing its arguments when it can; ``True`` if printed."""
    if command is None or not command.cached_help:
        return False
    words = [i for i, a in enumerate(argv) if not a.startswith("-")][: len(command.path)]
    if not {"-h", "--help"} & set(argv[words[-1] + 1:]):  # "rahf --help scit" is the group's help
        return False
    from .cli_help import print_help

    print_help("-".join(command.path), lambda: leaf_parser(command))
    return True


def _parse(argv: list[str]) -> tuple[Command, object]:
    command = _select(argv)
    if _print_help(argv, command):
        raise SystemExit(0)
    parser = build_parser(command)
    if command is None:
        parser.parse_args(argv)  # prints the usage error or help and exits
        raise UsageError(f"unknown command {' '.join(argv)!r}.")
    leaf = parser._defaults["_leaf"]
    argv = _apply_config(leaf, argv)
    namespace = parser.parse_args(argv)
    args_class = namespace._args_class
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(args_class) if f.init}
    if command.positional and namespace._positional:
        values[command.positional] = list(values[command.positional] or []) + namespace._positional
    try:
        args = args_class(**values)
    except (ValueError, TypeError) as err:  # __post_init__ checks (TrainingArguments' included)
        raise UsageError(str(err)) from err
    check_finite(args)
    return command, args


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
        expected = isinstance(err, (ValueError, OSError, KeyError, ImportError, RuntimeError))
        message = str(err) if expected else f"{type(err).__name__}: {err}"
        if isinstance(err, KeyError):
            message = str(err.args[0]) if err.args else message
        if isinstance(err, RuntimeError) and "out of memory" in str(err).lower():
            message = f"out of memory: {err}; lower --batch_size."
        return fail(err, 1, message + ("" if debug or expected else " (run with --debug for the traceback)"))


if __name__ == "__main__":
    raise SystemExit(main())
