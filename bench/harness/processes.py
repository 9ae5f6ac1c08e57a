"""Child processes of a benchmark: JSON-reporting children and logged runs.

Every child runs from :data:`~bench.harness.paths.REPO`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness.measure import now
from bench.harness.paths import REPO


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def last_json_line(text: str) -> dict[str, Any]:
    """The last line of ``text`` that starts with ``{``, parsed.

    Raises
    ------
    RuntimeError
        If there is none (the message carries the end of ``text``).
    """
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON line in child output: {text[-2000:]}")
    return dict(json.loads(lines[-1]))


def run_json_child(
    cmd: Sequence[str], *, timeout: float, what: str = "child"
) -> dict[str, Any]:
    """Run ``cmd`` from :data:`REPO`; its last JSON line of stdout.

    Raises
    ------
    RuntimeError
        If it exits non-zero or prints no JSON line (with its stderr tail).
    """
    proc = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )
    if proc.returncode != 0 or not any(
        ln.startswith("{") for ln in proc.stdout.splitlines()
    ):
        raise RuntimeError(
            f"{what} failed (rc {proc.returncode}): {proc.stderr[-2000:]}"
        )
    return last_json_line(proc.stdout)


def run_logged(
    cmd: Sequence[str], log_path: Path, timeout: float, *, append: bool = False
) -> tuple[int | None, bool, float]:
    """Run ``cmd`` from :data:`REPO` with stdout and stderr into ``log_path``.

    At the deadline the process gets SIGINT (``pollinate`` stops its engine
    group on ^C), then 90 s later SIGKILL. An empty ``cmd`` runs nothing.

    Returns
    -------
    tuple[int | None, bool, float]
        Exit status (``None`` when nothing ran), whether the deadline passed,
        and the wall time, s.
    """
    t0 = now()
    timed_out = False
    returncode: int | None = None
    with log_path.open("a" if append else "w") as log:
        if cmd:
            proc = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            returncode = proc.returncode
    return returncode, timed_out, now() - t0
