"""The ``repalign`` console script: ``repalign generate | legend ... | rahf ...``.

Arguments are dataclasses (TRL style); ``--config file.yaml`` supplies defaults that flags override.

Example:
    $ repalign generate "How do I pick a lock?" --principle "Be harmless." --alpha 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Literal
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .formats import PreferenceFormatError

DType = Literal["auto", "float32", "bfloat16", "float16"]  # a --dtype flag: argparse checks the choice


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    args_class: type,
    run: Callable[[object], int | None],
    help: str,
    positional: str | None = None,
) -> HfArgumentParser:
    """Register ``name`` with the fields of ``args_class`` as flags and ``run(args)`` as its action.

    ``positional`` names a list field that may also be given as bare words (``repalign generate "question"``).
    """
    parser = subparsers.add_parser(name, dataclass_types=[args_class], help=help, description=help)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of defaults for these arguments.")
    if positional is not None:
        parser.add_argument("_positional", nargs="*", metavar=positional.upper(), help=f"same as --{positional}")
    parser.set_defaults(_run=run, _args_class=args_class, _parser=parser, _positional_field=positional)
    return parser


def _apply_yaml(parser: HfArgumentParser, args_class: type, path: Path) -> None:
    if not path.is_file():
        raise SystemExit(f"--config: {path} does not exist.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"--config: {path} must hold a mapping of argument names to values.")
    known = {f.name for f in dataclasses.fields(args_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"--config: {path} has unknown argument(s) {unknown}; known: {sorted(known)}.")
    parser.set_defaults(**values)


# Each module has ``register(subparsers)``; importing lazily keeps ``repalign --help`` fast.
COMMAND_MODULES = ("hf_repalign.linear_alignment.cli", "hf_repalign.legend.cli", "hf_repalign.rahf.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="repalign", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    namespace = parser.parse_args(argv)
    if namespace.config is not None:
        _apply_yaml(namespace._parser, namespace._args_class, namespace.config)
        namespace = parser.parse_args(argv)
    field_names = [f.name for f in dataclasses.fields(namespace._args_class)]
    values = {name: getattr(namespace, name) for name in field_names}
    if namespace._positional_field and namespace._positional:
        values[namespace._positional_field] = list(values[namespace._positional_field] or []) + namespace._positional
    args = namespace._args_class(**values)
    try:
        return int(namespace._run(args) or 0)
    except (PreferenceFormatError, FileNotFoundError) as err:  # bad input: the message, not a traceback
        raise SystemExit(f"repalign: error: {err}") from err


if __name__ == "__main__":
    raise SystemExit(main())
