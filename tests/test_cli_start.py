"""A light start: ``--help`` and ``import <package>`` load no torch, transformers or PEFT.

Package ``__init__`` files resolve their public names lazily (module
``__getattr__``) and CLI subcommands import what they run inside their
handlers, so asking for help or importing a package costs a fraction of a
second. Each check runs in a fresh interpreter: ``sys.modules`` of the test
process is full of everything other tests imported. Timings are not asserted
here (see ``bench/``); what is loaded is.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.main import build_parser
from protocols.installation import PACKAGES
from tests.conftest import run_python

HEAVY = ("torch", "transformers", "peft")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command path of the parser: (), ("validate",), ("server", "start")..."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


COMMANDS = list(_commands(build_parser()))


def _loaded_after(statements: str, cwd: Path) -> tuple[list[str], str]:
    """Heavy top-level modules in ``sys.modules`` after ``statements``, and stdout."""
    code = (
        "import json, sys\n"
        f"{statements}\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(json.dumps(heavy))\n"
    )
    out = run_python(code, cwd, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def test_every_command_is_covered() -> None:
    """The walk over the parser reaches nested subcommands.

    Breaks if the parser walk misses subcommands, so that new ones would
    silently go unchecked.
    """
    assert () in COMMANDS
    assert ("server", "start") in COMMANDS
    assert ("client", "join") in COMMANDS
    assert len(COMMANDS) >= 13


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_imports_no_heavy_module(command: tuple[str, ...], tmp_path: Path) -> None:
    """``pollinate [<verb> ...] --help`` loads neither torch, transformers nor PEFT.

    Breaks if a package ``__init__`` imports a heavy submodule eagerly, or a
    ``cli/*.py`` module (or a module it imports at module level) imports
    torch, transformers or PEFT instead of doing so inside its handler.
    """
    argv = [*command, "--help"]
    heavy, stdout = _loaded_after(
        "from cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n",
        tmp_path,
    )
    assert "usage: pollinate" in stdout
    assert heavy == [], f"pollinate {' '.join(argv)} imported {heavy}"


def test_importing_packages_imports_no_heavy_module(tmp_path: Path) -> None:
    """``import protocols, models, ..., cli`` loads neither torch, transformers nor PEFT.

    Breaks if a package ``__init__`` imports its submodules eagerly instead of
    resolving names on first use.
    """
    heavy, _ = _loaded_after(f"import {', '.join(PACKAGES)}", tmp_path)
    assert heavy == []


def _type_checking_imports(init: Path) -> dict[str, str]:
    """Name -> module of the imports under ``if TYPE_CHECKING:`` in ``init``."""
    names: dict[str, str] = {}
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom) and stmt.module:
                    names |= {a.asname or a.name: stmt.module for a in stmt.names}
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_lazy_names_resolve_and_agree(package: str) -> None:
    """Every name in ``__all__`` resolves, from the module the package says.

    Breaks if ``__all__``, the lazy table and the type-checking imports of a
    package ``__init__`` drift apart (a name that type-checks but fails at run
    time, or the reverse), or a name moved out of its module.
    """
    module = importlib.import_module(package)
    if not hasattr(module, "_LAZY"):  # cli: imported eagerly (its __init__ says why)
        assert all(callable(getattr(module, name)) for name in module.__all__)
        return
    lazy: dict[str, str] = module._LAZY
    assert set(lazy) == set(module.__all__)
    assert len(module.__all__) == len(set(module.__all__))
    init = Path(module.__file__ or "")
    typed = _type_checking_imports(init)
    if typed:  # a package may leave static typing to its modules
        assert typed == lazy
    for name in module.__all__:
        value = getattr(module, name)
        assert value is getattr(importlib.import_module(lazy[name]), name), name
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = module.no_such_name
