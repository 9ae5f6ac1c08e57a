"""The deployed client: a supervised Flower SuperNode running our ClientApp.

``pollinate client join`` starts ``flower-supernode`` against the server with
this node's data path and label in its node config, and keeps it running: a
SuperNode exits when the server restarts (an in-memory SuperLink forgets its
nodes), so the daemon starts it again with a growing back-off, up to
``max_restarts`` times. Method state lives where it survives a SuperNode's
per-message process: FedKSeed's synced model in snapshot files, everything
else in the messages themselves. SIGINT/SIGTERM stop the SuperNode and the
daemon. Node keys for authenticated federations come from
:func:`make_node_key`.

An edge device (no torch) joins with ``runtime="onnx"``: the node config
then names its edge bundle (``runtime``, ``bundle``), the ClientApp trains
FedKSeed on ONNX Runtime, and the bundle is checked
(:func:`protocols.edge_bundle.read_bundle`) before the SuperNode starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from client.node import RUNTIMES
from protocols.installation import check_installation

__all__ = [
    "RUNTIMES",
    "JoinSettings",
    "check_runtime",
    "edge_methods",
    "make_node_key",
    "run_daemon",
    "start_supernode",
    "supernode_command",
    "supernode_env",
]


@dataclass(frozen=True, slots=True)
class JoinSettings:
    """How this node joins a federation.

    Attributes
    ----------
    server : str
        ``HOST:PORT`` of the SuperLink.
    data : Path
        The node's local examples.
    label : str
        A stable name (orders nodes reproducibly; shown in the server's ledger).
    root_certificates : Path | None
        CA certificate for TLS; ``None`` with ``insecure`` only.
    insecure : bool
        Plaintext (tests and local experiments only).
    auth_key : Path | None
        Private key (OpenSSH EC) registered with the server, when it
        authenticates nodes: the SuperNode authenticates with it, and the
        ClientApp signs its hello with it (node config ``auth-key``), which
        binds ``label`` to the key registered as ``<label>.pub``.
    state_dir : Path
        The SuperNode's FLWR_HOME and local API port file live here.
    local_port : int
        Port of the SuperNode's local ClientApp API (on 127.0.0.1).
    max_restarts : int
        Restarts after an unexpected exit before giving up.
    methods : tuple[str, ...]
        Methods this node accepts (empty: all).
    runtime : str
        One of :data:`RUNTIMES`: ``torch``, or ``onnx`` for the edge client.
    bundle : Path | None
        The edge bundle (``pollinate export --format edge``); with ``onnx`` only.
    lora_rank : int | None
        The LoRA rank this node trains (node config ``lora-rank``, reported
        at hello; the server refuses a rank its run does not allow); None:
        the run's global rank.
    """

    server: str
    data: Path
    label: str
    root_certificates: Path | None = None
    insecure: bool = False
    auth_key: Path | None = None
    state_dir: Path = Path(".pollinate-node")
    local_port: int = 9094
    max_restarts: int = 100
    methods: tuple[str, ...] = ()
    runtime: str = "torch"
    bundle: Path | None = None
    lora_rank: int | None = None


def check_runtime(s: JoinSettings) -> None:
    """Refuse a runtime without what it needs, before any process starts.

    With ``onnx``: the bundle must pass
    :func:`~protocols.edge_bundle.read_bundle` (every file hashed, the walk,
    spec and generator checked) and the node may accept only methods an edge
    client trains.

    Raises
    ------
    ValueError
        If the runtime is unknown, ``onnx`` has no bundle or ``torch`` has one,
        or a method is not one an edge client trains.
    protocols.edge_bundle.EdgeBundleError
        If the bundle is missing, damaged or altered (one line naming it).
    """
    if s.runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {s.runtime!r}")
    if s.runtime == "torch":
        if s.bundle is not None:
            raise ValueError("a bundle is for runtime 'onnx' (the edge client)")
        return
    if s.bundle is None:
        raise ValueError("runtime 'onnx' needs the edge bundle (pollinate export)")
    from protocols.edge_bundle import read_bundle

    edge = edge_methods()
    wrong = [m for m in s.methods if m not in edge]
    if wrong:
        raise ValueError(f"runtime 'onnx' trains {list(edge)}, not {wrong}")
    read_bundle(s.bundle)


def edge_methods() -> tuple[str, ...]:
    """The methods an edge client trains (those that export an edge bundle)."""
    from protocols.methods import get_method, method_names

    return tuple(m for m in method_names() if "edge" in get_method(m).exports)


def supernode_command(s: JoinSettings) -> list[str]:
    """The ``flower-supernode`` command line for these settings.

    Raises
    ------
    ValueError
        If TLS is off without ``insecure``, or on with ``insecure``.
    """
    if s.insecure == (s.root_certificates is not None):
        raise ValueError("give exactly one of a root certificate (TLS) or insecure")
    tool = Path(sys.executable).parent / "flower-supernode"
    node_config = f'data-path="{s.data.resolve()}" label="{s.label}"'
    # An edge node serves only what an edge client trains: others are refused.
    methods = s.methods or (edge_methods() if s.runtime == "onnx" else ())
    if methods:
        node_config += f' methods="{",".join(methods)}"'
    if s.auth_key is not None:
        # The ClientApp signs its hello with the same key (label <-> key).
        node_config += f' auth-key="{s.auth_key.resolve()}"'
    if s.runtime != "torch":
        bundle = s.bundle.resolve() if s.bundle is not None else ""
        node_config += f' runtime="{s.runtime}" bundle="{bundle}"'
    if s.lora_rank is not None:
        node_config += f" lora-rank={s.lora_rank}"
    cmd = [
        str(tool),
        "--superlink",
        s.server,
        "--port",
        str(s.local_port),
        "--node-config",
        node_config,
    ]
    if s.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(s.root_certificates)]
    if s.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(s.auth_key)]
    return cmd


def supernode_env(s: JoinSettings) -> dict[str, str]:
    """The SuperNode's environment: its own FLWR_HOME, offline, our venv first."""
    return {
        **os.environ,
        "FLWR_HOME": str(s.state_dir / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "POLLINATE_ZO_STATE_DIR": str(s.state_dir / "zo-state"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def start_supernode(s: JoinSettings) -> subprocess.Popen[bytes]:
    """Start one ``flower-supernode`` for ``s`` in its own process group.

    Its output goes to ``<state_dir>/supernode.log``.
    """
    s.state_dir.mkdir(parents=True, exist_ok=True)
    with (s.state_dir / "supernode.log").open("ab") as log:
        return subprocess.Popen(
            supernode_command(s),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=supernode_env(s),
            start_new_session=True,
        )


def run_daemon(s: JoinSettings, *, say: Callable[[str], None] = print) -> int:
    """Run and supervise the SuperNode; return the exit status.

    0 when stopped by SIGINT/SIGTERM; the SuperNode's last status when
    ``max_restarts`` restarts are exhausted.

    Raises
    ------
    protocols.installation.InstallationError
        Before anything starts, if a file on this process's path shadows a
        Pollinate package (the SuperNode's ClientApps would import it).
    ValueError, protocols.edge_bundle.EdgeBundleError
        Before anything starts, from :func:`check_runtime`.
    """
    check_installation()
    check_runtime(s)
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        del frame
        stopping = True
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
        say(f"signal {signum}: stopping")

    previous = {
        sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    restarts, backoff = 0, 1.0
    try:
        while not stopping:
            child = start_supernode(s)
            say(f"node {s.label}: SuperNode started (pid {child.pid}) for {s.server}")
            code = child.wait()
            say(f"node {s.label}: SuperNode exited with status {code}")
            if stopping:
                return 0
            # Any exit, clean or not, while not stopping means the server went
            # away (a restarted SuperLink forgets its nodes): join again.
            if restarts >= s.max_restarts:
                say(f"node {s.label}: no restarts left")
                return code
            restarts += 1
            say(
                f"node {s.label}: SuperNode exited with {code}; restart {restarts} in {backoff:.0f} s"
            )
            time.sleep(backoff)  # back-off before re-joining a restarting server
            if stopping:
                return 0
            backoff = min(backoff * 2, 30.0)
        return 0
    finally:
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def make_node_key(folder: Path, name: str = "node") -> tuple[Path, Path]:
    """Write an OpenSSH EC (P-384) key pair for node authentication.

    Returns ``(private key, public key)``; register the public key on the
    server (``pollinate server start --auth-keys DIR``) as ``DIR/<label>.pub``,
    named for the label the node joins with: the server accepts a node's
    label only with a hello signed by the key registered under it.

    Raises
    ------
    FileExistsError
        If the key already exists.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if private.exists():
        raise FileExistsError(f"{private} exists")
    key = ec.generate_private_key(ec.SECP384R1())
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    os.chmod(private, 0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public
