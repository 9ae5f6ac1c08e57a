"""``stop_process_tree``: a server's processes all stop, detached ones too.

Flower's SuperLink starts its SuperExec with ``start_new_session=True``; a
stop that signals only the SuperLink's process group leaves it (and the
ServerApp under it) running, and the dying ServerApp then overwrites the
run's status after the stop has recorded it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import psutil

from server.processes import process_alive, stop_process_tree

# A parent that starts a grandchild in a session of its own, prints its PID,
# then waits; the grandchild ignores nothing and simply sleeps.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_detached_grandchild_is_stopped_with_its_parent() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert parent.stdout is not None
    grandchild = int(parent.stdout.readline())
    try:
        assert psutil.Process(grandchild).ppid() == parent.pid
        assert psutil.Process(grandchild).pid != psutil.Process(parent.pid).pid
        assert os.getsid(grandchild) != os.getsid(parent.pid)
        stop_process_tree(parent.pid, grace_s=5.0)
        assert parent.poll() is not None
        assert not process_alive(grandchild)
    finally:  # whatever the outcome, leave nothing behind
        for pid in (grandchild, parent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait()


def test_a_missing_process_or_init_is_left_alone() -> None:
    """Stopping a PID that no longer exists is a no-op; PIDs <= 1 are refused
    (``killpg(1)`` or ``kill(-1)`` would reach unrelated processes)."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    stop_process_tree(done.pid, grace_s=0.5)  # no error
    stop_process_tree(1, grace_s=0.5)
    stop_process_tree(0, grace_s=0.5)
    assert process_alive(1)


def test_stop_marked_stops_only_processes_carrying_the_token() -> None:
    """The watchdog finds a simulation's processes by the token in their
    environment, wherever they were re-parented; a process without it (or
    with another owner's token) is left alone."""
    from simulation.watchdog import OWNER_ENV, stop_marked

    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    mine = subprocess.Popen(
        sleep, env={**os.environ, OWNER_ENV: "owner-a"}, start_new_session=True
    )
    other = subprocess.Popen(
        sleep, env={**os.environ, OWNER_ENV: "owner-b"}, start_new_session=True
    )
    try:
        stop_marked("owner-a", [], grace_s=5.0)
        assert mine.wait(timeout=10) is not None
        assert other.poll() is None
    finally:
        for proc in (mine, other):
            proc.kill()
            proc.wait()
