"""Load test of a real SuperLink: large, many-array messages to real SuperNodes.

Our deployment runs Flower's SuperLink with its default in-memory state store
(``server.deploy.start_superlink``: no ``--database``). The SQLite store was
seen to fail with "database is locked" when one message carried many tensors,
and we need no durability from the SuperLink: a restarted SuperLink forgets
its nodes, the client daemon (``client.daemon``) re-joins them, and the run
resumes from our own checkpoints. This module proves that choice under load.

What it does, for one store (``memory`` or ``sqlite``):

1. writes a tiny Flower app (``pyproject.toml`` plus ``loadapp.py``, carried
   in the FAB) into a folder;
2. starts a real ``flower-superlink`` on 127.0.0.1 and ``N`` real
   ``flower-supernode`` processes (insecure, own FLWR_HOME, own process
   group, log files);
3. submits the app with ``flwr run``. Its ServerApp sends every node, for
   ``R`` rounds, one message holding ``A`` float32 arrays totalling ``S`` MiB
   (deterministic content from (seed, round, node index): distinct bytes per
   node, so nothing is deduplicated by Flower's content-addressed objects);
   the ClientApp replies with every array plus one and the sha256 of the
   bytes it received; the ServerApp checks both directions bit for bit
   (:func:`check_reply`) and writes a JSON result file after every round;
4. stops every process (``server.deploy.stop_process_tree``).

The payload helpers and the verifier below are written into ``loadapp.py``
verbatim (``inspect.getsource``), so the unit test checks the very code the
deployed ServerApp runs.

Run from the repository root::

    python -m bench.superlink_load --nodes 4 --arrays 1000 --mb 32 --rounds 3 \
        --store both --out bench/results

It writes ``superlink_load.json`` (raw numbers, machine info; runs of other
sizes already in the file are kept, use ``--fresh`` to start over) and
``superlink_load.md`` (the table), and prints a line per round. Each store
has a deadline (``--timeout``): a store that hangs is recorded as failed with
what its SuperLink logged, and the bench goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from client.daemon import JoinSettings, start_supernode
from server.checkpoints import atomic_write_bytes
from server.deploy import (
    DeployError,
    cli_home,
    flower_run_status,
    flwr_env,
    start_superlink,
    stop_process_tree,
)

__all__ = [
    "STORES",
    "LoadDeployment",
    "LoadSpec",
    "check_reply",
    "expected_reply",
    "make_payload",
    "payload_digest",
    "run_load",
    "write_load_app",
]

REPO = Path(__file__).resolve().parents[1]
STORES = ("memory", "sqlite")
RESULT_NAME = "superlink_load"

# ------------------------------------------------------------------ payload
# These four functions are copied into the app's ``loadapp.py``: they may use
# only numpy, hashlib and each other.


def make_payload(
    seed: int, server_round: int, node_index: int, n_arrays: int, mib: float
) -> list[np.ndarray]:
    """The arrays the server sends one node in one round.

    Parameters
    ----------
    seed : int
        Run seed.
    server_round : int
        1-based round.
    node_index : int
        Position of the node among the sorted node ids (content differs per
        node, so Flower cannot deduplicate the objects).
    n_arrays : int
        Number of arrays, at least 1.
    mib : float
        Total size in MiB (2**20 bytes); split as evenly as float32 allows.

    Returns
    -------
    list[np.ndarray]
        ``n_arrays`` 1-D float32 arrays in [0, 1), each at least one element.
    """
    total = max(int(mib * 2**20) // 4, n_arrays)
    rng = np.random.default_rng([seed, server_round, node_index])
    flat = rng.random(total, dtype=np.float32)
    base, extra = divmod(total, n_arrays)
    sizes = [base + (1 if i < extra else 0) for i in range(n_arrays)]
    return np.split(flat, np.cumsum(sizes)[:-1])


def payload_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 (hex) over dtype, shape and bytes of every array, in order."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def expected_reply(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """What the ClientApp returns for ``arrays``: each array plus one (float32)."""
    return [a + np.float32(1.0) for a in arrays]


def check_reply(
    sent: Sequence[np.ndarray],
    reply: Mapping[str, np.ndarray] | None,
    reported_digest: str | None,
) -> str:
    """Verdict on one node's reply: ``"ok"`` or what is wrong with it.

    Parameters
    ----------
    sent : Sequence[np.ndarray]
        The arrays the server sent this node (keys ``"0"``, ``"1"``, ...).
    reply : Mapping[str, np.ndarray] | None
        The reply's arrays by key; ``None`` when no reply came.
    reported_digest : str | None
        :func:`payload_digest` of what the node says it received.

    Returns
    -------
    str
        ``"ok"`` only if the node received exactly ``sent`` (downlink) and
        returned exactly :func:`expected_reply` of it (uplink), bit for bit.
    """
    if reply is None:
        return "missing: no reply"
    if reported_digest != payload_digest(sent):
        return "corrupt downlink: the node's sha256 of what it received differs"
    keys = [str(i) for i in range(len(sent))]
    if sorted(reply) != sorted(keys):
        return f"corrupt uplink: {len(reply)} arrays, expected {len(sent)}"
    want = expected_reply(sent)
    for key, expected in zip(keys, want, strict=True):
        got = reply[key]
        if got.dtype != expected.dtype or got.shape != expected.shape:
            return f"corrupt uplink: array {key} is {got.dtype}{got.shape}"
        if not np.array_equal(got, expected):
            bad = int(np.count_nonzero(got != expected))
            return f"corrupt uplink: array {key} differs in {bad} values"
    return "ok"


# ------------------------------------------------------------------ the app

_APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pollinate-superlink-load"
version = "1.0.0"
description = "Pollinate's SuperLink load test: large many-array echo rounds"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "pollinate"

[tool.flwr.app.components]
serverapp = "loadapp:server"
clientapp = "loadapp:client"

[tool.flwr.app.config]
rounds = 3
arrays = 1000
mib = 32.0
seed = 0
nodes = 4
round-timeout-s = 300.0
join-timeout-s = 120.0
result-path = ""
"""

_APP_HEADER = '''"""Pollinate SuperLink load test app (written by bench/superlink_load.py)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

'''

_APP_BODY = '''

server = ServerApp()
client = ClientApp()


@client.query("echo")
def echo(msg: Message, context: Context) -> Message:
    """Reply with every array plus one and the sha256 of what arrived."""
    record = msg.content["arrays"]
    arrays = [record[str(i)].numpy() for i in range(len(record))]
    digest = payload_digest(arrays)
    content = RecordDict(
        {
            "arrays": ArrayRecord(expected_reply(arrays)),
            "echo": ConfigRecord({"sha256": digest, "pid": os.getpid()}),
        }
    )
    return Message(content, reply_to=msg)


def _write(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def _verdict(sent: list[np.ndarray], reply: Message | None) -> str:
    if reply is None:
        return check_reply(sent, None, None)
    if reply.has_error():
        return f"error reply: {reply.error.reason}"
    try:
        record = reply.content["arrays"]
        arrays = {key: record[key].numpy() for key in record}
        digest = str(reply.content["echo"]["sha256"])
    except (KeyError, ValueError, TypeError) as exc:
        return f"corrupt uplink: unreadable reply ({type(exc).__name__}: {exc})"
    return check_reply(sent, arrays, digest)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Echo rounds; the result file is rewritten after every round."""
    cfg = context.run_config
    path, want = str(cfg["result-path"]), int(cfg["nodes"])
    result: dict = {"done": False, "passed": False, "rounds": [], "error": None}
    deadline = time.monotonic() + float(cfg["join-timeout-s"])
    while len(list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.5)  # nodes join on their own time; nothing to wait on
    nodes = sorted(grid.get_node_ids())
    result["nodes_connected"] = len(nodes)
    _write(path, result)
    if len(nodes) < want:
        result.update(done=True, error=f"{len(nodes)} of {want} nodes joined")
        _write(path, result)
        raise RuntimeError(result["error"])
    for rnd in range(1, int(cfg["rounds"]) + 1):
        sent = {
            node: make_payload(
                int(cfg["seed"]), rnd, i, int(cfg["arrays"]), float(cfg["mib"])
            )
            for i, node in enumerate(nodes)
        }
        msgs = [
            Message(
                RecordDict({"arrays": ArrayRecord(arrays)}),
                dst_node_id=node,
                message_type="query.echo",
            )
            for node, arrays in sent.items()
        ]
        # Flower's message id is the content hash; error replies the SuperLink
        # makes for a lost node come from node 0, so match by reply_to.
        dst = {m.object_id: m.metadata.dst_node_id for m in msgs}
        t0 = time.monotonic()
        replies = grid.send_and_receive(msgs, timeout=float(cfg["round-timeout-s"]))
        seconds = time.monotonic() - t0
        del msgs
        by_node = {dst.get(r.metadata.reply_to_message_id): r for r in replies}
        verdicts = {
            str(node): _verdict(sent[node], by_node.get(node)) for node in nodes
        }
        result["rounds"].append(
            {
                "round": rnd,
                "seconds": seconds,
                "verdicts": verdicts,
                "check_seconds": time.monotonic() - t0 - seconds,
            }
        )
        _write(path, result)
        bad = sorted(set(verdicts.values()) - {"ok"})
        if bad:  # later rounds would only add time to a failed run
            result["error"] = f"round {rnd}: {bad[0]}"
            break
    ok = result["error"] is None
    result.update(done=True, passed=ok)
    _write(path, result)
    if not ok:
        raise RuntimeError(result["error"])
'''


def _app_source() -> str:
    helpers = [make_payload, payload_digest, expected_reply, check_reply]
    body = "\n\n".join(inspect.getsource(f) for f in helpers)
    return _APP_HEADER + "\n" + body + _APP_BODY


def write_load_app(folder: Path) -> Path:
    """Write the load-test Flower app into ``folder``; return it.

    The app is ``pyproject.toml`` (components ``loadapp:server`` and
    ``loadapp:client``, no dependencies) and ``loadapp.py``, which carries
    the payload helpers and :func:`check_reply` of this module verbatim.
    """
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "pyproject.toml", _APP_PYPROJECT.encode())
    atomic_write_bytes(folder / "loadapp.py", _app_source().encode())
    return folder


# ------------------------------------------------------------------ deployment


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


# ------------------------------------------------------------------ CLI


def _machine() -> dict[str, Any]:
    import flwr

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "flwr": flwr.__version__,
        "numpy": np.__version__,
        "git_commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "note": "CPU shared with other work during the run; "
        "timings are this machine's at that time",
    }


def _key(run: Mapping[str, Any]) -> tuple[Any, ...]:
    return (run["store"], run["nodes"], run["arrays"], run["mib"], run["rounds"])


def render(results: Mapping[str, Any]) -> str:
    """The markdown table of every run in ``results``, with notes on failures."""
    lines = [
        "| store | nodes | arrays | MiB per message each way | rounds done "
        "| s per round (median / max) | ms per array and node "
        "| peak RSS MiB: SuperLink / SuperNode | load avg (start / end) | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for run in results["runs"]:
        spr = run.get("seconds_per_round") or {}
        times = f"{spr['median']:.1f} / {spr['max']:.1f}" if spr else "-"
        per_array = (
            f"{1000 * spr['median'] / (run['arrays'] * run['nodes']):.0f}"
            if spr and run["passed"]
            else "-"
        )
        rss = run.get("peak_rss_mib", {})
        link = rss.get("superlink")
        node = max((v for k, v in rss.items() if k.startswith("node")), default=None)
        memory = f"{link or 0:.0f} / {node or 0:.0f}" if link else "-"
        load = (
            f"{run['load_average_at_start'][0]:.1f} / "
            f"{run['load_average_at_end'][0]:.1f}"
            if run.get("load_average_at_start") and run.get("load_average_at_end")
            else "-"
        )
        verdict = "pass" if run["passed"] else f"FAIL: {run.get('error') or '?'}"
        done = len(run.get("round_results", []))
        lines.append(
            f"| {run['store']} | {run['nodes']} | {run['arrays']} | {run['mib']:g} "
            f"| {done}/{run['rounds']} | {times} | {per_array} | {memory} "
            f"| {load} | {verdict} |"
        )
        if not run["passed"]:
            first = (run.get("log_errors") or ["no error in the logs"])[0]
            notes.append(
                f"- {run['store']}, {run['nodes']} nodes x {run['arrays']} arrays "
                f"x {run['mib']:g} MiB ({run.get('date', '?')}): Flower status "
                f"`{run.get('flower_status') or '?'}`; first log error: `{first}`"
            )
    m = results["machine"]
    lines += [
        "",
        f"{m['cpu_count']} CPUs ({m['cpu_model']}), flwr {m['flwr']}; payload "
        "distinct per node and round (no deduplication); a round is one "
        "`Grid.send_and_receive` (server pushes to the SuperLink, nodes pull, "
        "the ClientApp returns every array + 1 and a sha256 of what it got, "
        "nodes push, server pulls; the server polls every 3 s), checked bit "
        "for bit both ways. Peak RSS is the kernel's high-water mark (VmHWM).",
    ]
    if notes:
        lines += ["", "Failures:", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the load test for the chosen stores; write JSON and a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--arrays", type=int, default=1000)
    parser.add_argument("--mb", type=float, default=32.0, help="MiB per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", choices=[*STORES, "both"], default="both")
    parser.add_argument("--round-timeout", type=float, default=300.0, help="s")
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="s per store (0: from rounds)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=None, help="kept run folders")
    parser.add_argument("--fresh", action="store_true", help="drop earlier runs")
    args = parser.parse_args(argv)
    spec = LoadSpec(
        nodes=args.nodes,
        arrays=args.arrays,
        mib=args.mb,
        rounds=args.rounds,
        seed=args.seed,
        round_timeout_s=args.round_timeout,
    )
    timeout = args.timeout or spec.join_timeout_s + spec.rounds * (
        spec.round_timeout_s + 60.0
    )
    stores = list(STORES) if args.store == "both" else [args.store]
    out_json = args.out / f"{RESULT_NAME}.json"
    results: dict[str, Any] = {"benchmark": RESULT_NAME, "runs": []}
    if out_json.exists() and not args.fresh:
        results = json.loads(out_json.read_text())
    results["machine"] = _machine()
    with tempfile.TemporaryDirectory(prefix="superlink-load-") as tmp:
        root = args.work or Path(tmp)
        for store in stores:
            work = root / f"{store}-{spec.nodes}n-{spec.arrays}a-{spec.mib:g}m"
            date = datetime.now(UTC).isoformat(timespec="seconds")
            load = os.getloadavg()
            run = run_load(spec, store, work, timeout_s=timeout)
            run.update(
                date=date,
                load_average_at_start=load,
                load_average_at_end=os.getloadavg(),
            )
            results["runs"] = [r for r in results["runs"] if _key(r) != _key(run)]
            results["runs"].append(run)
            args.out.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=1))
    results["runs"].sort(key=lambda r: (r["nodes"], r["mib"], r["arrays"], r["store"]))
    out_json.write_text(json.dumps(results, indent=1))
    table = render(results)
    (args.out / f"{RESULT_NAME}.md").write_text(table)
    print(table)
    return (
        0 if all(r["passed"] for r in results["runs"] if r["store"] == "memory") else 1
    )


if __name__ == "__main__":
    sys.exit(main())
