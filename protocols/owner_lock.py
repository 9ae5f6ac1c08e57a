"""An owner lock: an ``flock`` on a file that also records the owner's pid.

The kernel holds an ``flock`` for an open file description and drops it
when the last descriptor of it closes: when the owner exits, however it
exits (SIGKILL included), the lock is free, with no stale-pid guessing. A
child that inherits the descriptor (``pass_fds``) shares the lock and keeps
it held after the owner dies, until the child exits too. The pid in the
file is for messages only; whether the lock is held is asked of the kernel.
:class:`protocols.run_folder.RunFolder` locks its ``.lock`` with this.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OwnerLockHeld", "hold_lock", "lock_holder"]

_RETRY_S = 1.0  # a lock_holder probe holds a shared lock for microseconds


class OwnerLockHeld(Exception):
    """Another live process holds the lock.

    Attributes
    ----------
    pid : int or None
        Its pid, when the file says (None while an owner is mid-start).
    """

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is held by {f'pid {pid}' if pid else 'a process'}")
        self.pid = pid


def _pid_in(fd: int) -> int | None:
    """The pid a lock file holds, or None if it holds none (yet)."""
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


@contextlib.contextmanager
def hold_lock(path: Path) -> Iterator[int]:
    """Hold the owner lock on ``path`` for the block; yield its descriptor.

    The file is created if needed and holds this process's pid while the
    lock is held (emptied on release).

    Raises
    ------
    OwnerLockHeld
        If another open file of ``path`` holds it (another process, or this
        one through another ``hold_lock``).
    OSError
        If the file cannot be opened.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + _RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner = _pid_in(fd)
                if owner is not None or time.monotonic() > deadline:
                    raise OwnerLockHeld(path, owner) from None
                time.sleep(0.05)  # a probe's shared lock, or an owner mid-start
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        try:
            yield fd
        finally:
            os.ftruncate(fd, 0)  # a later reader sees no stale pid
    finally:
        os.close(fd)  # releases the flock (unless a child shares it)


def lock_holder(path: Path) -> int | None:
    """The pid holding the lock on ``path``, or None when nobody holds it.

    Returns 0 when it is held but the pid is not (yet) readable.

    Raises
    ------
    OSError
        If the file exists but cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _pid_in(fd)
            return 0 if owner is None else owner
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
