"""A user's file that shadows a Pollinate package is named, not silently used.

Pollinate installs generic top-level packages (``models``, ``server``...). A
``models.py`` in a folder that comes first on ``sys.path`` (Flower's app
folder, the current folder of ``python -c``, ``PYTHONPATH``) would replace
ours; every entry point checks that each package comes from this
installation (:mod:`protocols.installation`). Each case runs in a fresh
interpreter with the planted folder first on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from protocols.installation import PACKAGES, find_shadows, installation_root
from tests.conftest import run_python

REPO_ROOT = Path(__file__).resolve().parents[1]


def _plant(folder: Path, name: str) -> Path:
    """A user's module ``name.py`` in ``folder``, as found in app folders."""
    folder.mkdir(parents=True, exist_ok=True)
    planted = folder / f"{name}.py"
    planted.write_text("# a user's own module\nVALUE = 1\n")
    return planted.resolve()  # as the message names it


def test_packages_are_the_wheels_packages() -> None:
    """The checked names are exactly the packages the wheel installs.

    Breaks if a package is added to pyproject.toml but not to the check.
    """
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert sorted(PACKAGES) == sorted(wheel)


def test_a_clean_installation_passes(tmp_path: Path) -> None:
    """Nothing is reported when nothing shadows; the CLI starts.

    Breaks if the check reports a false alarm on a normal install (editable
    or not), which would stop every entry point.
    """
    assert find_shadows() == []
    assert all((installation_root() / name).is_dir() for name in PACKAGES)
    out = run_python(
        "import sys\nfrom cli.main import main\nsys.exit(main(['--help']))",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "usage: pollinate" in out.stdout


def test_the_cli_names_a_planted_module(tmp_path: Path) -> None:
    """``pollinate`` with a ``models.py`` first on the path fails naming the file.

    Breaks if the command runs with the user's module in place of ours, or
    fails without saying which file is to blame.
    """
    planted = _plant(tmp_path / "app", "models")
    out = run_python(
        "import sys\nfrom cli.main import main\nsys.exit(main(['--help']))",
        tmp_path,
        pythonpath=tmp_path / "app",
    )
    assert out.returncode == 2
    assert f"{planted} shadows Pollinate's package 'models'" in out.stderr
    assert "own environment" in out.stderr
    assert "usage:" not in out.stdout


def test_packages_and_folders_are_named_but_plain_folders_are_not(
    tmp_path: Path,
) -> None:
    """A module or a package folder shadows; a folder without __init__.py does not.

    Breaks if a shadowing package folder goes unreported, or a harmless data
    folder that happens to be called ``corpora`` raises a false alarm.
    """
    app = tmp_path.resolve() / "app"
    _plant(app, "models")
    (app / "strategies").mkdir()
    (app / "strategies" / "__init__.py").write_text("")
    (app / "corpora").mkdir()  # a namespace folder: ours still wins
    out = run_python(
        "import json\nfrom protocols.installation import find_shadows\n"
        "print(json.dumps({s.package: str(s.found) for s in find_shadows()}))",
        tmp_path,
        pythonpath=app,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "models": str(app / "models.py"),
        "strategies": str(app / "strategies"),
    }


@pytest.mark.parametrize(
    ("entry", "planted_name"),
    [
        # server.app does not import simulation: without the check the
        # shadowing would go unnoticed.
        ("server.app", "simulation"),
        # A server.py stops Flower from loading server.app at all; the
        # ClientApps, loaded next to the same folder, name it.
        ("client.app", "server"),
    ],
)
def test_the_flower_apps_name_a_planted_module(
    entry: str, planted_name: str, tmp_path: Path
) -> None:
    """Importing the ServerApp or ClientApp module fails naming the planted file.

    Breaks if ``server/app.py`` or ``client/app.py`` stops calling the check
    when Flower imports it.
    """
    planted = _plant(tmp_path / "app", planted_name)
    out = run_python(f"import {entry}", tmp_path, pythonpath=tmp_path / "app")
    assert out.returncode != 0
    assert "InstallationError" in out.stderr
    assert f"{planted} shadows Pollinate's package '{planted_name}'" in out.stderr
