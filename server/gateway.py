"""The fleet gateway: the only door from the fleet network into the SuperLink.

Flower 1.42's SuperLink serves its Fleet API (SuperNodes), Control API
(``flwr run``, ``flwr supernode register``, ``flwr ls``, ``flwr stop``),
Runtime API (the ServerApp) and health check on one HTTP port. Anyone who can
reach that port and holds ``ca.crt`` can therefore register node keys, list
and stop runs and submit an app the server then executes. Pollinate binds the
SuperLink to 127.0.0.1 and puts this gateway on the public address instead:
a reverse proxy that forwards exactly the Fleet API's POST routes
(:data:`FLEET_PATHS`, read from ``flwr/superlink/routers/fleet/router.py``)
and answers every other request itself (404, 405, 413, ...).

What it guarantees:

- Only ``POST`` to one of :data:`FLEET_PATHS`, without a query string,
  reaches the SuperLink; the upstream URL is built from the allow-list, never
  from the client's bytes.
- Request and response bodies and the end-to-end headers pass unchanged, so
  SuperNode authentication (``flwr-public-key``, ``flwr-timestamp``,
  ``flwr-signature`` headers over a signed timestamp) still works. Hop-by-hop
  headers are dropped and ``X-Forwarded-*`` is set by the gateway only.
- Request bodies are bounded (``max_body_bytes``, 413) and must arrive
  within ``body_timeout_s`` (408); at most ``max_requests`` are handled at
  once (so at most that many bodies are held in memory), connections are
  bounded by ``max_connections`` (503 above it) and ``max_connections_per_peer``
  from one address (closed at once above it), and idle keep-alive by
  ``keep_alive_s``.
- A connection must deliver each request's line and headers within
  ``header_timeout_s`` of opening or of that request's first byte, or it is
  closed (:class:`_DeadlineH11Protocol`): uvicorn bounds neither a connection
  that never sends a byte nor one that trickles its headers, so without this
  a few hundred such sockets would fill ``max_connections`` and every device
  would get 503s (slowloris).
- With TLS it terminates TLS with the server certificate and talks TLS to
  the SuperLink, verifying it with the run's CA (node authentication needs
  the SuperLink to keep TLS); the SuperLink's certificate must cover
  127.0.0.1.
- With ``watch_pid`` it exits when that process (the SuperLink) is gone, so
  it never outlives the server it fronts.

Run it as ``python -m server.gateway --port 9092 --upstream-port 40123
[--certfile ... --keyfile ... --cafile ...] [--watch-pid PID]``;
:func:`server.deploy.start_gateway` does so for ``pollinate server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import h11
import httpx
import psutil
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "FLEET_PATHS",
    "FleetGateway",
    "GatewaySettings",
    "main",
    "serve",
]

#: The Fleet API's routes in Flower 1.42 (all POST, protobuf bodies). Nothing
#: else (``/v1/control/*``, ``/v1/runtime/*``, ``/health``, ``/docs``,
#: ``/openapi.json``) is forwarded.
FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)

# RFC 9110 §7.6.1 hop-by-hop headers, plus what the gateway sets itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_SET_BY_GATEWAY = frozenset(
    {"host", "content-length", "forwarded", "x-forwarded-for", "x-forwarded-proto"}
    | {"x-forwarded-host", "x-forwarded-port", "x-real-ip"}
)

_LOG = logging.getLogger("pollinate.gateway")

#: Default bound on a request body: Flower's array chunks are 5 MiB.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
#: Default time a connection has to deliver a request's line and headers.
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: Default bound on the connections one address holds open.
DEFAULT_MAX_CONNECTIONS_PER_PEER = 64

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]


class _Refused(Exception):
    """A request the gateway answers itself."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """How one gateway listens, where it forwards, and its bounds.

    Attributes
    ----------
    host, port : str, int
        The public address SuperNodes connect to.
    upstream_port : int
        The SuperLink's port on 127.0.0.1.
    certfile, keyfile, cafile : Path | None
        Server certificate and key (TLS towards SuperNodes) and the CA that
        verifies the SuperLink; all three or none (plaintext both ways).
    watch_pid : int | None
        Exit once this process (the SuperLink) is gone.
    max_body_bytes : int
        Largest request body forwarded. Flower moves arrays in chunks of
        ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` (5 MiB by default) per request.
    body_timeout_s : float
        Time a client has to send a request body.
    upstream_timeout_s : float
        Time the SuperLink has to answer one request.
    max_requests : int
        Requests handled at once (body read, forwarded, answer relayed);
        more wait their turn.
    max_connections : int
        Open connections (each SuperNode keeps a few); more are answered 503.
    keep_alive_s : int
        Idle keep-alive connections are closed after this.
    header_timeout_s : float
        Time a connection has to deliver a request's line and headers, from
        the moment it opens (first request) or sends the request's first byte
        (later ones); then it is closed.
    max_connections_per_peer : int
        Open connections from one IP address; more are closed as they open
        (SuperNodes behind one NAT share it: raise it for large sites).
    """

    host: str
    port: int
    upstream_port: int
    certfile: Path | None = None
    keyfile: Path | None = None
    cafile: Path | None = None
    watch_pid: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = 120.0
    upstream_timeout_s: float = 300.0
    max_requests: int = 64
    max_connections: int = 1024
    keep_alive_s: int = 15
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER

    def __post_init__(self) -> None:
        files = (self.certfile, self.keyfile, self.cafile)
        if any(f is None for f in files) and any(f is not None for f in files):
            raise ValueError(
                "certfile, keyfile and cafile: give all three (TLS) or none, "
                f"got {files}"
            )
        for name in ("port", "upstream_port"):
            value = getattr(self, name)
            if not 0 < value < 65536:
                raise ValueError(f"{name} must be in 1..65535, got {value}")
        for name in (
            "max_body_bytes",
            "max_requests",
            "max_connections",
            "max_connections_per_peer",
            "keep_alive_s",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("body_timeout_s", "upstream_timeout_s", "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def tls(self) -> bool:
        """Whether both sides speak TLS."""
        return self.certfile is not None

    @property
    def upstream(self) -> str:
        """Base URL of the loopback SuperLink."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.upstream_port}"


def _forwarded_headers(
    raw: Iterable[tuple[bytes, bytes]], client: str
) -> list[tuple[bytes, bytes]]:
    """End-to-end request headers, unchanged, plus the gateway's own."""
    raw = list(raw)
    named = {
        token.strip().lower()
        for key, value in raw
        if key.lower() == b"connection"
        for token in value.decode("latin-1").split(",")
    }
    drop = _HOP_BY_HOP | _SET_BY_GATEWAY | named
    kept = [(k, v) for k, v in raw if k.decode("latin-1").lower() not in drop]
    return [*kept, (b"x-forwarded-for", client.encode("latin-1"))]


def _response_headers(headers: httpx.Headers) -> list[tuple[bytes, bytes]]:
    """The SuperLink's end-to-end response headers, unchanged."""
    return [
        (k, v) for k, v in headers.raw if k.decode("latin-1").lower() not in _HOP_BY_HOP
    ]


class FleetGateway:
    """An ASGI app forwarding the Fleet API to the loopback SuperLink.

    Parameters
    ----------
    client : httpx.AsyncClient
        Talks to the SuperLink (TLS verified with the run's CA, or plaintext).
    settings : GatewaySettings
        Upstream address and request bounds.
    """

    def __init__(self, client: httpx.AsyncClient, settings: GatewaySettings) -> None:
        self._client = client
        self._settings = settings
        self._slots = asyncio.Semaphore(settings.max_requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward one allowed request, or answer it with an error."""
        if scope["type"] != "http":  # no websockets, no lifespan work
            return
        peer = str((scope.get("client") or ("?", 0))[0])
        path = scope["path"]
        try:
            self._check(scope)
            async with self._slots:  # bounds the bodies held at once
                body = await self._read_body(scope, receive)
                await self._forward(path, scope, body, peer, send)
        except _Refused as refused:
            _LOG.warning(
                "refused %s %s from %s: %s", scope["method"], path, peer, refused
            )
            await _answer(send, refused.status, str(refused))

    def _check(self, scope: Scope) -> None:
        """Refuse what is not a Fleet API call."""
        if scope["path"] not in FLEET_PATHS or scope.get("query_string"):
            raise _Refused(404, "not found")
        if scope["method"] != "POST":
            raise _Refused(405, "method not allowed")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole request body, within the size and time bounds."""
        limit = self._settings.max_body_bytes
        for key, value in scope["headers"]:
            if key.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise _Refused(400, "bad content-length") from None
                if declared > limit:
                    raise _Refused(413, f"body over {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._settings.body_timeout_s):
                more = True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Refused(400, "client went away")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _Refused(413, f"body over {limit} bytes")
                    chunks.append(chunk)
                    more = bool(message.get("more_body", False))
        except TimeoutError:
            raise _Refused(408, "request body too slow") from None
        return b"".join(chunks)

    async def _forward(
        self, path: str, scope: Scope, body: bytes, peer: str, send: Send
    ) -> None:
        """Send the request to the SuperLink and stream its answer back."""
        request = self._client.build_request(
            "POST",
            self._settings.upstream + path,  # from the allow-list, not the client
            headers=_forwarded_headers(scope["headers"], peer),
            content=body,
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            _LOG.error("SuperLink timed out on %s: %s", path, exc)
            await _answer(send, 504, "upstream timeout")
            return
        except httpx.HTTPError as exc:
            _LOG.error("SuperLink unreachable for %s: %r", path, exc)
            await _answer(send, 502, "upstream unavailable")
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": _response_headers(response.headers),
                }
            )
            async for chunk in response.aiter_raw():
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
        except (httpx.HTTPError, OSError) as exc:
            # Mid-stream: the status is sent; dropping the connection is all
            # that is left (the client sees a truncated body, not a wrong one).
            _LOG.error("relaying %s failed: %r", path, exc)
        finally:
            await response.aclose()


async def _answer(send: Send, status: int, text: str) -> None:
    """A short plain-text answer that closes the connection."""
    body = f"{text}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _DeadlineH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a header deadline and a per-peer cap.

    uvicorn starts its keep-alive timer only after a response, and any byte
    cancels it: a connection that opens and stays silent, or trickles one
    header byte at a time, is held forever. Here every request's line and
    headers must arrive within :attr:`header_timeout_s` of the connection
    opening (first request) or of the request's first byte (later ones).
    :attr:`max_per_peer` bounds the connections one address holds at once.
    :func:`_bounded_protocol` makes the subclass that carries one gateway's
    values and its own count of open connections per peer.
    """

    header_timeout_s: ClassVar[float] = DEFAULT_HEADER_TIMEOUT_S
    max_per_peer: ClassVar[int] = DEFAULT_MAX_CONNECTIONS_PER_PEER
    open_per_peer: ClassVar[Counter[str]] = Counter()

    def connection_made(  # type: ignore[override]  # as uvicorn's
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._peer = str(self.client[0]) if self.client else "?"
        self.open_per_peer[self._peer] += 1
        if self.open_per_peer[self._peer] > self.max_per_peer:
            _LOG.warning(
                "closed a connection from %s: over %d open from one address",
                self._peer,
                self.max_per_peer,
            )
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.open_per_peer[self._peer] -= 1
        if self.open_per_peer[self._peer] <= 0:
            del self.open_per_peer[self._peer]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of a request after a response
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the request line and headers are in

    def _arm(self) -> None:
        self._header_deadline = self.loop.call_later(
            self.header_timeout_s, self._headers_late
        )

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            _LOG.warning(
                "closed a connection from %s: no complete request headers within %g s",
                self._peer,
                self.header_timeout_s,
            )
            self.transport.close()


def _bounded_protocol(settings: GatewaySettings) -> type[_DeadlineH11Protocol]:
    """The HTTP protocol class of one gateway: its bounds, its own counts."""

    class Bounded(_DeadlineH11Protocol):
        header_timeout_s = settings.header_timeout_s
        max_per_peer = settings.max_connections_per_peer
        open_per_peer: ClassVar[Counter[str]] = Counter()

    return Bounded


def _upstream_client(settings: GatewaySettings) -> httpx.AsyncClient:
    """The client for the SuperLink: its CA only, no proxies from the env."""
    verify: ssl.SSLContext | bool = False
    if settings.cafile is not None:
        verify = ssl.create_default_context(cafile=str(settings.cafile))
    return httpx.AsyncClient(
        verify=verify,
        trust_env=False,
        timeout=httpx.Timeout(settings.upstream_timeout_s, connect=10.0),
        limits=httpx.Limits(
            max_connections=settings.max_requests,
            max_keepalive_connections=min(16, settings.max_requests),
        ),
        follow_redirects=False,
    )


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def _watch(pid: int, server: uvicorn.Server) -> None:
    """Ask ``server`` to exit once process ``pid`` is gone."""
    while not server.should_exit:
        if not _alive(pid):
            _LOG.warning("the SuperLink (pid %d) is gone: stopping", pid)
            server.should_exit = True
        await asyncio.sleep(1.0)  # polling a PID: no event to wait on


async def serve(settings: GatewaySettings) -> None:
    """Run the gateway until SIGTERM/SIGINT or the watched process exits."""
    async with _upstream_client(settings) as client:
        config = uvicorn.Config(
            FleetGateway(client, settings),
            host=settings.host,
            port=settings.port,
            ssl_certfile=str(settings.certfile) if settings.certfile else None,
            ssl_keyfile=str(settings.keyfile) if settings.keyfile else None,
            http=_bounded_protocol(settings),
            ws="none",
            lifespan="off",
            proxy_headers=False,
            server_header=False,  # the SuperLink's own headers pass through
            date_header=False,
            limit_concurrency=settings.max_connections,
            timeout_keep_alive=settings.keep_alive_s,
            timeout_graceful_shutdown=5,
            access_log=True,
        )
        server = uvicorn.Server(config)
        watcher = (
            asyncio.create_task(_watch(settings.watch_pid, server))
            if settings.watch_pid is not None
            else None
        )
        try:
            await server.serve()
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher


def _parse(argv: Sequence[str] | None) -> GatewaySettings:
    parser = argparse.ArgumentParser(
        prog="python -m server.gateway",
        description="Forward only the Flower Fleet API to a loopback SuperLink.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="public interface")
    parser.add_argument("--port", type=int, required=True, help="public port")
    parser.add_argument(
        "--upstream-port", type=int, required=True, help="SuperLink on 127.0.0.1"
    )
    parser.add_argument("--certfile", type=Path, help="server certificate (TLS)")
    parser.add_argument("--keyfile", type=Path, help="server key (TLS)")
    parser.add_argument("--cafile", type=Path, help="CA verifying the SuperLink")
    parser.add_argument("--watch-pid", type=int, help="exit when this PID is gone")
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body forwarded",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help="time a connection has to send a request's headers",
    )
    parser.add_argument(
        "--max-connections-per-peer",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS_PER_PEER,
        help="open connections from one address",
    )
    args = parser.parse_args(argv)
    try:
        return GatewaySettings(
            host=args.host,
            port=args.port,
            upstream_port=args.upstream_port,
            certfile=args.certfile,
            keyfile=args.keyfile,
            cafile=args.cafile,
            watch_pid=args.watch_pid,
            max_body_bytes=args.max_body_bytes,
            header_timeout_s=args.header_timeout_s,
            max_connections_per_peer=args.max_connections_per_peer,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m server.gateway``."""
    settings = _parse(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s gateway %(levelname)s: %(message)s",
    )
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
