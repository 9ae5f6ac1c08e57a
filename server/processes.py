"""The processes a deployed server runs: readiness, liveness and stopping.

The SuperLink, the fleet gateway and ``flwr log`` each run in a process group
of their own (:mod:`server.deploy`, :mod:`server.flower_cli`). This module
waits for one to listen (:func:`wait_for_port`), tells whether a recorded PID
is still alive (:func:`process_alive`) and still the same program
(:func:`process_has_argument`, against PID reuse), and stops a process with
everything it started (:func:`stop_process_tree`). :class:`DeployError` is the
error of every deployment step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

__all__ = [
    "DeployError",
    "free_loopback_port",
    "process_alive",
    "process_has_argument",
    "stop_process_tree",
    "wait_for_port",
]


class DeployError(RuntimeError):
    """A deployment process could not be started, reached or stopped."""


def wait_for_port(
    host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes]
) -> None:
    """Block until ``host:port`` accepts connections (or the process died).

    Raises
    ------
    DeployError
        If the process exits first or the port stays closed for ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(
                f"the process exited with status {proc.returncode} before listening"
            )
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)  # polling a port: there is no readiness signal to wait on
    raise DeployError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the SuperLink behind the gateway)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists (and is not a zombie)."""
    if pid <= 0:  # os.kill(-1, 0) would signal every process we may signal
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return state != "Z"


def process_has_argument(pid: int, argument: str) -> bool:
    """Whether process ``pid`` runs with ``argument`` on its command line.

    Tells a recorded process (``-m server.gateway``, say) from an unrelated
    one that got its PID after it exited. False if there is no such process
    or it cannot be inspected.
    """
    try:
        return argument in psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def stop_process_tree(pid: int, grace_s: float = 10.0) -> None:
    """Stop a process, its process group and all its descendants.

    Flower's SuperLink starts its SuperExec in a session of its own, and that
    starts the ServerApp, so the SuperLink's process group does not hold the
    whole server. Every process found is sent SIGTERM; what is still alive
    after ``grace_s`` gets SIGKILL. Returns once all of them are gone, so
    nothing they might write (``status.json``) lands after the caller's.
    """
    if pid <= 1:  # never signal "every process" or init's group
        return
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    # The group too: members whose parent died were re-parented out of the tree.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace_s)
