"""Lazy package exports: a public name imports its module on first use, so ``import hf_repalign.x.cli`` (and the
``repalign --help`` it serves) does not pay for torch and transformers' model code.

Example:
    >>> __getattr__, __dir__ = lazy_exports(__name__, {"MarginVector": "vector"})
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping


class _LazyPackage(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing submodule `annotate` binds it as the package attribute `annotate`; the exported function of the
        # same name must stay what `package.annotate` means, as with eager `from .annotate import annotate`.
        if isinstance(value, types.ModuleType) and name in getattr(self, "_lazy_exports", ()):
            target = getattr(importlib.import_module(f".{self._lazy_exports[name]}", self.__name__), name)
            if not isinstance(target, types.ModuleType):
                return
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package``, where ``exports`` maps a name to its submodule (relative)."""
    module = sys.modules[package]
    module._lazy_exports = dict(exports)
    module.__class__ = _LazyPackage

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{exports[name]}", package), name)

    def __dir__() -> list:
        return sorted(exports)

    return __getattr__, __dir__
