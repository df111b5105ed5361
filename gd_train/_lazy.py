"""Lazy re-exports for package `__init__` files (PEP 562 module `__getattr__`): a package hands on its
public names without importing the modules behind them until a name is first used, so that
`import gd_train.config` (the launcher, the CLI) never loads torch or diffusers."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Callable, Callable]:
    """`__all__, __getattr__, __dir__` for `package`, where `exports` maps each name to its module."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        return getattr(import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return sorted(exports), __getattr__, __dir__
