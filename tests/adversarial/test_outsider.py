"""An outsider on the fleet network cannot control the server.

Flower's SuperLink serves Fleet, Control and Runtime on one HTTP port; the
Control API registers node keys, lists, submits and stops runs, so whoever
reaches it holding only ``ca.crt`` could make the server run their code.
Pollinate keeps the SuperLink on 127.0.0.1 and puts the fleet gateway
(:mod:`server.gateway`) on the public port. The fast tests below check the
gateway's filter against a dummy upstream; the ``deployment`` test attacks a
real ``pollinate server start --certs --auth-keys`` with Flower's own CLI
while registered nodes train.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from server.certificates import DevPki, make_dev_pki
from server.gateway import FLEET_PATHS
from tests.conftest import deployment_config, free_port, wait_until

MAX_BODY = 4096

# What a SuperNode's request carries (flwr.supernode.node_auth_http_interceptor).
NODE_HEADERS = {
    "content-type": "application/protobuf",
    "accept": "application/protobuf",
    "flwr-public-key": "BHx0ZXN0LWtleQ==",
    "flwr-timestamp": "2026-12-04T23:00:00.123456+00:00",
    "flwr-signature": "MEUCIQD+sig/with+base64==",
    "flwr-version": "1.42.0",
    "x-extra": "kept as is",
}


@dataclass
class Upstream:
    """A dummy SuperLink: records each request, answers with fixed bytes."""

    port: int
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    reply = bytes(range(256)) * 3
    reply_headers = {"content-type": "application/protobuf", "x-upstream": "yes"}


def _start_upstream(pki: DevPki) -> tuple[Upstream, ThreadingHTTPServer]:
    upstream = Upstream(free_port())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            upstream.seen.append(("POST", self.path, headers, body))
            self.send_response(200)
            for key, value in upstream.reply_headers.items():
                self.send_header(key, value)
            self.send_header("content-length", str(len(upstream.reply)))
            self.end_headers()
            self.wfile.write(upstream.reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", upstream.port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return upstream, server


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_gateway(
    pki: DevPki, upstream_port: int, *extra: str
) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "server.gateway",
            "--port",
            str(port),
            "--upstream-port",
            str(upstream_port),
            "--certfile",
            str(pki.server_cert),
            "--keyfile",
            str(pki.server_key),
            "--cafile",
            str(pki.ca_cert),
            "--max-body-bytes",
            str(MAX_BODY),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def up() -> bool:
        assert proc.poll() is None, "the gateway exited"
        return _listening(port)

    wait_until(up, 30, "the gateway to listen")
    return port, proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Gateway:
    port: int
    pki: DevPki
    upstream: Upstream

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request with the raw ``path`` (no client-side normalisation)."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()


@contextlib.contextmanager
def _gateway_before_upstream(pki_dir: Path, *extra: str) -> Iterator[Gateway]:
    """A gateway (started with ``extra`` flags) in front of a dummy SuperLink."""
    pki = make_dev_pki(pki_dir)
    upstream, server = _start_upstream(pki)
    port, proc = _start_gateway(pki, upstream.port, *extra)
    try:
        yield Gateway(port, pki, upstream)
    finally:
        _stop(proc)
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with _gateway_before_upstream(tmp_path_factory.mktemp("pki")) as gw:
        yield gw


def test_fleet_paths_are_flowers_fleet_routes() -> None:
    """The allow-list is exactly Flower's Fleet router (all POST).

    Breaks when a Flower upgrade adds, renames or removes a Fleet route: the
    gateway would block SuperNodes or pass something new unreviewed.
    """
    from flwr.superlink.routers.fleet.router import router

    routes = {(r.path, tuple(sorted(r.methods))) for r in router.routes}
    assert routes == {(path, ("POST",)) for path in FLEET_PATHS}


def test_gateway_forwards_fleet_calls_byte_for_byte(gateway: Gateway) -> None:
    """Every Fleet route reaches the SuperLink with its body and the node's
    signature headers unchanged, and the SuperLink's answer (status, headers,
    body) comes back unchanged.

    Breaks if the proxy re-encodes bodies or drops the ``flwr-*`` headers
    SuperNode authentication checks.
    """
    body = bytes(range(256)) * 5 + b"\x00\r\n\r\n"
    for path in sorted(FLEET_PATHS):
        gateway.upstream.seen.clear()
        status, headers, reply = gateway.request("POST", path, body, NODE_HEADERS)
        assert status == 200, (path, reply)
        assert reply == gateway.upstream.reply
        for key, value in Upstream.reply_headers.items():
            assert headers[key] == value
        ((method, seen_path, seen_headers, seen_body),) = gateway.upstream.seen
        assert (method, seen_path, seen_body) == ("POST", path, body)
        for key, value in NODE_HEADERS.items():
            assert seen_headers[key] == value, key
        assert seen_headers["x-forwarded-for"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/stop-run"),
        ("POST", "/v1/control/list-nodes"),
        ("POST", "/v1/runtime/pull-messages"),
        ("POST", "/v1/runtime/push-logs"),
        ("POST", "/v1/runtime/responses"),
        ("GET", "/health"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/v1/fleet/get-run"),
        ("PUT", "/v1/fleet/push-object"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ("POST", "/v1/fleet/get-run/"),
        ("POST", "/v1/fleet/get-run?next=/v1/control/list-runs"),
        ("POST", "/V1/FLEET/get-run"),
        ("POST", "//v1/fleet/get-run"),
        ("POST", "http://127.0.0.1/v1/control/list-runs"),
    ],
)
def test_gateway_refuses_all_but_the_fleet_api(
    gateway: Gateway, method: str, path: str
) -> None:
    """Control, Runtime, health, docs, other methods and path tricks are
    answered by the gateway (404/405) and never reach the SuperLink.

    Breaks if an outsider could reach the Control or Runtime API.
    """
    gateway.upstream.seen.clear()
    body = b"x" if method in ("POST", "PUT") else None
    status, _, _ = gateway.request(method, path, body, NODE_HEADERS)
    assert status in (404, 405), (method, path, status)
    assert gateway.upstream.seen == []


def test_gateway_bounds_request_bodies(gateway: Gateway) -> None:
    """A body over the limit is refused with 413 whether it declares its
    length or streams in chunks; one at the limit passes.

    Breaks if an outsider could make the gateway buffer unbounded bodies.
    """
    path = "/v1/fleet/push-object"
    gateway.upstream.seen.clear()
    status, _, _ = gateway.request("POST", path, b"y" * (MAX_BODY + 1), NODE_HEADERS)
    assert status == 413
    chunks = iter([b"z" * 1000] * 6)  # no length: http.client sends it chunked
    try:
        status, _, _ = gateway.request("POST", path, chunks, NODE_HEADERS)  # type: ignore[arg-type]
    except (BrokenPipeError, ConnectionResetError):
        status = 413  # refused and closed while we were still sending
    assert status == 413
    assert gateway.upstream.seen == []
    status, _, _ = gateway.request("POST", path, b"y" * MAX_BODY, NODE_HEADERS)
    assert status == 200
    assert len(gateway.upstream.seen) == 1


def _tls_socket(gw: Gateway, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TLS connection to the gateway from ``source`` that has sent nothing."""
    context = ssl.create_default_context(cafile=str(gw.pki.ca_cert))
    raw = socket.create_connection(
        ("127.0.0.1", gw.port), timeout=30, source_address=(source, 0)
    )
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _closed_by_peer(sock: ssl.SSLSocket) -> bool:
    """Whether the gateway closes ``sock`` within its 30 s timeout, unanswered.

    A gateway that keeps the connection open makes ``recv`` time out, which
    fails the calling test.
    """
    try:
        return sock.recv(4096) == b""
    except (ssl.SSLEOFError, ConnectionResetError):
        return True


@pytest.fixture
def bounded_gateway(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Gateway]:
    """A gateway started with the extra flags the test parametrizes it with."""
    with _gateway_before_upstream(tmp_path, *request.param) as gw:
        yield gw


@pytest.mark.parametrize(
    "bounded_gateway", [("--header-timeout-s", "1")], indirect=True
)
def test_gateway_closes_connections_that_withhold_their_headers(
    bounded_gateway: Gateway,
) -> None:
    """Slowloris: a connection that sends nothing, or a request line and part
    of its headers, is closed once ``--header-timeout-s`` has passed, and an
    honest request is still served.

    Breaks if such connections were held open (uvicorn alone holds them
    forever), so a few hundred of them would fill ``max_connections`` and
    every device would be answered 503.
    """
    gw = bounded_gateway
    silent = _tls_socket(gw)
    partial = _tls_socket(gw)
    partial.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        assert _closed_by_peer(silent)
        assert _closed_by_peer(partial)
    finally:
        silent.close()
        partial.close()
    status, _, _ = gw.request("POST", "/v1/fleet/pull-messages", b"x", NODE_HEADERS)
    assert status == 200
    assert len(gw.upstream.seen) == 1  # the withheld request never went upstream


@pytest.mark.parametrize(
    "bounded_gateway",
    [("--max-connections-per-peer", "2", "--header-timeout-s", "300")],
    indirect=True,
)
def test_gateway_bounds_connections_per_address(bounded_gateway: Gateway) -> None:
    """One address holds at most ``--max-connections-per-peer`` connections:
    the next one from it is closed at once, while another address is served.

    Breaks if one host could take every connection slot of the gateway.
    """
    gw = bounded_gateway
    held = [_tls_socket(gw), _tls_socket(gw)]
    try:
        extra = _tls_socket(gw)
        try:
            assert _closed_by_peer(extra)  # the header deadline is 300 s away
        finally:
            extra.close()
        other = http.client.HTTPSConnection(
            "127.0.0.1",
            gw.port,
            context=ssl.create_default_context(cafile=str(gw.pki.ca_cert)),
            source_address=("127.0.0.2", 0),
        )
        try:
            other.request("POST", "/v1/fleet/get-run", body=b"x", headers=NODE_HEADERS)
            assert other.getresponse().status == 200
        finally:
            other.close()
    finally:
        for sock in held:
            sock.close()


def test_gateway_refuses_a_superlink_signed_by_another_ca(tmp_path: Path) -> None:
    """The gateway verifies the loopback SuperLink with the run's CA: a
    SuperLink whose certificate another CA signed gets nothing (502).

    Breaks if the upstream TLS connection skipped verification.
    """
    ours, theirs = make_dev_pki(tmp_path / "ours"), make_dev_pki(tmp_path / "theirs")
    upstream, server = _start_upstream(theirs)
    port, proc = _start_gateway(ours, upstream.port)
    try:
        gw = Gateway(port, ours, upstream)
        status, _, _ = gw.request("POST", "/v1/fleet/get-run", b"x", NODE_HEADERS)
        assert status == 502
        assert upstream.seen == []
    finally:
        _stop(proc)
        server.shutdown()
        server.server_close()


def test_gateway_exits_when_its_superlink_is_gone(tmp_path: Path) -> None:
    """With ``--watch-pid`` the gateway stops by itself once the SuperLink
    process dies, so a killed server never leaves its public port open.

    Breaks if a crashed server left a gateway holding the port.
    """
    pki = make_dev_pki(tmp_path)
    superlink = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        start_new_session=True,
    )
    _, proc = _start_gateway(pki, free_port(), "--watch-pid", str(superlink.pid))
    try:
        superlink.kill()
        superlink.wait()
        assert proc.wait(timeout=20) == 0
    finally:
        _stop(proc)
        if superlink.poll() is None:
            superlink.kill()


# --------------------------------------------------------------------------
# A real server attacked with Flower's own CLI (minutes: deployment marker)
# --------------------------------------------------------------------------

POLLINATE = str(Path(sys.executable).parent / "pollinate")
FLWR = str(Path(sys.executable).parent / "flwr")


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from server.flower_cli import flwr_env

    return subprocess.run(
        [FLWR, *args],
        env=flwr_env(home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _json(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:]
    payload = json.loads(out.stdout[out.stdout.find("{") :])
    assert isinstance(payload, dict)
    return payload


def _outsider_home(tmp_path: Path, port: int, ca: Path) -> Path:
    """An outsider's FLWR_HOME: the public address and ``ca.crt``, nothing else."""
    home = tmp_path / "outsider"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "target"\n\n[superlink.target]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca.resolve()}"\n'
    )
    app = home / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "outsider-app"\nversion = "1.0.0"\ndescription = ""\n'
        'license = "Apache-2.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "outsider"\n'
        '[tool.flwr.app.components]\nserverapp = "evil:app"\nclientapp = "evil:app"\n'
    )
    (app / "evil.py").write_text("app = None\n")
    return home


@pytest.mark.deployment
@pytest.mark.integration
def test_an_outsider_with_the_ca_certificate_cannot_control_the_server(
    tmp_path: Path,
) -> None:
    """``pollinate server start --certs --auth-keys``: an outsider holding
    ``ca.crt`` reaches the public port but ``flwr supernode register``,
    ``flwr ls``, ``flwr run`` and ``flwr stop`` all fail there, and the
    operator (loopback) still sees exactly the registered keys and the one
    run, which two registered nodes complete; ``server stop`` stops the
    SuperLink and the gateway.

    Breaks if the Control API is reachable from the fleet network, or the
    gateway keeps registered nodes from training.
    """
    from client.daemon import make_node_key
    from corpora import generate_tasks, write_jsonl
    from protocols.run_folder import RunFolder
    from server.deploy import read_server_info
    from server.processes import process_alive
    from simulation import read_metrics

    pki = make_dev_pki(tmp_path / "certs")
    keys = tmp_path / "keys"
    private = [make_node_key(keys, label)[0] for label in "ab"]
    port = free_port()
    started = subprocess.run(
        [POLLINATE, "server", "start", str(deployment_config(tmp_path, 1))]
        + ["--certs", str(tmp_path / "certs"), "--auth-keys", str(keys)]
        + ["--port", str(port), "--detach"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = read_server_info(run_dir)
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert info is not None and info.gateway_pid is not None
        assert info.superlink_port not in (None, port)
        tasks = generate_tasks(60, seed=3)
        for i, label in enumerate("ab"):
            data = tmp_path / f"{label}.jsonl"
            write_jsonl(tasks[i * 30 : (i + 1) * 30], data)
            log = (tmp_path / f"daemon-{label}.log").open("ab")
            nodes.append(
                subprocess.Popen(
                    [POLLINATE, "client", "join", "--server", f"127.0.0.1:{port}"]
                    + ["--root-cert", str(pki.ca_cert), "--auth-key", str(private[i])]
                    + ["--data", str(data), "--label", label]
                    + ["--state-dir", str(tmp_path / f"node-{label}")]
                    + ["--local-port", str(free_port())],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        operator = RunFolder(run_dir).cli_home
        registered = _json(_flwr(operator, "supernode", "ls", "--format", "json"))
        assert len(registered["nodes"]) == 2

        outsider = _outsider_home(tmp_path, port, pki.ca_cert)
        _, evil_pub = make_node_key(tmp_path / "evil-keys", "evil")
        attempts = {
            "register": _flwr(outsider, "supernode", "register", str(evil_pub)),
            "supernode ls": _flwr(outsider, "supernode", "ls"),
            "ls": _flwr(outsider, "ls"),
            "run": _flwr(outsider, "run", str(outsider / "app")),
            "stop": _flwr(outsider, "stop", str(info.run_id)),
        }
        for name, out in attempts.items():
            text = out.stdout + out.stderr
            assert out.returncode != 0, f"outsider's flwr {name} succeeded: {text}"
            # Refused by the gateway, not failed on the way (TLS, address).
            assert "404" in text, f"outsider's flwr {name}: {text}"

        after = _json(_flwr(operator, "supernode", "ls", "--format", "json"))
        assert len(after["nodes"]) == 2, "the outsider registered a key"
        runs = _json(_flwr(operator, "ls", "--format", "json"))["runs"]
        assert [int(r["run-id"]) for r in runs] == [info.run_id], (
            "the outsider ran an app"
        )
        assert not str(runs[0]["status"]).startswith("finished:stopped")

        def completed() -> bool:
            status = run_dir / "status.json"
            return status.exists() and json.loads(status.read_text())["state"] in (
                "completed",
                "failed",
            )

        wait_until(completed, 400, "the run to end")
        assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
        assert read_metrics(run_dir / "metrics.jsonl")[1]["clients"] == 2
    finally:
        for proc in nodes:
            _stop(proc)
        stopped = subprocess.run(
            [POLLINATE, "server", "stop", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert info is not None and info.gateway_pid is not None
    assert not process_alive(info.pid) and not process_alive(info.gateway_pid)
