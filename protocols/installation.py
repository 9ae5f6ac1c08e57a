"""One installation: every Pollinate package is imported from the same place.

Pollinate installs eight top-level packages with generic names
(:data:`PACKAGES`: ``protocols``, ``models``, ``server``...). Python imports
the first match on ``sys.path``, and several launchers put a user's folder
first: Flower's app loader (the app folder), ``python -m`` and ``python -c``
(the current folder), ``PYTHONPATH``. A ``models.py``, ``server.py`` or
``server/`` package there silently replaces ours. :func:`check_installation`
finds where each package *would* be imported from, without importing it, and
fails naming the file that shadows ours. Every entry point calls it: the
``pollinate`` command before it parses its arguments, the client daemon and
the simulation launcher before they start Flower, and the ClientApp and
ServerApp modules when Flower imports them (there is no earlier hook).

Limits: the check runs once Python has imported this module and the entry
module. A file that shadows the entry point's own package or ``protocols``
stops Python before any of our code runs (``'server' is not a package``):
a ``server.py`` in a Flower app folder keeps Flower from loading
``server.app``, and the ClientApps, loaded next to the same folder, name it;
a ``cli.py`` on ``PYTHONPATH`` stops the ``pollinate`` command. A shadowing
module that breaks an entry module's own imports before the check gets
Python's ``ImportError``, which names its file. A folder without
``__init__.py`` never shadows a package, so it is not reported.

Standard library only: this runs before anything heavy is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path

__all__ = [
    "PACKAGES",
    "InstallationError",
    "Shadow",
    "check_installation",
    "find_shadows",
    "installation_root",
]

PACKAGES = (
    "protocols",
    "models",
    "corpora",
    "strategies",
    "client",
    "server",
    "simulation",
    "cli",
)
"""Pollinate's top-level packages (``[tool.hatch.build.targets.wheel]``)."""


class InstallationError(ImportError):
    """A Pollinate package would be imported from outside its installation."""


@dataclass(frozen=True, slots=True)
class Shadow:
    """One package that does not come from this installation.

    Attributes
    ----------
    package : str
        The top-level package name (one of :data:`PACKAGES`).
    found : Path | None
        What Python would import instead: a module file, or the folder of a
        package; ``None`` when the name cannot be imported at all.
    expected : Path
        Where this installation keeps the package.
    """

    package: str
    found: Path | None
    expected: Path

    def message(self) -> str:
        """One line saying what is wrong and what to do."""
        if self.found is None:
            return (
                f"Pollinate's package '{self.package}' cannot be imported "
                f"(expected at {self.expected}): reinstall Pollinate"
            )
        shown = f"{self.found}{os.sep}" if self.found.is_dir() else f"{self.found}"
        return (
            f"{shown} shadows Pollinate's package '{self.package}' "
            f"(installed at {self.expected}): rename it, or install Pollinate "
            "in its own environment"
        )


def installation_root() -> Path:
    """The folder holding this installation's packages (site-packages or a checkout)."""
    return Path(__file__).resolve().parent.parent


def _spec(name: str) -> ModuleSpec | None:
    try:
        # An imported module answers with its own spec: what is in use.
        return importlib.util.find_spec(name)
    except ValueError:  # in sys.modules without a spec (made by hand)
        module = sys.modules[name]
        file = getattr(module, "__file__", None)
        return ModuleSpec(name, None, origin=file) if file else None


def _location(spec: ModuleSpec) -> Path | None:
    """The file or package folder ``spec`` would import."""
    if spec.origin and spec.has_location:
        origin = Path(spec.origin).resolve()
        return origin.parent if origin.name == "__init__.py" else origin
    if spec.origin and Path(spec.origin).exists():
        return Path(spec.origin).resolve()
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]).resolve() if locations else None


def find_shadows() -> list[Shadow]:
    """Every package of :data:`PACKAGES` not imported from :func:`installation_root`.

    Nothing is imported: each name is looked up as ``import`` would look it
    up in this process (modules already imported answer with what is loaded).

    Returns
    -------
    list[Shadow]
        Empty when the installation is whole.
    """
    root = installation_root()
    shadows = []
    for name in PACKAGES:
        expected = root / name
        spec = _spec(name)
        found = _location(spec) if spec is not None else None
        if found != expected:
            shadows.append(Shadow(name, found, expected))
    return shadows


def check_installation() -> None:
    """Fail unless every Pollinate package comes from this installation.

    Raises
    ------
    InstallationError
        Naming each shadowing file or folder (or each missing package), one
        per line.
    """
    shadows = find_shadows()
    if shadows:
        first = shadows[0]
        raise InstallationError(
            "\n".join(s.message() for s in shadows),
            name=first.package,
            path=str(first.found) if first.found else None,
        )
