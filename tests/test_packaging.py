"""The installed distribution: importable from anywhere, console script works.

Top-level names like ``server`` or ``strategies`` collide easily with other
distributions; these tests import every package from outside the repository
in a clean interpreter and check that each resolves to this checkout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from protocols.installation import PACKAGES
from tests.conftest import clean_env, run_python

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_package_imports_from_outside_the_repository(tmp_path: Path) -> None:
    """Each top-level package resolves to this project, not a PyPI namesake.

    Breaks if the project is not installed, a package is missing from the
    wheel, or another distribution shadows one of our names.
    """
    code = (
        "import importlib, json\n"
        f"names = {PACKAGES!r}\n"
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))\n"
    )
    out = run_python(code, tmp_path, check=True)
    files = json.loads(out.stdout.strip().splitlines()[-1])
    for name in PACKAGES:
        path = Path(files[name]).resolve()
        assert path.is_relative_to(REPO_ROOT.resolve()) or "site-packages" in str(path)
        assert path.parent.name == name, (name, path)
        assert (path.parent / "__init__.py").read_text().count("__all__") >= 1


def test_importing_the_client_loads_no_model_and_no_flower_simulation(
    tmp_path: Path,
) -> None:
    """``import client`` on a device stays light: no Ray, nothing happens at import.

    Breaks if a module loads weights, starts Ray or configures logging at import.
    """
    code = "import sys, client, client.app; print(int('ray' in sys.modules))"
    out = run_python(code, tmp_path, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0"


def test_console_script_runs(tmp_path: Path) -> None:
    """``pollinate --help`` and ``pollinate simulate --help`` work after install.

    Breaks if the entry point in pyproject.toml is wrong.
    """
    exe = shutil.which("pollinate", path=str(Path(sys.executable).parent))
    assert exe, "the pollinate console script is not installed next to python"
    for argv in ([exe, "--help"], [exe, "simulate", "--help"]):
        out = subprocess.run(
            argv,
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        assert "pollinate" in out.stdout
