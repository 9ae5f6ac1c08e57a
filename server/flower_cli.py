"""Flower's command-line tools, run for a deployed or simulated run.

Every Flower process of ours gets its executable from this installation
(:func:`flower_tool`) and the environment of :func:`flwr_env` (an own
FLWR_HOME, offline, no telemetry). ``flwr`` reaches the SuperLink through a
FLWR_HOME of the run's own whose ``deploy`` connection points at it
(:func:`cli_home`); through it we register node keys, submit the run's app
(:func:`write_app`: a two-line Flower app naming the installed
``server.app:app`` and ``client.app:app``, so the same apps run in simulation
and deployment; a simulation with attackers names its own ClientApp), stream
the run's log, and ask for the connected nodes and a run's status.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from protocols.durable import atomic_write_bytes
from protocols.run_folder import RUN_DIR_KEY, RunFolder
from server.certificates import TlsFiles
from server.processes import DeployError

__all__ = [
    "CLIENT_APP",
    "cli_home",
    "connected_nodes",
    "flower_run_status",
    "flower_tool",
    "flwr_env",
    "register_node_keys",
    "stream_run_log",
    "submit_run",
    "write_app",
]

_APP_PYPROJECT = """[build-system]
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
clientapp = "{clientapp}"

[tool.flwr.app.config]
run-dir = ""
resume = false
simulation = false
"""


CLIENT_APP = "client.app:app"
"""The ClientApp of every deployed run and of an honest simulation."""


def write_app(run_dir: Path, clientapp: str = CLIENT_APP) -> Path:
    """The Flower app folder that ``flwr run`` submits for this run.

    ``clientapp`` is the ``module:attribute`` of the installed ClientApp
    (a simulation with attackers: ``simulation.attacks:app``).

    Raises
    ------
    DeployError
        If ``clientapp`` is not of the form ``module.path:attribute``.
    """
    module, _, attribute = clientapp.partition(":")
    parts = [*module.split("."), attribute]
    if not all(part.isidentifier() for part in parts):
        raise DeployError(
            f"not a ClientApp reference (module:attribute): {clientapp!r}"
        )
    app = RunFolder(run_dir).app_dir
    app.mkdir(parents=True, exist_ok=True)
    text = _APP_PYPROJECT.replace("{clientapp}", clientapp)
    atomic_write_bytes(app / "pyproject.toml", text.encode())
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


def flower_tool(name: str) -> str:
    """The path of Flower's executable ``name``, this environment's first.

    Raises
    ------
    DeployError
        If it is found neither beside this interpreter nor on ``PATH``.
    """
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found: is flwr installed in this environment?")
    return found


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
        [flower_tool("flwr"), *args],
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
    clientapp: str = CLIENT_APP,
) -> int:
    """Submit this run's app with ``flwr run``; return Flower's run id.

    The run folder reaches the apps as the run config key ``run-dir``
    (:data:`~protocols.run_folder.RUN_DIR_KEY`). ``federation_config`` is
    passed as ``--federation-config`` (a simulation's ``SimulationConfig``:
    ``num-supernodes``, ``client-resources-num-cpus``, ...); a run given one
    is a simulation, and the apps learn that as the run config key
    ``simulation`` (all of its nodes exist from the start). ``clientapp``
    names the ClientApp (:func:`write_app`).

    Raises
    ------
    DeployError
        If ``flwr run`` fails or names no run.
    """
    home = cli_home(run_dir, address, tls)
    app = write_app(run_dir, clientapp)
    config = _toml_pairs(
        {
            RUN_DIR_KEY: str(run_dir.resolve()),
            "resume": resume,
            "simulation": federation_config is not None,
        }
    )
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
    the whole log; stop it with :func:`server.processes.stop_process_tree`
    otherwise.
    """
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [flower_tool("flwr"), "log", str(run_id), "deploy", "--stream"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=flwr_env(cli_home(run_dir, address, tls)),
            start_new_session=True,
        )
    finally:
        out.close()


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
