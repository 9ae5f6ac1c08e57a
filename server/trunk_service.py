"""The split-learning trunk service: the server half of an SFPrompt model.

A device runs the embedding, P soft prompts and the first k frozen blocks; this
service runs the frozen body (the remaining blocks) for it over gRPC
(``protocols/proto/trunk.proto``). One session per device and round:

1. ``Open`` presents the node's label and its grant for this round (a secret
   from its Flower train instruction; :mod:`server.trunk_sessions`), then the
   device's :class:`~protocols.specs.SplitSpec`, which must have the server's
   fingerprint. The session's label and round are the grant's.
2. ``Forward(step=N, train=True)`` reserves the step's activation memory,
   runs the body with autograd on and keeps ``(h_in, h_out)`` pending;
   ``Backward(step=N)`` back-propagates the device's gradient at the body
   output, frees the graph and returns the gradient at the cut (the P prompt
   positions only when k == 0, every position when k > 0). An eval forward
   (``train=False``) runs without a graph and completes step N at once.
3. ``Close`` ends the session and returns its counters.

Every session has its own state and lock, so a refused or failed call in one
never touches another; the body is shared and frozen. Errors map to gRPC status
codes and one-line messages about the request, never about server state: no
grant UNAUTHENTICATED, unknown session NOT_FOUND, wrong order or spec
FAILED_PRECONDITION, a bad frame INVALID_ARGUMENT (the message names the
field), a quota, the memory budget or a too large message RESOURCE_EXHAUSTED,
a failure of the body INTERNAL (details in the server log only).
:meth:`TrunkService.usage` sums bytes per node for the round's byte ledger.

The gRPC server's limits (streams per connection, keepalive, connection
age, message and metadata sizes, the worker pool) are
:class:`server.trunk_transport.TrunkTransport`; its docstring has the table.

Why one slow client cannot fill the worker pool: gRPC Python reads a unary
request *in the worker thread*, so a stream whose request never completes
holds a worker. With W workers, S streams per connection and C calls per
node: one connection pins at most S workers, and only until it is recycled
(age + grace); calls beyond ``maximum_concurrent_rpcs`` (= W) are refused at
once instead of queueing behind stalled ones. Once a request is read its node
is known: it may have C calls in progress, a call waits at most
``lock_wait_s`` for its session, and the body runs only inside admitted
memory, so a node with stalled Backwards cannot hold workers either. With the
defaults (W = 32, S = 4, C = 2, and a device's calls are sequential) one
stalled connection leaves 28 workers, room for 14 nodes at their cap;
starving every device takes 8 stalled connections at once, each recycled
within 11 minutes. Raise ``[split] workers`` with the nodes per round (a
worker costs a thread stack), and keep the trunk's port behind the same
firewall as the SuperLink's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
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
from server.trunk_sessions import (
    ActivationCost,
    Pending,
    Session,
    TrunkLimits,
    TrunkRefusal,
    TrunkSessions,
)
from server.trunk_transport import TrunkTransport

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


class TrunkService(trunk_pb2_grpc.SplitTrunkServicer):
    """gRPC servicer running a shared frozen body for granted device sessions.

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
    limits : TrunkLimits
        Quotas, memory budget and deadlines.
    cost : ActivationCost, optional
        Activation memory of a Forward; measured on ``body`` when omitted.
    clock : Callable[[], float]
        Monotonic time source in seconds (tests inject a fake one).

    Raises
    ------
    ValueError
        If ``max_message_bytes`` is not positive or a body parameter requires
        grad.
    """

    def __init__(
        self,
        body: TrunkBody,
        spec: SplitSpec,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        limits: TrunkLimits | None = None,
        cost: ActivationCost | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
        params = getattr(body, "parameters", None)
        weights: list[torch.Tensor] = list(params()) if callable(params) else []
        trainable = [p for p in weights if p.requires_grad]
        if trainable:
            raise ValueError(
                f"the trunk body must be frozen: {len(trainable)} parameter "
                "tensors require grad (call body.requires_grad_(False))"
            )
        self.body = body
        self.spec = spec
        self.max_message_bytes = max_message_bytes
        self.limits = limits or TrunkLimits()
        self.cost = cost or ActivationCost.measure(
            body.forward,
            hidden_size=spec.hidden_size,
            dtype=getattr(torch, spec.activation_dtype),
            device=body.device,
            exclude=weights,
        )
        self._clock = clock
        self.sessions = TrunkSessions(self.limits, clock)
        self._fingerprint = spec.fingerprint()
        self._lock = threading.Lock()  # guards _usage
        self._usage: dict[str, dict[str, int]] = {}

    # --- rounds and accounting -------------------------------------------

    def grant_round(self, server_round: int, labels: Iterable[str]) -> dict[str, bytes]:
        """Issue this round's secrets (one per sampled node's label).

        Older rounds' grants die; their sessions stay until :meth:`end_round`.
        """
        return self.sessions.grants.issue(server_round, labels)

    def end_round(self, server_round: int) -> int:
        """Revoke the grants of ``server_round`` and earlier, close their sessions.

        Called once a round is aggregated: a device still on it is late and
        its reply would be discarded, while a session whose device vanished
        between Forward and Backward holds that step's graph until closed.
        Returns how many sessions were closed.
        """
        dropped = self.sessions.end_round(server_round)
        if dropped:
            _log.info(
                "round %d over: closed %d split session(s)", server_round, dropped
            )
        return dropped

    def sweep(self) -> int:
        """Free late graphs and close idle sessions (see :class:`TrunkSessions`)."""
        return self.sessions.sweep()

    def usage(self) -> dict[str, dict[str, int]]:
        """Bytes and steps per node since the last :meth:`reset_usage`.

        Returns
        -------
        dict[str, dict[str, int]]
            ``label -> {"up": bytes, "down": bytes, "steps": n}``, where bytes
            are serialized request (up) and reply (down) sizes of every call
            that reached a live session (Open, Forward, Backward).
        """
        with self._lock:
            return {c: dict(u) for c, u in self._usage.items()}

    def reset_usage(self) -> dict[str, dict[str, int]]:
        """Clear the per-node totals; returns them as they were (atomically)."""
        with self._lock:
            old, self._usage = self._usage, {}
        return old

    def open_sessions(self) -> int:
        """Number of sessions currently open."""
        return len(self.sessions)

    def _account(self, s: Session, up: int = 0, down: int = 0, steps: int = 0) -> None:
        """Add traffic to a session (caller holds its lock) and its node's total."""
        s.bytes_up += up
        s.bytes_down += down
        s.steps += steps
        with self._lock:
            u = self._usage.setdefault(s.label, {"up": 0, "down": 0, "steps": 0})
            u["up"] += up
            u["down"] += down
            u["steps"] += steps

    # --- RPCs -------------------------------------------------------------

    def Open(
        self, request: trunk_pb2.OpenRequest, context: grpc.ServicerContext
    ) -> trunk_pb2.OpenReply:
        """Check the grant and the spec, and start a session."""
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
        lim = self.limits
        label = request.client
        if not label or len(label.encode()) > lim.max_name_bytes:
            raise ProtocolError(
                f"field 'client' must be a name of 1 to {lim.max_name_bytes} bytes"
            )
        if len(request.spec_json) > lim.max_spec_bytes:
            raise ProtocolError(
                f"field 'spec_json' is longer than {lim.max_spec_bytes} bytes"
            )
        grant = self.sessions.grants.redeem(label, request.grant)
        try:
            spec = split_spec_from_json(request.spec_json)
        except SpecMismatchError as exc:
            raise TrunkRefusal(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        if spec.fingerprint() != self._fingerprint:
            raise TrunkRefusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"split spec mismatch: the device's spec ({spec.fingerprint()}) is "
                "not this run's; use the spec of this round's instruction",
            )
        session = self.sessions.open(grant)
        reply = trunk_pb2.OpenReply(
            session_id=session.id,
            max_message_bytes=self.max_message_bytes,
            server_spec_fingerprint=self._fingerprint,
        )
        with session.lock:
            self._account(session, up=request.ByteSize(), down=reply.ByteSize())
        _log.debug("opened split session %s for %s", session.id, label)
        return reply

    def _forward(self, request: trunk_pb2.ForwardRequest) -> trunk_pb2.ForwardReply:
        with self.sessions.call(request.session_id) as s:
            self._account(s, up=request.ByteSize())
            if s.pending is not None or request.step != s.next_step:
                raise _out_of_order(s, request.step)
            if request.train:
                self.sessions.check_pending_quota(s)
            batch, length = self._frame_shape(request.hidden)
            # Reserve before anything is decoded or allocated for the frame.
            reserved = self.sessions.budget.reserve(
                s.label, self.cost.bytes(batch, length)
            )
            try:
                hidden, mask = self._decode_inputs(request)
                h_in, h_out = self._run_body(hidden, mask, train=request.train)
                reply = trunk_pb2.ForwardReply(
                    session_id=request.session_id,
                    step=request.step,
                    hidden=tensor_to_proto(self._to_wire(h_out)),
                )
            except BaseException:
                self.sessions.budget.release(s.label, reserved)
                raise
            if request.train:
                pending = Pending(request.step, h_in, h_out, reserved, self._clock())
                self.sessions.set_pending(s, pending)
            else:
                self.sessions.budget.release(s.label, reserved)
                s.next_step += 1
                self._account(s, steps=1)
            self._account(s, down=reply.ByteSize())
            self.sessions.touch(s)
            return reply

    def _frame_shape(self, frame: trunk_pb2.Tensor) -> tuple[int, int]:
        """(B, L) of the ``hidden`` frame, checked from its header only."""
        spec = self.spec
        shape = tuple(frame.shape)
        if len(shape) != 3 or shape[2] != spec.hidden_size or min(shape) < 1:
            raise ProtocolError(
                f"field 'hidden' has shape {list(shape)}; expected "
                f"(B, P + T, {spec.hidden_size}) with B >= 1"
            )
        batch, length, _ = shape
        p = spec.num_prompts
        if not p < length <= p + spec.max_length:
            raise ProtocolError(
                f"field 'hidden' has {length} positions; expected P + T with "
                f"P = {p} prompts and 1 <= T <= max_length = {spec.max_length}"
            )
        return batch, length

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
        with self.sessions.call(request.session_id) as s:
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
                self.sessions.drop_pending(s)
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
            del pending, g_in
            self.sessions.drop_pending(s)
            s.next_step += 1
            self._account(s, down=reply.ByteSize(), steps=1)
            self.sessions.touch(s)
            return reply

    def _close(self, request: trunk_pb2.CloseRequest) -> trunk_pb2.CloseReply:
        with self.sessions.call(request.session_id) as s:
            self.sessions.close(s)
            return trunk_pb2.CloseReply(
                steps=s.steps, bytes_up=s.bytes_up, bytes_down=s.bytes_down
            )


def _out_of_order(s: Session, step: int) -> TrunkRefusal:
    what = (
        f"backward of step {s.pending.step} is pending"
        if s.pending is not None
        else "no training step is pending"
    )
    return TrunkRefusal(
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
    except TrunkRefusal as exc:
        context.abort(exc.code, exc.details)
    except PayloadTooLargeError as exc:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except ProtocolError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Exception:  # a failure of the body: log it, keep serving
        _log.exception("split trunk call failed")
        context.abort(
            grpc.StatusCode.INTERNAL, "the trunk failed on this call; retry the step"
        )
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def start_trunk_server(
    service: TrunkService,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls: tuple[bytes, bytes] | None = None,
    transport: TrunkTransport | None = None,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for ``service``; stop it with ``server.stop(grace)``.

    A daemon thread calls :meth:`TrunkService.sweep` every
    ``transport.sweep_interval_s`` while the server runs, so late graphs and
    idle sessions are freed even when no call arrives.

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
    transport : TrunkTransport, optional
        Worker pool, stream and keepalive limits (defaults when omitted).

    Returns
    -------
    tuple[grpc.Server, int]
        The started server and the port it is bound to.

    Raises
    ------
    OSError
        If the address cannot be bound.
    """
    t = transport or TrunkTransport()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=t.workers, thread_name_prefix="trunk"),
        options=t.options(service.max_message_bytes),
        maximum_concurrent_rpcs=t.max_concurrent_rpcs,
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

    def reap() -> None:  # wait_for_termination is True on timeout
        while server.wait_for_termination(timeout=t.sweep_interval_s):
            service.sweep()

    threading.Thread(target=reap, name="trunk-sweeper", daemon=True).start()
    return server, bound
