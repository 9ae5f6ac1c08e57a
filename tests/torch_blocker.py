"""Run Python code in a fresh interpreter where torch and friends cannot be imported.

An edge client runs with NumPy, ONNX Runtime and flwr only. Tests that its
modules never reach for torch run them in a subprocess whose first action
installs :data:`PRELUDE`: a ``sys.meta_path`` finder that makes every import
of a blocked top-level package (and its submodules) raise ``ImportError``,
exactly as on a machine where it is not installed.

Use :func:`run_without` (or prepend :func:`prelude` to your own ``-c`` code).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from tests.conftest import REPO_ROOT, clean_env

__all__ = ["BLOCKED", "prelude", "run_without"]

BLOCKED = ("torch", "transformers", "peft", "accelerate")


def prelude(blocked: Sequence[str] = BLOCKED) -> str:
    """Python source that blocks ``blocked`` packages for the rest of the process.

    It fails at once if one of them is already imported (a ``sitecustomize``
    or ``.pth`` file that imports torch would otherwise hide a dependency).
    """
    names = tuple(blocked)
    return f"""\
import importlib.abc as _abc
import sys as _sys

_BLOCKED = {names!r}


class _Blocker(_abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ImportError(f"No module named {{name!r}} (blocked by the test)")
        return None


_early = sorted(n for n in _sys.modules if n.partition(".")[0] in _BLOCKED)
assert not _early, f"imported before the blocker: {{_early}}"
_sys.meta_path.insert(0, _Blocker())
"""


def run_without(
    code: str, *, blocked: Sequence[str] = BLOCKED, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -c (prelude + code)`` from the repository root, output captured.

    The code ends with an assertion that no blocked package got imported.
    """
    names = tuple(blocked)
    epilogue = f"""
_leaked = sorted(n for n in _sys.modules if n.partition(".")[0] in {names!r})
assert not _leaked, f"blocked packages in sys.modules: {{_leaked}}"
"""
    return subprocess.run(
        [sys.executable, "-c", prelude(names) + "\n" + code + "\n" + epilogue],
        cwd=REPO_ROOT,
        env=clean_env(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
