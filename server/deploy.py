"""Running a federation server for real: Flower's SuperLink, owned and watched.

``pollinate server start`` prepares a run folder, starts ``flower-superlink``
(its own process group, state in memory, no per-run dependency install, TLS
unless told ``--insecure``, optional node authentication), and submits the
run with ``flwr run``. The app it submits is a two-line Flower app
(``<run>/app/pyproject.toml``) naming this installation's ``server.app:app``
and ``client.app:app``, so the same apps run in simulation and deployment.

Flower serves Fleet, Control and Runtime on one port, so a served run
(:func:`start_server`) binds the SuperLink to 127.0.0.1 only and puts the
fleet gateway (:mod:`server.gateway`, Fleet API only) on the public address:
registering node keys, submitting, listing and stopping runs are possible
from the server machine alone. ``server.json`` in the run folder records
both PIDs, both addresses and the Flower run id; ``status``, ``stop`` and
``resume`` work from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import get_type_hints

import psutil
from cryptography import x509

from corpora import load_examples, split_holdout, write_jsonl
from models import prepare_model
from protocols.durable import atomic_write_bytes
from protocols.run_folder import RUN_DIR_KEY, RunFolder, RunFolderError
from server.config import RunConfig, config_to_toml

__all__ = [
    "DeployError",
    "ServerInfo",
    "TlsFiles",
    "cli_home",
    "connected_nodes",
    "flower_run_status",
    "flwr_env",
    "free_loopback_port",
    "prepare_server_run",
    "process_alive",
    "read_server_info",
    "register_node_keys",
    "start_superlink",
    "start_gateway",
    "start_server",
    "stop_process_tree",
    "stop_server",
    "stream_run_log",
    "submit_run",
    "wait_for_port",
    "write_app",
    "write_server_info",
]

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pollinate-run"
version = "1.0.0"
description = "A Pollinate run: the installed server.app and client.app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "pollinate"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
run-dir = ""
resume = false
"""


# Flower 1.42 still has gRPC Control and Fleet servers (default 0.0.0.0:9093
# and :9092) that these variables switch on: never let the environment do so.
_NO_LEGACY_GRPC = {
    "FLWR_INTERNAL_GRPC_CONTROL_API": "0",
    "FLWR_INTERNAL_GRPC_FLEET_API": "0",
}


class DeployError(RuntimeError):
    """A deployment process could not be started, reached or stopped."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for the SuperLink's TLS (see ``pollinate certs``)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TlsFiles:
        """The files ``pollinate certs FOLDER`` writes.

        Raises
        ------
        DeployError
            If one is missing.
        """
        files = cls(folder / "ca.crt", folder / "server.crt", folder / "server.key")
        for path in (files.ca_cert, files.server_cert, files.server_key):
            if not path.is_file():
                raise DeployError(
                    f"TLS file missing: {path} (make them with pollinate certs)"
                )
        return files


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What ``server.json`` records about a running federation server.

    Attributes
    ----------
    pid : int
        The SuperLink's PID (-1 before it is started).
    host, port : str, int
        The public address: the fleet gateway listens here.
    address : str
        ``HOST:PORT`` clients connect to (``host``, or 127.0.0.1 for 0.0.0.0).
    certs, auth_keys : str | None
        Folders of ``pollinate certs`` and of the node public keys.
    run_id : int | None
        Flower's id of the submitted run.
    superlink_port : int | None
        The SuperLink's port on 127.0.0.1 (Fleet, Control, Runtime APIs).
        ``None`` in records written before the gateway existed.
    gateway_pid : int | None
        The fleet gateway's PID.
    """

    pid: int
    host: str
    port: int
    address: str
    certs: str | None
    auth_keys: str | None
    run_id: int | None = None
    superlink_port: int | None = None
    gateway_pid: int | None = None

    @property
    def control_address(self) -> str:
        """Where the operator's ``flwr`` reaches the SuperLink (loopback only)."""
        if self.superlink_port is None:
            return self.address
        return f"127.0.0.1:{self.superlink_port}"


def prepare_server_run(config: RunConfig, run_dir: Path) -> Path:
    """A run folder for a deployed server: config and the held-out set only.

    Clients hold their own data in deployment; the server keeps the held-out
    examples of ``data.source`` for central evaluation.
    """
    examples = load_examples(
        config.data.source, limit=config.data.limit, seed=config.run.seed
    )
    _, held_out = split_holdout(examples, config.data.eval_examples, config.run.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run_dir)
    write_jsonl(held_out, folder.eval_data)
    atomic_write_bytes(folder.config, config_to_toml(config).encode())
    prepare_model(config.model.name)
    return run_dir


def write_app(run_dir: Path) -> Path:
    """The Flower app folder that ``flwr run`` submits for this run."""
    app = RunFolder(run_dir).app_dir
    app.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(app / "pyproject.toml", APP_PYPROJECT.encode())
    return app


def flwr_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, offline, our venv first."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found: is flwr installed in this environment?")
    return found


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


def start_superlink(
    run_dir: Path,
    host: str,
    port: int,
    *,
    tls: TlsFiles | None,
    auth: bool,
    database: Path | None = None,
    simulation: bool = False,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink`` for ``run_dir`` in its own process group.

    State lives in memory unless ``database`` names a SQLite file (used by
    ``bench/superlink_load.py`` to compare the two stores). With
    ``simulation`` the SuperLink runs Flower's simulation runtime (no Fleet
    API, no SuperNodes: its SuperExec starts one ``flwr-simulation`` process
    per run, with Ray inside). ``env`` adds variables to the SuperLink's
    environment, which its SuperExec, the ServerApp and (in simulation) Ray's
    workers inherit. Its output goes to the run's SuperLink log; the apps'
    output reaches the SuperLink, not this log (see :func:`stream_run_log`).

    Raises
    ------
    DeployError
        If node authentication is asked without TLS, or it does not come up.
    """
    folder = RunFolder(run_dir)
    if auth and tls is None:
        raise DeployError(
            "node authentication needs TLS (Flower refuses it with --insecure)"
        )
    cmd = [
        _tool("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
            "--ssl-ca-certfile",
            str(tls.ca_cert),
        ]
    if auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    if simulation:
        cmd += ["--simulation", "--isolation", "subprocess"]
    log = folder.superlink_log.open("ab")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**flwr_env(folder.superlink_home), **(env or {}), **_NO_LEGACY_GRPC},
        start_new_session=True,
    )
    log.close()
    wait_for_port(_connect_host(host), port, 60.0, proc)
    return proc


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the SuperLink behind the gateway)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_loopback_certificate(tls: TlsFiles) -> None:
    """Refuse a server certificate that does not name 127.0.0.1.

    The SuperLink listens on 127.0.0.1; the gateway, the SuperLink's own
    SuperExec and the operator's ``flwr`` verify it under that name.

    Raises
    ------
    DeployError
        If the certificate cannot be read or does not cover 127.0.0.1.
    """
    import ipaddress

    try:
        cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise DeployError(f"cannot read {tls.server_cert}: {exc}") from None
    if ipaddress.ip_address("127.0.0.1") not in san.value.get_values_for_type(
        x509.IPAddress
    ):
        raise DeployError(
            f"{tls.server_cert} does not cover 127.0.0.1, where the SuperLink "
            "listens: make certificates with pollinate certs DIR --host 127.0.0.1 "
            "--host <public name or IP>"
        )


def start_gateway(
    run_dir: Path,
    host: str,
    port: int,
    *,
    upstream_port: int,
    tls: TlsFiles | None,
    watch_pid: int,
) -> subprocess.Popen[bytes]:
    """Start the fleet gateway (:mod:`server.gateway`) in its own process group.

    It listens on ``host:port``, forwards the Fleet API only to the SuperLink
    on ``127.0.0.1:upstream_port`` and exits once ``watch_pid`` (the
    SuperLink) is gone. Its log is appended to the run's SuperLink log.

    Raises
    ------
    DeployError
        If it does not come up (the port is taken, say).
    """
    cmd = [
        sys.executable,
        "-P",  # the installed ``server``, never one in the working directory
        "-m",
        "server.gateway",
        "--host",
        host,
        "--port",
        str(port),
        "--upstream-port",
        str(upstream_port),
        "--watch-pid",
        str(watch_pid),
    ]
    if tls is not None:
        cmd += ["--certfile", str(tls.server_cert), "--keyfile", str(tls.server_key)]
        cmd += ["--cafile", str(tls.ca_cert)]
    # Whoever holds the port would pass the readiness check below.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn
        try:
            s.bind((host, port))
        except OSError as exc:
            raise DeployError(f"cannot listen on {host}:{port}: {exc}") from None
    log = RunFolder(run_dir).superlink_log.open("ab")
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log.close()
    try:
        wait_for_port(_connect_host(host), port, 30.0, proc)
    except DeployError as exc:
        stop_process_tree(proc.pid, grace_s=2.0)
        raise DeployError(f"the fleet gateway on {host}:{port}: {exc}") from None
    return proc


def _connect_host(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _is_gateway(pid: int) -> bool:
    """Whether ``pid`` is (still) a fleet gateway, not a reused PID."""
    try:
        return "server.gateway" in psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def start_server(run_dir: Path, info: ServerInfo, *, auth: bool) -> ServerInfo:
    """Start the SuperLink on a free loopback port and the gateway before it.

    A gateway left from an earlier start of this run is stopped first (it
    holds the public port). Returns ``info`` with the new PIDs and SuperLink
    port; nothing is left running if either process fails to start.

    Raises
    ------
    DeployError
        If the certificate does not cover 127.0.0.1, or a process does not
        come up.
    """
    tls = TlsFiles.in_folder(Path(info.certs)) if info.certs else None
    if tls is not None:
        _check_loopback_certificate(tls)
    if info.gateway_pid is not None and _is_gateway(info.gateway_pid):
        stop_process_tree(info.gateway_pid, grace_s=5.0)
    local_port = free_loopback_port()
    superlink = start_superlink(run_dir, "127.0.0.1", local_port, tls=tls, auth=auth)
    try:
        gateway = start_gateway(
            run_dir,
            info.host,
            info.port,
            upstream_port=local_port,
            tls=tls,
            watch_pid=superlink.pid,
        )
    except DeployError:
        stop_process_tree(superlink.pid, grace_s=2.0)
        raise
    return replace(
        info, pid=superlink.pid, superlink_port=local_port, gateway_pid=gateway.pid
    )


def stop_server(info: ServerInfo, grace_s: float = 10.0) -> None:
    """Stop a served run's gateway, then its SuperLink and all it started."""
    if info.gateway_pid is not None and _is_gateway(info.gateway_pid):
        stop_process_tree(info.gateway_pid, grace_s=grace_s)
    stop_process_tree(info.pid, grace_s=grace_s)


def cli_home(run_dir: Path, address: str, tls: TlsFiles | None) -> Path:
    """A FLWR_HOME whose ``deploy`` connection points at our SuperLink."""
    home = RunFolder(run_dir).cli_home
    home.mkdir(parents=True, exist_ok=True)
    security = (
        f'root-certificates = "{tls.ca_cert.resolve()}"' if tls else "insecure = true"
    )
    text = (
        '[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "{address}"\n{security}\n'
    )
    atomic_write_bytes(home / "config.toml", text.encode())
    return home


def _flwr(
    home: Path, *args: str, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [_tool("flwr"), *args],
        env=flwr_env(home),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if out.returncode != 0:
        raise DeployError(
            f"flwr {' '.join(args)} failed: {out.stdout[-800:]}{out.stderr[-800:]}"
        )
    return out


def register_node_keys(
    run_dir: Path, address: str, tls: TlsFiles, keys: list[Path]
) -> None:
    """Register node public keys (``*.pub``, OpenSSH EC) with the SuperLink."""
    home = cli_home(run_dir, address, tls)
    for key in keys:
        _flwr(home, "supernode", "register", str(key), "deploy")


def _toml_pairs(values: Mapping[str, bool | int | float | str]) -> str:
    """``k1=v1 k2=v2`` with TOML values, as ``flwr run`` parses its overrides.

    Raises
    ------
    DeployError
        If a string holds a double quote: Flower's parser of these pairs
        ends a quoted value at the first one, escaped or not.
    """

    def value(v: bool | int | float | str) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            if '"' in v:
                raise DeployError(f"flwr cannot pass a value with a '\"': {v!r}")
            return json.dumps(v)  # a TOML basic string (backslashes escaped)
        return repr(v)

    return " ".join(f"{key}={value(v)}" for key, v in values.items())


def submit_run(
    run_dir: Path,
    address: str,
    tls: TlsFiles | None,
    *,
    resume: bool,
    federation_config: Mapping[str, bool | int | float | str] | None = None,
) -> int:
    """Submit this run's app with ``flwr run``; return Flower's run id.

    The run folder reaches the apps as the run config key ``run-dir``
    (:data:`~protocols.run_folder.RUN_DIR_KEY`). ``federation_config`` is
    passed as ``--federation-config`` (a simulation's ``SimulationConfig``:
    ``num-supernodes``, ``client-resources-num-cpus``, ...).

    Raises
    ------
    DeployError
        If ``flwr run`` fails or names no run.
    """
    home = cli_home(run_dir, address, tls)
    app = write_app(run_dir)
    config = _toml_pairs({RUN_DIR_KEY: str(run_dir.resolve()), "resume": resume})
    args = ["run", str(app), "deploy", "--run-config", config, "--format", "json"]
    if federation_config:
        args += ["--federation-config", _toml_pairs(federation_config)]
    out = _flwr(home, *args)
    text = out.stdout
    start = text.find("{")
    try:
        payload = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    if payload.get("success") and payload.get("run-id"):
        return int(payload["run-id"])
    raise DeployError(f"flwr run gave no run id: {out.stdout[-500:]}")


def stream_run_log(
    run_dir: Path, address: str, tls: TlsFiles | None, run_id: int, log: Path
) -> subprocess.Popen[bytes]:
    """Copy a run's log into ``log`` with ``flwr log RUN_ID --stream``.

    The SuperExec starts the ServerApp (or ``flwr-simulation``) with its
    output discarded; the app uploads its log to the SuperLink, and this is
    how it reaches the run folder. The returned process (its own process
    group) ends by itself once Flower has marked the run finished and sent
    the whole log; stop it with :func:`stop_process_tree` otherwise.
    """
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [_tool("flwr"), "log", str(run_id), "deploy", "--stream"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=flwr_env(cli_home(run_dir, address, tls)),
            start_new_session=True,
        )
    finally:
        out.close()


def write_server_info(run_dir: Path, info: ServerInfo) -> None:
    """Record the running server in the run folder (``server.json``)."""
    folder = RunFolder(run_dir)
    folder.write_record(folder.server_info, asdict(info))


def read_server_info(run_dir: Path) -> ServerInfo | None:
    """The recorded server, or None if this run was never served.

    Raises
    ------
    DeployError
        If the record is damaged (a field missing or of the wrong type).
    """
    folder = RunFolder(run_dir)
    try:
        record = folder.read_record(folder.server_info)
    except RunFolderError as exc:
        raise DeployError(str(exc)) from None
    if record is None:
        return None
    try:
        info = ServerInfo(**record)
    except TypeError as exc:
        raise DeployError(f"{folder.server_info} is damaged: {exc}") from None
    types = get_type_hints(ServerInfo)  # e.g. ``int | None``: isinstance-able
    for name, value in asdict(info).items():
        if not isinstance(value, types[name]) or isinstance(value, bool):
            raise DeployError(f"{folder.server_info} is damaged: {name} is {value!r}")
    return info


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


def connected_nodes(
    run_dir: Path, address: str, tls: TlsFiles | None
) -> list[dict[str, str]]:
    """The SuperLink's nodes as ``flwr supernode ls`` reports them."""
    out = _flwr(
        cli_home(run_dir, address, tls),
        "supernode",
        "ls",
        "deploy",
        "--format",
        "json",
    )
    start = out.stdout.find("{")
    try:
        payload = json.loads(out.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return []
    nodes = payload.get("nodes", payload) if isinstance(payload, dict) else payload
    return [n for n in nodes if isinstance(n, dict)]


def flower_run_status(
    run_dir: Path, address: str, tls: TlsFiles | None, run_id: int
) -> str:
    """Flower's status of a run (e.g. ``running``, ``finished:failed``), or ``""``."""
    try:
        out = _flwr(
            cli_home(run_dir, address, tls),
            "ls",
            "deploy",
            "--run-id",
            str(run_id),
            "--format",
            "json",
            timeout_s=60.0,
        )
    except (DeployError, subprocess.TimeoutExpired):
        return ""
    start = out.stdout.find("{")
    try:
        payload = json.loads(out.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return ""
    runs = payload.get("runs", []) if isinstance(payload, dict) else []
    return str(runs[0].get("status", "")) if runs else ""
