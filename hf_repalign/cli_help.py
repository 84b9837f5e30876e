"""``--help`` of the commands whose arguments import torch, answered without importing them.

The RAHF commands' arguments subclass ``TrainingArguments`` / TRL's ``SFTConfig``, whose import takes seconds
(torch, peft). A parser's help depends only on its actions, so :func:`describe` turns the built parser into JSON
and :func:`rebuild` turns that back into a parser that prints the same help, at any terminal width.

``hf_repalign/cli_help.json`` ships the descriptions for the Python, transformers and trl versions it names and for
our source files it hashes. Other versions get the live parser once, and its description is kept in
``$HF_HOME/hf_repalign/cli-help``. After changing a RAHF argument or moving to other versions, regenerate the
shipped file (``tests/test_cli_help.py`` fails until then):

    $ python -m hf_repalign.cli_help
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
SHIPPED = PACKAGE / "cli_help.json"
LIBRARIES = ("transformers", "trl")  # whose dataclasses and argument parser make the RAHF parsers
FORMATTERS = (argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter)
# The actions argparse registers under these names; anything else is not described (its help is built live).
KINDS = ("store", "store_const", "store_true", "store_false", "append", "append_const", "extend", "count", "help")
VALUE_KINDS = ("store", "append", "extend")


class Unsupported(ValueError):
    """A parser feature :func:`describe` does not reproduce."""


def _escape(text: str | None) -> str | None:
    return None if text is None else text.replace("%", "%%")


def describe(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A JSON-able description of ``parser`` from which :func:`rebuild` prints the same help.

    Help strings are stored expanded (``%(default)s`` and the ``(default: ...)`` suffix filled in), so the
    defaults themselves, which need not be JSON, are not stored.
    """
    if parser.formatter_class not in FORMATTERS:
        raise Unsupported(f"formatter {parser.formatter_class.__name__}")
    if parser._mutually_exclusive_groups:
        raise Unsupported("mutually exclusive groups")
    names = {cls: name for name, cls in parser._registries["action"].items() if name in KINDS}
    formatter = parser._get_formatter()
    groups = {id(action): index for index, group in enumerate(parser._action_groups)
              for action in group._group_actions}
    actions = []
    for action in parser._actions:
        if type(action) not in names:
            raise Unsupported(f"action {type(action).__name__} of {action.dest}")
        help_text = action.help
        if help_text and help_text.strip() and help_text != argparse.SUPPRESS:
            help_text = _escape(formatter._expand_help(action))
        item = {"option_strings": action.option_strings, "dest": action.dest, "kind": names[type(action)],
                "required": action.required, "help": help_text, "group": groups[id(action)]}
        if item["kind"] in VALUE_KINDS:
            item.update(nargs=action.nargs, metavar=action.metavar,
                        choices=None if action.choices is None else [str(c) for c in action.choices])
        actions.append(item)
    return {"prog": parser.prog, "usage": parser.usage, "description": parser.description, "epilog": parser.epilog,
            "groups": [{"title": g.title, "description": g.description} for g in parser._action_groups],
            "actions": actions}


def rebuild(description: dict[str, Any]) -> argparse.ArgumentParser:
    """A parser that prints the help of the described one (for ``--help`` only: it keeps no types or defaults)."""
    parser = argparse.ArgumentParser(prog=description["prog"], usage=description["usage"],
                                     description=description["description"], epilog=description["epilog"],
                                     add_help=False)
    groups = [parser._positionals, parser._optionals]
    for index, spec in enumerate(description["groups"]):
        if index < len(groups):
            groups[index].title, groups[index].description = spec["title"], spec["description"]
        else:
            groups.append(parser.add_argument_group(spec["title"], spec["description"]))
    for item in description["actions"]:
        kwargs: dict[str, Any] = {"action": item["kind"], "help": item["help"]}
        if item["option_strings"]:
            kwargs["dest"] = item["dest"]
        if item["required"]:  # not every action takes the argument
            kwargs["required"] = True
        if item["kind"] in VALUE_KINDS:
            metavar = item["metavar"]
            kwargs.update(nargs=item["nargs"], choices=item["choices"],
                          metavar=tuple(metavar) if isinstance(metavar, list) else metavar)
        groups[item["group"]].add_argument(*(item["option_strings"] or [item["dest"]]), **kwargs)
    return parser


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """What the RAHF parsers depend on besides our source files (cheap: no import)."""
    return {"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            **{package: _version(package) for package in LIBRARIES}}


def _sha256(relative: str) -> str | None:
    try:
        return hashlib.sha256((PACKAGE / relative).read_bytes()).hexdigest()
    except OSError:
        return None


def source_files(args_class: type) -> list[str]:
    """Our files that make ``args_class``'s parser: ``cli.py`` (descriptions, ``--config``), the modules of its
    classes, and the modules those import names from that the class bodies use (defaults such as ``PAPER_LAYERS``)."""
    import ast

    files = {PACKAGE / "cli.py"}
    for cls in args_class.__mro__:
        path = Path(getattr(sys.modules[cls.__module__], "__file__", None) or "/").resolve()
        if PACKAGE not in path.parents:
            continue
        files.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        used = {n.id for n in ast.walk(body) if isinstance(n, ast.Name)}
        package = cls.__module__.rsplit(".", 1)[0]
        for node in tree.body:
            if not (isinstance(node, ast.ImportFrom) and node.level and node.module):
                continue  # only relative imports reach our files ("from . import x" is not used for fields)
            if used & {a.asname or a.name for a in node.names}:
                base = package.rsplit(".", node.level - 1)[0]
                module = Path(*f"{base}.{node.module}".split(".")[1:])
                files.add(next(f for f in (PACKAGE / module.with_suffix(".py"), PACKAGE / module / "__init__.py")
                               if f.is_file()))
    return sorted(str(f.relative_to(PACKAGE)) for f in files)


def _matches(entry: Any, env: dict[str, Any]) -> bool:
    if not isinstance(entry, dict) or entry.get("environment") != env or "parser" not in entry:
        return False
    sources = entry.get("sources")
    return isinstance(sources, dict) and all(_sha256(f) == digest for f, digest in sources.items())


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def user_cache(name: str) -> Path:
    from .hub import hf_home

    env = hashlib.sha256(json.dumps(environment(), sort_keys=True).encode()).hexdigest()[:12]
    return hf_home() / "hf_repalign" / "cli-help" / f"{name}-{env}.json"


def lookup(name: str, shipped: Path = SHIPPED) -> dict[str, Any] | None:
    """The description of command ``name`` ("rahf-scit") that holds here: shipped, else cached, else ``None``."""
    env = environment()
    entry = _read(shipped).get(name)
    if _matches(entry, env):
        return entry["parser"]
    cached = _read(user_cache(name))  # read only when the shipped one does not hold
    return cached["parser"] if _matches(cached, env) else None


def entry(parser: argparse.ArgumentParser, args_class: type) -> dict[str, Any]:
    """What :func:`lookup` reads: the parser's description and what it holds for."""
    return {"environment": environment(), "sources": {f: _sha256(f) for f in source_files(args_class)},
            "parser": describe(parser)}


def print_help(name: str, live: Callable[[], tuple[argparse.ArgumentParser, type]], shipped: Path = SHIPPED) -> None:
    """Print command ``name``'s help from a description when one holds, else from ``live()`` (the parser and its
    arguments class), whose description is then cached for the next call."""
    description = lookup(name, shipped)
    if description is not None:
        try:
            text = rebuild(description).format_help()
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):  # damaged: build the live parser
            text = None
        if text is not None:
            sys.stdout.write(text)
            return
    parser, args_class = live()
    parser.print_help()
    from .artifacts import atomic_write_text

    try:
        atomic_write_text(user_cache(name), json.dumps(entry(parser, args_class)))
    except Exception:  # noqa: BLE001  (the help is printed; an unwritable cache or an undescribable parser only
        pass  # costs speed on the next call)


def write_shipped(path: Path = SHIPPED) -> None:
    """Describe every command with ``cached_help`` into ``path``, one action a line for readable diffs."""
    from .cli import COMMANDS, leaf_parser

    chunks = []
    for command in (c for c in COMMANDS if c.cached_help):
        item = entry(*leaf_parser(command))
        actions = ",\n  ".join(json.dumps(a) for a in item["parser"].pop("actions"))
        head = json.dumps(item)[:-2]  # reopen the parser object to append its actions
        chunks.append(f'{json.dumps("-".join(command.path))}: {head}, "actions": [\n  {actions}\n]}}}}')
    text = "{\n" + ",\n".join(chunks) + "\n}\n"
    json.loads(text)  # well-formed before it replaces the old file
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} for {environment()}")


if __name__ == "__main__":
    write_shipped()
