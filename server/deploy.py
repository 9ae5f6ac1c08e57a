"""Running a federation server for real: Flower's SuperLink, owned and watched.

``pollinate server start`` prepares a run folder (:func:`prepare_server_run`),
starts ``flower-superlink`` (its own process group, state in memory, no
per-run dependency install, TLS unless told ``--insecure``, optional node
authentication), and submits the run through Flower's CLI
(:mod:`server.flower_cli`).

Flower serves Fleet, Control and Runtime on one port, so a served run
(:func:`start_server`) binds the SuperLink to 127.0.0.1 only and puts the
fleet gateway (:mod:`server.gateway`, Fleet API only) on the public address:
registering node keys, submitting, listing and stopping runs are possible
from the server machine alone. ``server.json`` in the run folder records
both PIDs, both addresses and the Flower run id (:class:`ServerInfo`);
``status``, ``stop`` and ``resume`` work from it. Waiting for, checking and
stopping the processes is :mod:`server.processes`'s work; the TLS files and
their check are :mod:`server.certificates`'s.
"""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import get_type_hints

from corpora import write_jsonl
from models import prepare_model
from protocols.durable import atomic_write_bytes
from protocols.run_folder import RunFolder, RunFolderError
from server.certificates import TlsFiles, check_loopback_certificate
from server.config import RunConfig, config_to_toml
from server.flower_cli import flower_tool, flwr_env
from server.processes import (
    DeployError,
    free_loopback_port,
    process_has_argument,
    stop_process_tree,
    wait_for_port,
)
from server.run_data import load_run_data

__all__ = [
    "ServerInfo",
    "prepare_server_run",
    "read_server_info",
    "start_gateway",
    "start_server",
    "start_superlink",
    "stop_server",
    "write_server_info",
]

log = logging.getLogger(__name__)

_GATEWAY_MODULE = "server.gateway"

# Flower 1.42 still has gRPC Control and Fleet servers (default 0.0.0.0:9093
# and :9092) that these variables switch on: never let the environment do so.
_NO_LEGACY_GRPC = {
    "FLWR_INTERNAL_GRPC_CONTROL_API": "0",
    "FLWR_INTERNAL_GRPC_FLEET_API": "0",
}


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
    header_timeout_s : float | None
        The gateway's deadline for a request's line and headers, s
        (``None``: the gateway's default).
    max_connections_per_peer : int | None
        The gateway's cap on open connections from one address (``None``:
        the gateway's default).
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
    header_timeout_s: float | None = None
    max_connections_per_peer: int | None = None

    def __post_init__(self) -> None:
        bounds = {
            "header_timeout_s": self.header_timeout_s,
            "max_connections_per_peer": self.max_connections_per_peer,
        }
        for name, value in bounds.items():
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    @property
    def control_address(self) -> str:
        """Where the operator's ``flwr`` reaches the SuperLink (loopback only)."""
        if self.superlink_port is None:
            return self.address
        return f"127.0.0.1:{self.superlink_port}"


def prepare_server_run(config: RunConfig, run_dir: Path) -> Path:
    """A run folder for a deployed server: config and the held-out set only.

    Clients hold their own data in deployment; the server keeps the held-out
    examples of ``data.source`` for central evaluation. The config written is
    resolved by that data (:func:`server.run_data.load_run_data`).
    """
    data = load_run_data(config)
    if data.heldout_groups:
        log.warning(
            "held-out groups %s: evaluated on, but the devices' own data decides "
            "what they train on",
            list(data.heldout_groups),
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run_dir)
    write_jsonl(data.evaluation, folder.eval_data)
    atomic_write_bytes(folder.config, config_to_toml(data.config).encode())
    prepare_model(config.model.name)
    return run_dir


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
    output reaches the SuperLink, not this log (see
    :func:`server.flower_cli.stream_run_log`).

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
        flower_tool("flower-superlink"),
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


def start_gateway(
    run_dir: Path,
    host: str,
    port: int,
    *,
    upstream_port: int,
    tls: TlsFiles | None,
    watch_pid: int,
    header_timeout_s: float | None = None,
    max_connections_per_peer: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start the fleet gateway (:mod:`server.gateway`) in its own process group.

    It listens on ``host:port``, forwards the Fleet API only to the SuperLink
    on ``127.0.0.1:upstream_port`` and exits once ``watch_pid`` (the
    SuperLink) is gone. Its log is appended to the run's SuperLink log.
    ``header_timeout_s`` and ``max_connections_per_peer`` bound slow and
    greedy clients (``None``: the gateway's defaults).

    Raises
    ------
    DeployError
        If it does not come up (the port is taken, say).
    """
    cmd = [
        sys.executable,
        "-P",  # the installed ``server``, never one in the working directory
        "-m",
        _GATEWAY_MODULE,
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
    if header_timeout_s is not None:
        cmd += ["--header-timeout-s", repr(float(header_timeout_s))]
    if max_connections_per_peer is not None:
        cmd += ["--max-connections-per-peer", str(max_connections_per_peer)]
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
    return process_has_argument(pid, _GATEWAY_MODULE)


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
        check_loopback_certificate(tls)
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
            header_timeout_s=info.header_timeout_s,
            max_connections_per_peer=info.max_connections_per_peer,
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
    except (TypeError, ValueError) as exc:
        raise DeployError(f"{folder.server_info} is damaged: {exc}") from None
    types = get_type_hints(ServerInfo)  # e.g. ``int | None``: isinstance-able
    for name, value in asdict(info).items():
        if not isinstance(value, types[name]) or isinstance(value, bool):
            raise DeployError(f"{folder.server_info} is damaged: {name} is {value!r}")
    return info
