"""Device side of the split-learning trunk service: a thin gRPC client.

:class:`TrunkClient` owns one channel to the server's ``SplitTrunk`` service
(``protocols/proto/trunk.proto``); :meth:`TrunkClient.open` starts a
:class:`TrunkSession` for one client and round. A session numbers its steps
itself: a training step is ``forward(..., train=True)`` then ``backward(grad)``;
an eval step is ``forward(..., train=False)`` alone. The server enforces the
order; any refusal arrives as :class:`TrunkError` with the gRPC status code, and
a refused call leaves the session where it was, so the caller may retry.

Typical use (k == 0: only the prompt positions get a gradient back)::

    with TrunkClient(address) as trunk, trunk.open(spec, "dev-3", grant) as s:
        h_cut = head(input_ids)  # (B, P + T, D), requires grad through the prompts
        out = s.forward(h_cut, mask, train=True).to(dev).requires_grad_()
        tail_loss(out, labels).backward()
        g_cut = s.backward(out.grad)  # (B, P, D); (B, P + T, D) when k > 0
        h_cut[:, :P].backward(g_cut.to(dev))
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar

import grpc
import torch
from google.protobuf.message import Message

from protocols.errors import ProtocolError
from protocols.proto import trunk_pb2, trunk_pb2_grpc
from protocols.specs import SplitSpec
from protocols.split_wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    split_spec_to_json,
    tensor_from_proto,
    tensor_to_proto,
)

__all__ = ["TrunkClient", "TrunkError", "TrunkSession"]

Req = TypeVar("Req", bound=Message)
Rep = TypeVar("Rep", bound=Message)


class TrunkError(RuntimeError):
    """The trunk server refused a call or could not be reached.

    Attributes
    ----------
    code : grpc.StatusCode
        The gRPC status (NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT,
        RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...).
    details : str
        The server's explanation.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class TrunkClient:
    """A channel to a trunk server; a context manager that closes it.

    Parameters
    ----------
    address : str
        ``host:port`` of the server.
    root_certificates : bytes, optional
        PEM root certificates: TLS when given, plaintext otherwise.
    max_message_bytes : int
        Send and receive limit of the channel.
    timeout_s : float
        Deadline of each call, in seconds.
    """

    def __init__(
        self,
        address: str,
        *,
        root_certificates: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout_s: float = 120.0,
    ) -> None:
        if max_message_bytes <= 0 or not timeout_s > 0:
            raise ValueError(
                "max_message_bytes and timeout_s must be > 0, got "
                f"{max_message_bytes}, {timeout_s}"
            )
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if root_certificates is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, creds, options=options)
        self._stub = trunk_pb2_grpc.SplitTrunkStub(self._channel)

    def open(self, spec: SplitSpec, client: str, grant: bytes) -> TrunkSession:
        """Start a session for node ``client`` with this round's ``grant``.

        The grant (from the round's instruction) decides the round; the
        server refuses a session without the node's current grant.

        Raises
        ------
        TrunkError
            UNAUTHENTICATED without a valid grant for ``client``,
            FAILED_PRECONDITION if the server's spec differs,
            RESOURCE_EXHAUSTED past a session quota, UNAVAILABLE if the server
            cannot be reached.
        ProtocolError
            If the server's reply names another fingerprint than ``spec``'s.
        """
        request = trunk_pb2.OpenRequest(
            client=client, spec_json=split_spec_to_json(spec), grant=grant
        )
        reply = self._call(self._stub.Open, request)
        if reply.server_spec_fingerprint != spec.fingerprint():
            raise ProtocolError(
                f"server opened a session for spec {reply.server_spec_fingerprint}, "
                f"this device runs {spec.fingerprint()}"
            )
        session = TrunkSession(self, spec, reply.session_id, reply.max_message_bytes)
        session.bytes_up += request.ByteSize()
        session.bytes_down += reply.ByteSize()
        return session

    def _call(self, method: Callable[..., Rep], request: Req) -> Rep:
        """Invoke a unary RPC, turning gRPC errors into :class:`TrunkError`."""
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            details = exc.details() if callable(getattr(exc, "details", None)) else ""
            raise TrunkError(code or grpc.StatusCode.UNKNOWN, details or "") from exc

    def close(self) -> None:
        """Close the channel (open sessions expire on the server)."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TrunkSession:
    """One device's session with the trunk server; made by :meth:`TrunkClient.open`.

    Attributes
    ----------
    session_id : str
        The server's id of this session.
    step : int
        Number of the next step (completed steps so far).
    pending : bool
        A training forward awaits its backward.
    bytes_up, bytes_down : int
        Serialized sizes of the requests sent and the replies received
        (Open, Forward, Backward); equal to the server's counters when no call
        was refused (a refused request counts here even if it never reached
        the session).
    server_max_message_bytes : int
        The server's payload limit, from its Open reply.
    """

    def __init__(
        self,
        client: TrunkClient,
        spec: SplitSpec,
        session_id: str,
        server_max_message_bytes: int,
    ) -> None:
        self._client = client
        self.spec = spec
        self.session_id = session_id
        self.server_max_message_bytes = server_max_message_bytes
        self.step = 0
        self.pending = False
        self.bytes_up = 0
        self.bytes_down = 0
        self._closed: dict[str, int] | None = None
        self._shape: tuple[int, ...] = ()

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, train: bool
    ) -> torch.Tensor:
        """Send the activations at the cut; return the body output.

        Parameters
        ----------
        hidden : torch.Tensor
            (B, P + T, D) in the spec's activation dtype, any device (it is
            detached and copied to the CPU).
        attention_mask : torch.Tensor
            (B, P + T) int64 of 0/1.
        train : bool
            Keep the server's graph for :meth:`backward`; an eval step
            (``False``) completes at once.

        Returns
        -------
        torch.Tensor
            (B, P + T, D) on the CPU in the activation dtype. Non-finite values
            are passed through (the loss decides what to do with them).

        Raises
        ------
        TrunkError
            If the server refuses the call; the session is unchanged.
        ProtocolError
            If a tensor's dtype cannot travel, or the reply is malformed.
        """
        request = trunk_pb2.ForwardRequest(
            session_id=self.session_id,
            step=self.step,
            hidden=tensor_to_proto(hidden),
            attention_mask=tensor_to_proto(attention_mask),
            train=train,
        )
        reply = self._exchange(self._client._stub.Forward, request)
        self._check_reply(reply.session_id, reply.step)
        shape = tuple(hidden.shape)
        out = tensor_from_proto(
            reply.hidden,
            max_bytes=self._client.max_message_bytes,
            dtype=self.spec.activation_dtype,
            shape=shape,
            allow_nonfinite=True,
            field="hidden",
        )
        if train:
            self.pending = True
            self._shape = shape
        else:
            self.step += 1
        return out

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """Send the gradient at the body output; return the gradient at the cut.

        Parameters
        ----------
        grad : torch.Tensor
            (B, P + T, D) in the activation dtype, finite: d loss / d body output
            of the pending training step.

        Returns
        -------
        torch.Tensor
            On the CPU in the activation dtype: (B, P, D) for the prompt
            positions when the device holds no block, else (B, P + T, D).

        Raises
        ------
        TrunkError
            FAILED_PRECONDITION if no training step is pending, INVALID_ARGUMENT
            for a bad gradient (the step stays pending), and so on.
        ProtocolError
            If the reply is malformed.
        """
        request = trunk_pb2.BackwardRequest(
            session_id=self.session_id, step=self.step, grad=tensor_to_proto(grad)
        )
        reply = self._exchange(self._client._stub.Backward, request)
        self._check_reply(reply.session_id, reply.step)
        b, length, d = self._shape if self.pending else tuple(grad.shape)
        positions = length if self.spec.returns_all_positions else self.spec.num_prompts
        out = tensor_from_proto(
            reply.grad,
            max_bytes=self._client.max_message_bytes,
            dtype=self.spec.activation_dtype,
            shape=(b, positions, d),
            allow_nonfinite=True,
            field="grad",
        )
        self.pending = False
        self.step += 1
        return out

    def close(self) -> dict[str, int]:
        """End the session; returns the server's counters (idempotent).

        Returns
        -------
        dict[str, int]
            ``{"steps", "bytes_up", "bytes_down"}`` as the server counted them.

        Raises
        ------
        TrunkError
            NOT_FOUND if the server no longer knows the session.
        """
        if self._closed is None:
            request = trunk_pb2.CloseRequest(session_id=self.session_id)
            reply = self._client._call(self._client._stub.Close, request)
            self._closed = {
                "steps": reply.steps,
                "bytes_up": reply.bytes_up,
                "bytes_down": reply.bytes_down,
            }
        return dict(self._closed)

    def _exchange(self, method: Callable[..., Rep], request: Req) -> Rep:
        """Call and count the serialized bytes both ways."""
        self.bytes_up += request.ByteSize()
        reply = self._client._call(method, request)
        self.bytes_down += reply.ByteSize()
        return reply

    def _check_reply(self, session_id: str, step: int) -> None:
        """Reject a reply that answers another session or step."""
        if session_id != self.session_id or step != self.step:
            raise ProtocolError(
                f"reply for session {session_id!r} step {step} to a request for "
                f"{self.session_id!r} step {self.step}"
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._closed is None:
            try:
                self.close()
            except TrunkError:
                if exc_type is None:
                    raise
