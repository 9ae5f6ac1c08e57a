"""A watchdog that takes a simulation's processes down when its owner dies.

``pollinate simulate`` (the *owner*) starts a SuperLink in a session of its
own; the SuperLink starts a SuperExec in another session, which starts
``flwr-simulation``, which starts Ray's processes. ``PR_SET_PDEATHSIG`` reaches
only direct children and a killed owner runs no ``finally``, so without help a
SIGKILL of the owner leaves all of them running (and writing to the run
folder). The watchdog is a small process of its own session that:

- reads commands from a pipe whose other end only the owner holds; the
  kernel closes that end when the owner dies, however it dies, so
  end-of-file *is* the owner's death (no polling);
- on that end-of-file, without a ``release`` first, stops every process the
  owner registered (``watch PID``: their trees and process groups) and every
  process whose environment carries the owner's token (:data:`OWNER_ENV`,
  which the SuperLink passes down to the SuperExec, ``flwr-simulation`` and
  Ray's workers, however they were re-parented);
- shares the owner's run-folder lock (its descriptor is inherited), so the
  folder stays locked until the last engine process is gone, and a
  ``pollinate resume`` after the kill finds it free only then;
- then records the end nobody else could: a run whose ``status.json`` still
  says ``running`` or ``resuming`` becomes ``stopped``, with the owner's pid
  in its reason, so ``pollinate server status``, a watcher or a reader of
  the folder never sees a dead run as alive (the killed owner ran no
  ``finally``, and the ServerApp was stopped mid-round).

It ignores SIGINT, SIGTERM and SIGHUP: a Ctrl-C or a closed terminal is the
owner's to handle. :class:`Watchdog` starts it (``main(TOKEN, LOCK_FD,
GRACE_S)`` in an isolated interpreter); it imports nothing heavier than psutil.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import psutil

__all__ = ["OWNER_ENV", "Watchdog", "main", "record_owner_gone", "stop_marked"]

OWNER_ENV = "POLLINATE_RUN_OWNER"
"""Environment variable marking every process of one simulation."""

# The folder holding this installation's packages, first on the watchdog's path.
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_START = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from simulation.watchdog import main; sys.exit(main(sys.argv[1:]))"
)


class Watchdog:
    """The owner's handle on its watchdog process (a context manager).

    Parameters
    ----------
    lock_fd : int or None
        The run folder's lock descriptor, shared with the watchdog.
    grace_s : float
        Seconds between SIGTERM and SIGKILL when it stops processes.
    run_dir : Path or None
        The run folder whose status it records as stopped if the owner dies
        mid-run (None: it records nothing).
    """

    def __init__(
        self,
        lock_fd: int | None = None,
        *,
        grace_s: float = 10.0,
        run_dir: Path | None = None,
    ) -> None:
        self.token = f"{os.getpid()}-{secrets.token_hex(8)}"
        fds = () if lock_fd is None else (lock_fd,)
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-I",  # no current folder or PYTHONPATH: nothing can shadow us
                "-c",
                _START.format(root=str(_PACKAGE_ROOT)),
                self.token,
                str(-1 if lock_fd is None else lock_fd),
                str(grace_s),
                "" if run_dir is None else str(Path(run_dir).resolve()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=fds,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """The watchdog's pid."""
        return self._proc.pid

    def env(self) -> dict[str, str]:
        """Variables that mark a process (and all it starts) as this owner's."""
        return {OWNER_ENV: self.token}

    def _send(self, line: str) -> None:
        stdin = self._proc.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                stdin.write(f"{line}\n".encode())
                stdin.flush()

    def watch(self, pid: int) -> None:
        """Stop ``pid``'s process tree and group too if the owner dies."""
        self._send(f"watch {pid}")

    def release(self, timeout_s: float = 10.0) -> None:
        """End the watchdog without it stopping anything (the owner did)."""
        self._send("release")
        if self._proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _marked(token: str) -> list[psutil.Process]:
    """Every other process whose environment carries ``token``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(OWNER_ENV) == token:
                found.append(proc)
    return found


def stop_marked(token: str, roots: list[psutil.Process], grace_s: float = 10.0) -> None:
    """Stop ``roots`` (trees and groups) and every process marked with ``token``.

    SIGTERM first, SIGKILL after a grace period; repeated until a pass finds
    nothing alive (a dying parent may have started a child meanwhile).
    """
    for _ in range(3):
        procs: dict[int, psutil.Process] = {}
        for proc in [*(r for r in roots if r.is_running()), *_marked(token)]:
            with contextlib.suppress(psutil.Error):
                procs[proc.pid] = proc
                procs.update({c.pid: c for c in proc.children(recursive=True)})
        for root in roots:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if root.pid > 1:
                    os.killpg(root.pid, signal.SIGTERM)
        procs.pop(os.getpid(), None)
        if not procs:
            return
        for proc in procs.values():
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace_s)


def record_owner_gone(run_dir: Path, owner_pid: str) -> None:
    """Record a run its dead owner left ``running`` or ``resuming`` as ``stopped``.

    Called once the engine is stopped and while the folder is still locked.
    Any other state is left alone: an ended run's record is its owner's, and
    a run that never started has nothing to resume. A damaged
    ``status.json`` is replaced by a ``stopped`` record saying so.
    """
    # Here, not at import: the watchdog stays light until it is needed.
    from protocols.run_folder import RunFolder, RunFolderError

    folder = RunFolder(run_dir)
    reason = (
        f"its owner (pollinate, pid {owner_pid}) was killed; the watchdog "
        "stopped the engine"
    )
    try:
        status = folder.read_status()
    except RunFolderError as exc:
        folder.write_status("stopped", reason=f"{reason} ({exc})")
        return
    if status.state in ("running", "resuming"):
        folder.write_status("stopped", **{**status.fields, "reason": reason})


def main(argv: list[str]) -> int:
    """Watch until the owner releases us or dies; see the module docstring."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    token, lock_fd, grace_s = argv[0], int(argv[1]), float(argv[2])
    run_dir = argv[3] if len(argv) > 3 else ""
    roots: list[psutil.Process] = []
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "release":
            return 0
        if command == "watch" and arg.isdigit():
            with contextlib.suppress(psutil.Error):
                roots.append(psutil.Process(int(arg)))
    # End of file without a release: the owner is gone.
    if lock_fd >= 0:
        with contextlib.suppress(OSError):
            os.ftruncate(lock_fd, 0)  # the folder is ours until all is stopped
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    stop_marked(token, roots, grace_s)
    if run_dir:
        with contextlib.suppress(OSError):  # the folder may be gone
            record_owner_gone(Path(run_dir), token.partition("-")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
