"""A real SuperLink, its SuperNodes and one submitted load run, owned and stopped here.

:class:`LoadSpec` is one test's size; :class:`LoadDeployment` starts the
processes (``server.deploy.start_superlink``, ``client.daemon.start_supernode``),
submits the app with ``flwr run``, samples memory and stops everything;
:func:`run_load` runs one test end to end and returns its record.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.superlink_load.app import write_load_app
from client.daemon import JoinSettings, start_supernode
from server.deploy import start_superlink
from server.flower_cli import cli_home, flower_run_status, flwr_env
from server.processes import DeployError, stop_process_tree

STORES = ("memory", "sqlite")


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load test's size.

    Attributes
    ----------
    nodes : int
        SuperNodes started (and replies expected per round).
    arrays : int
        Arrays per message.
    mib : float
        MiB per message, each way (per node).
    rounds : int
        Echo rounds.
    seed : int
        Payload seed.
    round_timeout_s : float
        ``Grid.send_and_receive`` timeout per round, s.
    join_timeout_s : float
        How long the ServerApp waits for all nodes to join, s.
    """

    nodes: int = 4
    arrays: int = 1000
    mib: float = 32.0
    rounds: int = 3
    seed: int = 0
    round_timeout_s: float = 300.0
    join_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("nodes", "arrays", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.mib > 0:
            raise ValueError(f"mib must be > 0, got {self.mib}")

    def run_config(self, result_path: Path) -> str:
        """The ``flwr run --run-config`` string for this size."""
        return (
            f"rounds={self.rounds} arrays={self.arrays} mib={float(self.mib)} "
            f"seed={self.seed} nodes={self.nodes} "
            f"round-timeout-s={float(self.round_timeout_s)} "
            f"join-timeout-s={float(self.join_timeout_s)} "
            f'result-path="{result_path.resolve()}"'
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss_mib(proc: psutil.Process) -> float | None:
    """The kernel's resident high-water mark (VmHWM) of ``proc``, MiB."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


class LoadDeployment:
    """A SuperLink, its SuperNodes and one submitted load run, all owned here.

    Use as a context manager (``stop`` runs on exit, whatever happened):
    ``start()``, ``submit()``, then poll ``finished()`` (it also samples
    memory) until it holds or a deadline passes; ``progress()``,
    ``flower_status()`` and ``log_errors()`` then say what happened.

    Parameters
    ----------
    spec : LoadSpec
        Size of the test.
    store : str
        ``"memory"`` (``server.deploy.start_superlink``, as deployed) or
        ``"sqlite"`` (the same flags plus ``--database``).
    work_dir : Path
        Logs, FLWR_HOMEs, the app and the result file go here.
    port : Callable[[], int]
        Gives a free port on 127.0.0.1 (tests pass their own helper).
    """

    def __init__(
        self,
        spec: LoadSpec,
        store: str,
        work_dir: Path,
        *,
        port: Callable[[], int] = _free_port,
    ) -> None:
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES}, got {store!r}")
        self.spec, self.store, self.work_dir = spec, store, work_dir
        self._port = port
        self.address = ""
        self._addresses: list[str] = []  # 127.0.0.1:PORT of every server we start
        self.result_path = work_dir / "result.json"
        self.superlink: subprocess.Popen[bytes] | None = None
        self.nodes: list[subprocess.Popen[bytes]] = []
        self.run_id: int | None = None
        self.peak_rss_mib: dict[str, float] = {}
        self._serverapp_seen = False
        self._serverapp_gone_at: float | None = None

    def __enter__(self) -> LoadDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink and the SuperNodes (the nodes join on their own).

        Raises
        ------
        DeployError
            If the SuperLink does not come up.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        port = self._port()
        self.address = f"127.0.0.1:{port}"
        self._addresses.append(self.address)
        database = self.work_dir / "state.db" if self.store == "sqlite" else None
        self.superlink = start_superlink(
            self.work_dir, "127.0.0.1", port, tls=None, auth=False, database=database
        )
        for i in range(self.spec.nodes):
            settings = JoinSettings(
                server=self.address,
                data=self.work_dir / "no-data",
                label=f"load{i}",
                insecure=True,
                state_dir=self.work_dir / f"node{i}",
                local_port=self._port(),
            )
            self._addresses.append(f"127.0.0.1:{settings.local_port}")
            self.nodes.append(start_supernode(settings))

    def submit(self) -> int:
        """Write the app and submit it with ``flwr run``; return the run id.

        Raises
        ------
        DeployError
            If ``flwr run`` fails or gives no run id.
        """
        app = write_load_app(self.work_dir / "app")
        out = subprocess.run(
            [
                str(Path(sys.executable).parent / "flwr"),
                "run",
                str(app),
                "deploy",
                "--run-config",
                self.spec.run_config(self.result_path),
                "--format",
                "json",
            ],
            env=flwr_env(cli_home(self.work_dir, self.address, None)),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        text = out.stdout
        try:
            payload = json.loads(text[text.find("{") :]) if "{" in text else {}
        except json.JSONDecodeError:
            payload = {}
        if out.returncode != 0 or not payload.get("run-id"):
            raise DeployError(f"flwr run failed: {text[-800:]}{out.stderr[-800:]}")
        self.run_id = int(payload["run-id"])
        return self.run_id

    def progress(self) -> dict[str, Any] | None:
        """The ServerApp's result file as it stands (``None`` before the first)."""
        try:
            return dict(json.loads(self.result_path.read_text()))
        except (OSError, json.JSONDecodeError):
            return None

    def sample(self) -> None:
        """Record the peak resident memory of the SuperLink and the SuperNodes."""
        procs = {"superlink": self.superlink}
        procs.update({f"node{i}": p for i, p in enumerate(self.nodes)})
        for name, proc in procs.items():
            if proc is None or proc.poll() is not None:
                continue
            try:
                ps = psutil.Process(proc.pid)
                rss = ps.memory_info().rss / 2**20
            except psutil.Error:
                continue
            peak = max(rss, _peak_rss_mib(ps) or 0.0)
            self.peak_rss_mib[name] = max(self.peak_rss_mib.get(name, 0.0), peak)

    def owned_processes(self) -> list[psutil.Process]:
        """Every live process of this deployment, found by its addresses.

        The SuperLink and SuperNode start their SuperExec in sessions of
        their own, and a SuperExec that crashes leaves its ServerApp or
        ClientApp re-parented out of the tree; every one of them names a
        ``127.0.0.1:PORT`` of ours on its command line, so none is missed.
        """
        ours = {p.pid for p in (self.superlink, *self.nodes) if p is not None}
        found: list[psutil.Process] = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = proc.info["cmdline"] or []
            if proc.info["pid"] in ours or (
                any(t.endswith(a) for t in cmd for a in self._addresses)
                and any("flwr" in t or "flower" in t for t in cmd[:3])
            ):
                with contextlib.suppress(psutil.Error):
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        found.append(proc)
        return found

    def _serverapp_alive(self) -> bool:
        for proc in self.owned_processes():
            try:
                if any("flwr-serverapp" in t for t in proc.cmdline()[:3]):
                    return True
            except psutil.Error:
                continue
        return False

    def finished(self) -> bool:
        """Whether the run is over.

        It is when the result file says done, the SuperLink died, or the
        ServerApp process ended (given 10 s to write its file).
        """
        self.sample()
        result = self.progress()
        if result is not None and result.get("done"):
            return True
        if self.superlink is None or self.superlink.poll() is not None:
            return True
        if self._serverapp_alive():
            self._serverapp_seen, self._serverapp_gone_at = True, None
        elif self._serverapp_seen:
            now = time.monotonic()
            self._serverapp_gone_at = self._serverapp_gone_at or now
            return now - self._serverapp_gone_at > 10.0
        return False

    def flower_status(self, settle_s: float = 60.0) -> str:
        """Flower's status of the run (``finished:completed`` when it passed).

        The ServerApp writes its last result just before it returns, so the
        SuperLink may still say ``running`` for a moment: asked again until
        the status is final or ``settle_s`` passed.
        """
        if self.run_id is None or self.superlink is None:
            return ""
        deadline = time.monotonic() + settle_s
        while True:
            if self.superlink.poll() is not None:
                return f"superlink exited with {self.superlink.returncode}"
            status = flower_run_status(self.work_dir, self.address, None, self.run_id)
            if status.startswith("finished") or time.monotonic() > deadline:
                return status
            time.sleep(1.0)  # polling another process's state

    def log_errors(self, limit: int = 5) -> list[str]:
        """Distinct error lines from the SuperLink's and SuperNodes' logs."""
        logs = [self.work_dir / "superlink.log"]
        logs += sorted(self.work_dir.glob("node*/supernode.log"))
        pattern = re.compile(r"\b(ERROR|CRITICAL)\b|locked|Traceback|Exception")
        ansi = re.compile(r"\x1b\[[0-9;]*m")
        seen: dict[str, None] = {}
        for log in logs:
            try:
                lines = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                line = ansi.sub("", line).strip()
                if pattern.search(line):
                    seen.setdefault(f"{log.relative_to(self.work_dir)}: {line[:300]}")
        return list(seen)[:limit]

    def stop(self) -> None:
        """Stop every process this deployment started (idempotent).

        SuperNodes first (their ClientApps with them), then the SuperLink's
        tree, then anything of ours left outside those trees.
        """
        for proc in [*self.nodes, self.superlink]:
            if proc is not None:
                stop_process_tree(proc.pid, grace_s=5.0)
                proc.poll()
        for left in self.owned_processes():
            stop_process_tree(left.pid, grace_s=5.0)


def run_load(
    spec: LoadSpec,
    store: str,
    work_dir: Path,
    *,
    timeout_s: float,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run one load test end to end and return its record.

    A failed run does not raise: the failure is the record.

    Parameters
    ----------
    spec : LoadSpec
        Size of the test.
    store : str
        ``"memory"`` or ``"sqlite"``.
    work_dir : Path
        Folder for this run's processes and files (created).
    timeout_s : float
        Deadline for the whole run after submission, s; a run still going
        then is recorded as timed out and stopped.
    say : Callable[[str], None]
        Progress lines (one per round).

    Returns
    -------
    dict[str, Any]
        ``store``, the spec's fields, ``passed``, ``round_results`` (seconds
        and per-node verdicts per round), ``seconds_per_round`` (median,
        max), ``peak_rss_mib``, ``flower_status``, ``error`` and
        ``log_errors``.
    """
    record: dict[str, Any] = {"store": store, **asdict(spec), "passed": False}
    started = time.monotonic()
    with LoadDeployment(spec, store, work_dir) as dep:
        try:
            dep.start()
            record["run_id"] = dep.submit()
            say(f"[{store}] run {dep.run_id} submitted to {dep.address}")
            deadline, reported = time.monotonic() + timeout_s, 0
            news = time.monotonic()
            while True:
                over = dep.finished()
                result = dep.progress() or {}
                for rnd in result.get("rounds", [])[reported:]:
                    ok = sum(v == "ok" for v in rnd["verdicts"].values())
                    say(
                        f"[{store}] round {rnd['round']}: {rnd['seconds']:.1f} s, "
                        f"{ok}/{len(rnd['verdicts'])} replies intact"
                    )
                    reported, news = reported + 1, time.monotonic()
                if time.monotonic() - news > 60.0:
                    news = time.monotonic()
                    say(f"[{store}] round {reported + 1} still running")
                if over:
                    break
                if time.monotonic() > deadline:
                    record["error"] = f"timed out after {timeout_s:.0f} s"
                    break
                time.sleep(1.0)  # polling another process's progress file
            record["flower_status"] = dep.flower_status(
                settle_s=5.0 if record.get("error") else 60.0
            )
        except (DeployError, subprocess.TimeoutExpired) as exc:
            result = dep.progress() or {}
            record["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            dep.sample()
            record["log_errors"] = dep.log_errors()
            dep.stop()
    record["peak_rss_mib"] = {k: round(v, 1) for k, v in dep.peak_rss_mib.items()}
    record["round_results"] = result.get("rounds", [])
    record["nodes_connected"] = result.get("nodes_connected")
    record["error"] = record.get("error") or result.get("error")
    if not record["error"] and not result.get("done"):
        record["error"] = (
            f"the run ended without a result (Flower: {record.get('flower_status')})"
        )
    seconds = [r["seconds"] for r in record["round_results"]]
    record["seconds_per_round"] = (
        {"median": statistics.median(seconds), "max": max(seconds)} if seconds else {}
    )
    record["passed"] = bool(
        result.get("passed")
        and len(record["round_results"]) == spec.rounds
        and record.get("flower_status") == "finished:completed"
    )
    record["wall_seconds"] = time.monotonic() - started
    say(
        f"[{store}] {'PASSED' if record['passed'] else 'FAILED'} {record['error'] or ''}"
    )
    return record
