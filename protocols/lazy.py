"""Lazy package exports: a public name is imported from its module on first use.

Every Pollinate package's ``__init__`` lists its API in ``__all__`` and maps
each name to the module that defines it; :func:`lazy_exports` turns that map
into the module-level ``__getattr__`` and ``__dir__`` (PEP 562). ``import
client`` on a device, or ``pollinate --help``, then costs nothing until a name
is used, and no package copies the mechanism.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, table: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` from ``{name: module}``.

    Parameters
    ----------
    package : str
        The package's ``__name__`` (named in the AttributeError).
    table : Mapping[str, str]
        Public name to the module that defines it.
    """
    names = dict(table)

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
