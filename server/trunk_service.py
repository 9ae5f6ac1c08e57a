"""The split-learning trunk service: the server half of an SFPrompt model.

A device runs the embedding, P soft prompts and the first k frozen blocks; this
service runs the frozen body (the remaining blocks) for it over gRPC
(``protocols/proto/trunk.proto``). One session per device and round:

1. ``Open`` checks the device's :class:`~protocols.specs.SplitSpec` against the
   server's (equal fingerprints) and returns a session id.
2. ``Forward(step=N, train=True)`` runs the body with autograd on and keeps
   ``(h_in, h_out)`` pending; ``Backward(step=N)`` back-propagates the device's
   gradient at the body output and returns the gradient at the cut (the P
   prompt positions only when k == 0, every position when k > 0). An eval
   forward (``train=False``) runs without a graph and completes step N at once.
3. ``Close`` ends the session and returns its counters.

Every session has its own state and lock, so a rejected or failed call in one
never touches another; the body is shared and frozen. Errors map to gRPC status
codes: unknown session NOT_FOUND, wrong order or spec FAILED_PRECONDITION, a bad
frame INVALID_ARGUMENT (the message names the field), too large
RESOURCE_EXHAUSTED, a failure of the body INTERNAL. :meth:`TrunkService.usage`
sums bytes per client for the round's byte ledger.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
import torch
from google.protobuf.message import Message

from protocols.errors import PayloadTooLargeError, ProtocolError, SpecMismatchError
from protocols.proto import trunk_pb2, trunk_pb2_grpc
from protocols.specs import SplitSpec
from protocols.split_wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    split_spec_from_json,
    tensor_from_proto,
    tensor_to_proto,
)

__all__ = ["TrunkBody", "TrunkService", "start_trunk_server"]

_log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)
Rep = TypeVar("Rep", bound=Message)


class TrunkBody(Protocol):
    """The frozen body the server runs: blocks ``k .. num_blocks - 1``.

    Attributes
    ----------
    device : torch.device
        Where :meth:`forward` expects its inputs.
    """

    device: torch.device

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Run the body.

        Parameters
        ----------
        hidden : torch.Tensor
            (B, P + T, D) activations at the cut, on :attr:`device`, in the
            spec's activation dtype.
        attention_mask : torch.Tensor
            (B, P + T) int64 of 0/1, on :attr:`device`.

        Returns
        -------
        torch.Tensor
            (B, P + T, D) body output, differentiable w.r.t. ``hidden`` when
            called with grad enabled.
        """
        ...


class _Abort(Exception):
    """A call is refused with a specific gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class _Pending:
    """A training step waiting for its Backward call."""

    step: int
    h_in: torch.Tensor  # (B, P + T, D) leaf on body.device, requires grad
    h_out: torch.Tensor  # (B, P + T, D) body output, part of the graph


@dataclass
class _Session:
    """State of one device session; guarded by ``lock``."""

    client: str
    round: int
    last_used: float
    next_step: int = 0
    pending: _Pending | None = None
    steps: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class TrunkService(trunk_pb2_grpc.SplitTrunkServicer):
    """gRPC servicer running a shared frozen body for many device sessions.

    Parameters
    ----------
    body : TrunkBody
        The frozen body. If it exposes ``parameters()`` (a ``torch.nn.Module``),
        none may require grad.
    spec : SplitSpec
        The server's split; sessions open only with an equal fingerprint.
    max_message_bytes : int
        Largest tensor payload accepted (the transport limit is set to the
        same value by :func:`start_trunk_server`).
    max_sessions : int
        Open sessions allowed at once (Open answers RESOURCE_EXHAUSTED beyond).
    session_ttl_s : float
        Sessions idle longer than this are dropped at the next Open.
    clock : Callable[[], float]
        Monotonic time source in seconds (tests inject a fake one).

    Raises
    ------
    ValueError
        If a limit is not positive or a body parameter requires grad.
    """

    def __init__(
        self,
        body: TrunkBody,
        spec: SplitSpec,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_sessions: int = 256,
        session_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_message_bytes <= 0 or max_sessions <= 0 or not session_ttl_s > 0:
            raise ValueError(
                "max_message_bytes, max_sessions and session_ttl_s must be > 0, got "
                f"{max_message_bytes}, {max_sessions}, {session_ttl_s}"
            )
        params = getattr(body, "parameters", None)
        if callable(params):
            trainable = [p for p in params() if p.requires_grad]
            if trainable:
                raise ValueError(
                    f"the trunk body must be frozen: {len(trainable)} parameter "
                    "tensors require grad (call body.requires_grad_(False))"
                )
        self.body = body
        self.spec = spec
        self.max_message_bytes = max_message_bytes
        self.max_sessions = max_sessions
        self.session_ttl_s = session_ttl_s
        self._clock = clock
        self._fingerprint = spec.fingerprint()
        self._lock = threading.Lock()  # guards _sessions and _usage
        self._sessions: dict[str, _Session] = {}
        self._usage: dict[str, dict[str, int]] = {}

    # --- accounting -------------------------------------------------------

    def usage(self) -> dict[str, dict[str, int]]:
        """Bytes and steps per client since the last :meth:`reset_usage`.

        Returns
        -------
        dict[str, dict[str, int]]
            ``client -> {"up": bytes, "down": bytes, "steps": n}``, where bytes
            are serialized request (up) and reply (down) sizes of every call
            that reached a live session (Open, Forward, Backward).
        """
        with self._lock:
            return {c: dict(u) for c, u in self._usage.items()}

    def reset_usage(self) -> dict[str, dict[str, int]]:
        """Clear the per-client totals; returns them as they were (atomically)."""
        with self._lock:
            old, self._usage = self._usage, {}
        return old

    def open_sessions(self) -> int:
        """Number of sessions currently open."""
        with self._lock:
            return len(self._sessions)

    def end_round(self, server_round: int) -> int:
        """Drop the sessions of ``server_round`` and earlier; return how many.

        Called once a round is aggregated: a device still on it is late and
        its reply would be discarded, while a session whose device vanished
        between Forward and Backward holds that step's activation graph until
        dropped. Sessions busy in a call right now are left to the idle expiry.
        """
        dropped = 0
        with self._lock:
            for sid, s in list(self._sessions.items()):
                if s.round <= server_round and s.lock.acquire(blocking=False):
                    try:
                        del self._sessions[sid]
                        s.pending = None  # free the graph
                    finally:
                        s.lock.release()
                    dropped += 1
        if dropped:
            _log.info(
                "round %d over: dropped %d split session(s)", server_round, dropped
            )
        return dropped

    def _account(self, s: _Session, up: int = 0, down: int = 0, steps: int = 0) -> None:
        """Add traffic to a session (caller holds its lock) and its client's total."""
        s.bytes_up += up
        s.bytes_down += down
        s.steps += steps
        with self._lock:
            u = self._usage.setdefault(s.client, {"up": 0, "down": 0, "steps": 0})
            u["up"] += up
            u["down"] += down
            u["steps"] += steps

    # --- RPCs -------------------------------------------------------------

    def Open(
        self, request: trunk_pb2.OpenRequest, context: grpc.ServicerContext
    ) -> trunk_pb2.OpenReply:
        """Check the spec and start a session."""
        return _serve(context, self._open, request)

    def Forward(
        self, request: trunk_pb2.ForwardRequest, context: grpc.ServicerContext
    ) -> trunk_pb2.ForwardReply:
        """Run the body on one step's activations."""
        return _serve(context, self._forward, request)

    def Backward(
        self, request: trunk_pb2.BackwardRequest, context: grpc.ServicerContext
    ) -> trunk_pb2.BackwardReply:
        """Back-propagate the pending step; return the gradient at the cut."""
        return _serve(context, self._backward, request)

    def Close(
        self, request: trunk_pb2.CloseRequest, context: grpc.ServicerContext
    ) -> trunk_pb2.CloseReply:
        """End a session and return its counters."""
        return _serve(context, self._close, request)

    # --- implementation ---------------------------------------------------

    def _open(self, request: trunk_pb2.OpenRequest) -> trunk_pb2.OpenReply:
        if not request.client:
            raise ProtocolError("field 'client' must be a non-empty name")
        if request.round < 0:
            raise ProtocolError(f"field 'round' must be >= 0, got {request.round}")
        try:
            spec = split_spec_from_json(request.spec_json)
        except SpecMismatchError as exc:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        if spec.fingerprint() != self._fingerprint:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"split spec mismatch: client spec fingerprint {spec.fingerprint()}, "
                f"server spec fingerprint {self._fingerprint} ({self.spec})",
            )
        now = self._clock()
        session_id = uuid.uuid4().hex
        session = _Session(client=request.client, round=request.round, last_used=now)
        with self._lock:
            self._expire(now)
            if len(self._sessions) >= self.max_sessions:
                raise _Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many open sessions ({self.max_sessions}); close some first",
                )
            self._sessions[session_id] = session
        reply = trunk_pb2.OpenReply(
            session_id=session_id,
            max_message_bytes=self.max_message_bytes,
            server_spec_fingerprint=self._fingerprint,
        )
        with session.lock:
            self._account(session, up=request.ByteSize(), down=reply.ByteSize())
        _log.debug("opened split session %s for %s", session_id, request.client)
        return reply

    def _expire(self, now: float) -> None:
        """Drop idle sessions (caller holds ``_lock``); busy ones are kept."""
        for sid, s in list(self._sessions.items()):
            if now - s.last_used > self.session_ttl_s and s.lock.acquire(
                blocking=False
            ):
                try:
                    del self._sessions[sid]
                    s.pending = None  # free the graph
                finally:
                    s.lock.release()
                _log.info("split session %s of %s expired", sid, s.client)

    def _session(self, session_id: str) -> _Session:
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown split session {session_id!r} (closed, expired or never opened)",
            )
        return s

    def _locked(self, session_id: str) -> _Session:
        """Return the session with its lock held, or abort NOT_FOUND."""
        s = self._session(session_id)
        s.lock.acquire()
        with self._lock:
            alive = self._sessions.get(session_id) is s
        if not alive:  # closed or expired while we waited for its lock
            s.lock.release()
            raise _Abort(
                grpc.StatusCode.NOT_FOUND, f"split session {session_id!r} was closed"
            )
        s.last_used = self._clock()
        return s

    def _forward(self, request: trunk_pb2.ForwardRequest) -> trunk_pb2.ForwardReply:
        s = self._locked(request.session_id)
        try:
            self._account(s, up=request.ByteSize())
            if s.pending is not None or request.step != s.next_step:
                raise _out_of_order(s, request.step)
            hidden, mask = self._decode_inputs(request)
            h_in, h_out = self._run_body(hidden, mask, train=request.train)
            reply = trunk_pb2.ForwardReply(
                session_id=request.session_id,
                step=request.step,
                hidden=tensor_to_proto(self._to_wire(h_out)),
            )
            if request.train:
                s.pending = _Pending(step=request.step, h_in=h_in, h_out=h_out)
            else:
                s.next_step += 1
                self._account(s, steps=1)
            self._account(s, down=reply.ByteSize())
            return reply
        finally:
            s.lock.release()

    def _decode_inputs(
        self, request: trunk_pb2.ForwardRequest
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the activations and mask of a Forward request."""
        spec = self.spec
        hidden = tensor_from_proto(
            request.hidden,
            max_bytes=self.max_message_bytes,
            dtype=spec.activation_dtype,
            shape=(-1, -1, spec.hidden_size),
            field="hidden",
        )
        batch, length, _ = hidden.shape
        p = spec.num_prompts
        if batch < 1:
            raise ProtocolError("field 'hidden' has an empty batch")
        if not p < length <= p + spec.max_length:
            raise ProtocolError(
                f"field 'hidden' has {length} positions; expected P + T with "
                f"P = {p} prompts and 1 <= T <= max_length = {spec.max_length}"
            )
        mask = tensor_from_proto(
            request.attention_mask,
            max_bytes=self.max_message_bytes,
            dtype="int64",
            shape=(batch, length),
            field="attention_mask",
        )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ProtocolError("field 'attention_mask' must hold only 0 and 1")
        return hidden, mask

    def _run_body(
        self, hidden: torch.Tensor, mask: torch.Tensor, *, train: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the body; returns ``(h_in, h_out)`` on ``body.device``.

        With ``train`` the input is a fresh leaf that requires grad and the
        output carries the graph; otherwise no graph is built.
        """
        device = self.body.device
        mask = mask.to(device)
        if train:
            with torch.enable_grad():
                h_in = hidden.to(device).requires_grad_()  # a fresh leaf
                h_out = self.body.forward(h_in, mask)
        else:
            h_in = hidden.to(device)
            with torch.no_grad():
                h_out = self.body.forward(h_in, mask)
        _check_output(h_out, hidden.shape)
        if train and not h_out.requires_grad:
            raise RuntimeError("the body output does not depend on its input")
        return h_in, h_out

    def _to_wire(self, t: torch.Tensor) -> torch.Tensor:
        """Detach, cast to the activation dtype and copy to the CPU."""
        dtype = getattr(torch, self.spec.activation_dtype)
        return t.detach().to(dtype=dtype).cpu()  # sync point: device -> host

    def _backward(self, request: trunk_pb2.BackwardRequest) -> trunk_pb2.BackwardReply:
        s = self._locked(request.session_id)
        try:
            self._account(s, up=request.ByteSize())
            pending = s.pending
            if pending is None or pending.step != request.step:
                raise _out_of_order(s, request.step)
            grad = tensor_from_proto(
                request.grad,
                max_bytes=self.max_message_bytes,
                dtype=self.spec.activation_dtype,
                shape=tuple(pending.h_out.shape),
                field="grad",
            )
            try:
                g = grad.to(pending.h_out.device, dtype=pending.h_out.dtype)
                torch.autograd.backward(pending.h_out, g)
            except Exception:
                # The graph may be half consumed: drop it so the device can redo
                # this step's forward.
                s.pending = None
                raise
            g_in = pending.h_in.grad
            if g_in is None:  # the body ignored its input
                g_in = torch.zeros_like(pending.h_in)
            if not self.spec.returns_all_positions:
                g_in = g_in[:, : self.spec.num_prompts]  # (B, P, D)
            reply = trunk_pb2.BackwardReply(
                session_id=request.session_id,
                step=request.step,
                grad=tensor_to_proto(self._to_wire(g_in)),
            )
            s.pending = None
            s.next_step += 1
            self._account(s, down=reply.ByteSize(), steps=1)
            return reply
        finally:
            s.lock.release()

    def _close(self, request: trunk_pb2.CloseRequest) -> trunk_pb2.CloseReply:
        s = self._locked(request.session_id)
        try:
            with self._lock:
                del self._sessions[request.session_id]
            s.pending = None
            return trunk_pb2.CloseReply(
                steps=s.steps, bytes_up=s.bytes_up, bytes_down=s.bytes_down
            )
        finally:
            s.lock.release()


def _out_of_order(s: _Session, step: int) -> _Abort:
    what = (
        f"backward of step {s.pending.step} is pending"
        if s.pending is not None
        else "no training step is pending"
    )
    return _Abort(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"out of order: expected step {s.next_step}, got {step} ({what})",
    )


def _check_output(h_out: torch.Tensor, shape: torch.Size) -> None:
    if not isinstance(h_out, torch.Tensor) or h_out.shape != shape:
        got = tuple(h_out.shape) if isinstance(h_out, torch.Tensor) else type(h_out)
        raise RuntimeError(f"the body returned {got}, expected shape {tuple(shape)}")


def _serve(
    context: grpc.ServicerContext,
    handler: Callable[[Req], Rep],
    request: Req,
) -> Rep:
    """Run a handler, turning our exceptions into gRPC statuses."""
    try:
        return handler(request)
    except _Abort as exc:
        context.abort(exc.code, exc.details)
    except PayloadTooLargeError as exc:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except ProtocolError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Exception as exc:  # a failure of the body: report it, keep serving
        _log.exception("split trunk call failed")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def start_trunk_server(
    service: TrunkService,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls: tuple[bytes, bytes] | None = None,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for ``service``; stop it with ``server.stop(grace)``.

    Parameters
    ----------
    service : TrunkService
        The servicer; its ``max_message_bytes`` becomes the transport's send and
        receive limit (larger messages get RESOURCE_EXHAUSTED).
    host : str
        Interface to bind (an IPv6 literal may be given without brackets).
    port : int
        TCP port; 0 picks a free one.
    tls : tuple[bytes, bytes], optional
        ``(certificate chain PEM, private key PEM)``; plaintext when omitted.
    max_workers : int
        Threads serving calls concurrently.

    Returns
    -------
    tuple[grpc.Server, int]
        The started server and the port it is bound to.

    Raises
    ------
    OSError
        If the address cannot be bound.
    """
    limit = service.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="split-trunk"
        ),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # never share an explicit port silently
        ],
    )
    trunk_pb2_grpc.add_SplitTrunkServicer_to_server(service, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            cert_chain, private_key = tls
            creds = grpc.ssl_server_credentials([(private_key, cert_chain)])
            bound = server.add_secure_port(address, creds)
    except RuntimeError as exc:  # grpc raises RuntimeError on bind failure
        server.stop(None)
        raise OSError(
            f"cannot bind the split trunk server to {address}: {exc}"
        ) from exc
    if bound == 0:
        server.stop(None)
        raise OSError(f"cannot bind the split trunk server to {address}")
    server.start()
    return server, bound
