"""What the numbers were measured on: :func:`machine_info`."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib import import_module
from pathlib import Path
from typing import Any

from bench.harness.paths import REPO

SHARED_NOTE = (
    "CPU shared with other engineers' processes during the run; "
    "timings are this machine's at that time"
)
"""The default ``note`` of :func:`machine_info`: how to read the timings."""

DEFAULT_PACKAGES = ("torch", "numpy", "numba", "transformers", "flwr")
"""Packages whose versions :func:`machine_info` records unless told otherwise."""


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def git_commit() -> str:
    """The checked-out commit of :data:`REPO` (empty when git is unavailable)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return ""
    return out.stdout.strip()


_VERSION_KEYS = {"grpc": "grpcio"}  # recorded under the distribution's name


def _versions(packages: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in packages:
        key = _VERSION_KEYS.get(name, name)
        try:
            module = import_module(name)
        except ImportError:
            out[key] = None
            continue
        out[key] = getattr(module, "__version__", None)
        if name == "torch":
            out["torch_threads"] = module.get_num_threads()
            cuda = bool(module.cuda.is_available())
            out["cuda_available"] = cuda
            out["cuda_device"] = module.cuda.get_device_name(0) if cuda else None
        elif name == "numba":
            out["numba_threads"] = module.config.NUMBA_NUM_THREADS
    return out


def machine_info(
    packages: Sequence[str] = DEFAULT_PACKAGES, *, note: str = SHARED_NOTE
) -> dict[str, Any]:
    """What the numbers were measured on.

    Parameters
    ----------
    packages : Sequence[str]
        Packages whose ``__version__`` to record (``None`` when absent);
        ``torch`` adds ``torch_threads``, ``cuda_available`` and
        ``cuda_device``, ``numba`` adds ``numba_threads``. Importing them is
        what makes this call heavy: call it after any lean-parent spawning.
    note : str
        Recorded as ``note`` (how to read the timings).

    Returns
    -------
    dict[str, Any]
        ``cpu_count``, ``cpu_affinity``, ``cpu_model``, ``memory_gib``,
        ``load_average_at_start``, ``platform``, ``python``, the package
        versions, ``git_commit``, ``date`` (UTC, ISO 8601) and ``note``.
    """
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        ),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    info.update(_versions(packages))
    info.update(
        git_commit=git_commit(),
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        note=note,
    )
    return info
