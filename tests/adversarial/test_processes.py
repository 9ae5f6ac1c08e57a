"""One engine per run folder, and no engine outlives its owner.

A run folder is locked by the process that owns it (``.lock``, an ``flock``
naming the pid): a second ``resume``/``simulate``/ServerApp on it is refused
in one line naming that pid, before it writes anything. The lock dies with
its owner, so a resume after a kill works. ``pollinate simulate`` keeps a
watchdog that shares the lock and, when the owner dies without cleaning up
(SIGKILL, SIGTERM), stops the SuperLink and everything under it (detached
sessions and Ray included), and only then lets the lock go.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from cli.main import main
from protocols.run_folder import RunFolder, RunFolderLocked
from server.app import HOLD_ENV
from server.config import config_to_toml, load_config
from simulation.watchdog import OWNER_ENV
from tests.conftest import REPO_ROOT, clean_env, small_run_args, wait_until

# Holds the run folder's lock until its stdin closes (or it is killed).
HOLDER = """
import sys
from protocols.run_folder import RunFolder
with RunFolder(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.read()
"""

# An owner as the launcher is one: lock, watchdog, one process marked with the
# owner's token (a new session, as Flower's SuperExec) and one registered by
# pid that ignores SIGTERM (as a stuck worker); then it waits.
OWNER = """
import os, subprocess, sys
from protocols.run_folder import RunFolder
from simulation.watchdog import Watchdog
with RunFolder(sys.argv[1]).lock() as fd:
    dog = Watchdog(fd, grace_s=2.0, run_dir=sys.argv[1])
    sleep = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                              env={**os.environ, **dog.env()}, start_new_session=True)
    watched = subprocess.Popen([sys.executable, "-c", sleep], start_new_session=True)
    dog.watch(watched.pid)
    print(dog.pid, marked.pid, watched.pid, flush=True)
    sys.stdin.read()
"""


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        env=clean_env(REPO_ROOT),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _kill(pids: list[int]) -> None:
    """Leave nothing of ours behind, whatever the test's outcome."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture()
def stopped_run(tmp_path: Path) -> RunFolder:
    """A run stopped after round 1, with a valid checkpoint."""
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    config = load_config(None, {"model.name": "tiny-llama", "run.rounds": 2})
    folder.config.write_text(config_to_toml(config))
    folder.write_checkpoint(1, "f" * 16, {"ledger": "[]"}, {"w": torch.ones(3)})
    folder.write_status("stopped", reason="test")
    return folder


@pytest.fixture()
def holder(stopped_run: RunFolder) -> Iterator[subprocess.Popen[str]]:
    """Another process that owns ``stopped_run``."""
    proc = _spawn(HOLDER, str(stopped_run.path))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    yield proc
    _kill([proc.pid])
    proc.wait()


def test_a_second_engine_on_a_locked_folder_is_refused_naming_the_pid(
    stopped_run: RunFolder,
    holder: subprocess.Popen[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``pollinate resume``, the launcher and the ServerApp all refuse a folder
    another live process owns, naming its pid, and write nothing to it."""
    from server.app import run_server
    from simulation import launch

    before = sorted(p.name for p in stopped_run.path.iterdir())
    status = stopped_run.status_file.read_bytes()
    assert stopped_run.locked_by() == holder.pid
    assert main(["resume", str(stopped_run.path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"pid {holder.pid}" in err and "Traceback" not in err, err
    with pytest.raises(RunFolderLocked, match=f"pid {holder.pid}"):
        launch(stopped_run.path, rounds=2, resume=True)
    config = load_config(stopped_run.config)
    with pytest.raises(RunFolderLocked, match=f"pid {holder.pid}"):
        run_server(None, config, stopped_run, resume=True)  # type: ignore[arg-type]
    assert sorted(p.name for p in stopped_run.path.iterdir()) == before
    assert stopped_run.status_file.read_bytes() == status


@pytest.mark.parametrize("how", ["SIGKILL", "exit"])
def test_the_lock_dies_with_its_owner(
    stopped_run: RunFolder, holder: subprocess.Popen[str], how: str
) -> None:
    """However the owner ends (killed, or a clean exit), the folder is free the
    moment it is gone, so a resume after a crash is not refused."""
    if how == "SIGKILL":
        holder.kill()
    else:
        assert holder.stdin is not None
        holder.stdin.close()
    holder.wait()
    assert stopped_run.locked_by() is None
    with stopped_run.lock():
        assert stopped_run.locked_by() == os.getpid()
    assert stopped_run.locked_by() is None


def _kill_owner(folder: RunFolder, sig: signal.Signals) -> int:
    """Start an owner of ``folder``, kill it with ``sig``, wait for its
    watchdog to finish; the owner's pid."""
    owner = _spawn(OWNER, str(folder.path))
    assert owner.stdout is not None
    dog, marked, watched = (int(x) for x in owner.stdout.readline().split())
    try:
        assert folder.locked_by() == owner.pid
        os.kill(owner.pid, sig)
        owner.wait()
        # The stubborn child keeps it busy for the SIGTERM grace period.
        wait_until(lambda: folder.locked_by() == dog, 30, "the watchdog's lock")
        wait_until(
            lambda: not any(_alive(p) for p in (dog, marked, watched)),
            60,
            "the watchdog to stop the owner's processes and exit",
        )
        assert folder.locked_by() is None
    finally:
        _kill([owner.pid, dog, marked, watched])
        owner.wait()
    return owner.pid


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["KILL", "TERM"])
def test_the_watchdog_stops_everything_when_the_owner_dies(
    stopped_run: RunFolder, sig: signal.Signals
) -> None:
    """Killing the owner leaves neither its marked processes (other sessions,
    re-parented) nor its registered ones (even one ignoring SIGTERM); the
    watchdog holds the folder's lock, under its own pid, until they are gone.
    A run that had already ended keeps its own record."""
    before = stopped_run.status_file.read_bytes()
    _kill_owner(stopped_run, sig)
    assert stopped_run.status_file.read_bytes() == before


@pytest.mark.parametrize("state", ["running", "resuming"])
def test_a_run_whose_owner_was_killed_is_recorded_as_stopped(
    stopped_run: RunFolder, state: str
) -> None:
    """The killed owner wrote no end and its ServerApp was stopped mid-round:
    the watchdog records ``stopped``, naming the owner, keeping the other
    fields; ``pollinate resume`` then continues the run.

    Breaks if the record stayed ``running``: every reader (status, a watch,
    a dashboard) would show a dead run as alive."""
    stopped_run.write_status(state, rounds_planned=2)
    owner = _kill_owner(stopped_run, signal.SIGKILL)
    status = stopped_run.read_status()
    assert status.state == "stopped"
    assert status.fields["rounds_planned"] == 2
    assert f"pid {owner}" in status.fields["reason"]
    assert "killed" in status.fields["reason"]


def _engine(parent: int) -> list[psutil.Process]:
    """The processes of the simulation ``parent`` owns: its tree and its mark."""
    procs: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        procs.update({p.pid: p for p in psutil.Process(parent).children(True)})
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(OWNER_ENV, "").startswith(f"{parent}-"):
                procs[proc.pid] = proc
    return [p for p in procs.values() if p.pid != parent]


def _rounds(folder: Path) -> list[int]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line)["round"] for line in lines if line.endswith("}")]


@pytest.mark.long
@pytest.mark.integration
def test_sigkill_of_pollinate_simulate_leaves_no_engine_and_resume_works(
    tmp_path: Path,
) -> None:
    """SIGKILL of a running ``pollinate simulate`` (after round 1) takes down
    the SuperLink, SuperExec, flwr-simulation and Ray; the folder is free
    then, and ``pollinate resume`` finishes the run.

    Breaks if an engine process survives its owner (it would keep writing to
    the run folder and a resume would run a second engine on it)."""
    out = tmp_path / "out"
    args = small_run_args(out, rounds=3)
    parent = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO_ROOT,
        # The ServerApp hangs after round 1, so the kill always lands mid-run.
        env={**clean_env(REPO_ROOT), HOLD_ENV: "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    seen: list[psutil.Process] = []
    try:
        wait_until(lambda: any(out.glob("*/metrics.jsonl")), 300, "the run to start")
        (run_dir,) = [p.parent for p in out.glob("*/metrics.jsonl")]
        wait_until(lambda: 1 in _rounds(run_dir), 300, "round 1")
        seen = _engine(parent.pid)
        names = " ".join(" ".join(p.cmdline()) for p in seen)
        assert "flwr-simulation" in names and "flower-superlink" in names
        parent.kill()
        parent.wait()
        wait_until(
            lambda: (
                not any(p.is_running() and _alive(p.pid) for p in seen)
                and not _engine(parent.pid)
            ),
            120,
            "every engine process to stop",
        )
        assert RunFolder(run_dir).locked_by() is None
        assert RunFolder(run_dir).read_status().state == "stopped"
        assert main(["resume", str(run_dir)]) == 0
        assert _rounds(run_dir)[-1] == 3
    finally:
        _kill([parent.pid, *(p.pid for p in seen if p.is_running())])
        parent.wait()
