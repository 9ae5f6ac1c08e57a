"""Who may use the trunk, and how much of it: grants, sessions, quotas, memory.

The trunk service (:mod:`server.trunk_service`) runs the frozen body for
devices; this module decides whether a call may run at all, before anything
is allocated for it.

Grants
    Each round the ServerApp asks :meth:`GrantBook.issue` for one secret
    (``secrets.token_bytes(32)``) per sampled node; it travels in that node's
    Flower train instruction (over the SuperLink's authenticated channel). An
    ``Open`` must present the node's label and its secret; they are compared in
    constant time, and the session's label and round come from the grant, never
    from the request. Issuing round r, or ending it, revokes every older grant;
    :meth:`TrunkSessions.end_round` also closes the round's sessions.

Quotas (:class:`TrunkLimits`, defaults in the table; ``[split]`` config)

    ======================  ========  ============================================
    limit                   default   what it bounds
    ======================  ========  ============================================
    max_sessions            64        open sessions, server-wide
    sessions_per_node       2         open sessions of one node (a retry + one)
    pending_per_node        1         activation graphs awaiting their Backward
    calls_per_node          2         calls of one node being served at once
    node_memory_bytes       2 GiB     reserved activation memory of one node
    memory_budget_bytes     6 GiB     reserved activation memory, server-wide
    idle_timeout_s          120       a session unused this long is closed
    pending_timeout_s       60        a graph whose Backward is this late is freed
    lock_wait_s             5         wait for a busy session before refusing
    max_name_bytes          128       node label (UTF-8)
    max_spec_bytes          16 KiB    ``spec_json``
    ======================  ========  ============================================

Memory
    :class:`ActivationCost` predicts the bytes a Forward of a (B, L) frame keeps
    (the graph autograd saves for Backward) from the body itself: it is
    measured once with two small probes and scaled by a margin. A Forward
    reserves its prediction in :class:`MemoryBudget` *before* decoding the frame
    (RESOURCE_EXHAUSTED when the node's or the server's share would be
    exceeded); an eval Forward returns it at once, a training one keeps it
    until Backward, the pending deadline, the idle deadline, Close or the end
    of the round.

Refused calls never refresh a session's idle timer: only a call that did its
work does (:meth:`TrunkSessions.touch`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hmac
import logging
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import grpc
import torch

from protocols.split_messages import GRANT_BYTES

__all__ = [
    "GRANT_BYTES",
    "ActivationCost",
    "Grant",
    "GrantBook",
    "MemoryBudget",
    "Pending",
    "Session",
    "TrunkLimits",
    "TrunkRefusal",
    "TrunkSessions",
]

_log = logging.getLogger(__name__)

GiB = 1 << 30


class TrunkRefusal(Exception):
    """A call is refused with a gRPC status and a one-line reason.

    The reason says what was wrong with the *request*; it never names server
    state (spec, fingerprints, other nodes, current usage).
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass(frozen=True, slots=True)
class TrunkLimits:
    """Quotas and deadlines of the trunk (see the module docstring's table)."""

    max_sessions: int = 64
    sessions_per_node: int = 2
    pending_per_node: int = 1
    calls_per_node: int = 2
    node_memory_bytes: int = 2 * GiB
    memory_budget_bytes: int = 6 * GiB
    idle_timeout_s: float = 120.0
    pending_timeout_s: float = 60.0
    lock_wait_s: float = 5.0
    max_name_bytes: int = 128
    max_spec_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"trunk limit {f.name} must be > 0, got {value!r}")
        if self.node_memory_bytes > self.memory_budget_bytes:
            raise ValueError(
                f"node_memory_bytes ({self.node_memory_bytes}) exceeds "
                f"memory_budget_bytes ({self.memory_budget_bytes})"
            )


# --- grants -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """The right of one node to use the trunk in one round."""

    label: str
    server_round: int
    secret: bytes = field(repr=False)


_DENIED = "no valid trunk grant for this node in the current round"


class GrantBook:
    """Per-round, per-node secrets; thread-safe.

    Only the latest issued round's grants are valid: issuing round r revokes
    older ones, and :meth:`revoke_through` ends them explicitly.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}
        self._dummy = secrets.token_bytes(GRANT_BYTES)

    def issue(self, server_round: int, labels: Iterable[str]) -> dict[str, bytes]:
        """Fresh secrets for ``labels`` in ``server_round``; older grants die.

        Returns
        -------
        dict[str, bytes]
            ``label -> secret`` (:data:`GRANT_BYTES` random bytes each).
        """
        issued = {label: secrets.token_bytes(GRANT_BYTES) for label in labels}
        with self._lock:
            self._grants = {
                label: Grant(label, server_round, secret)
                for label, secret in issued.items()
            }
        return issued

    def redeem(self, label: str, secret: bytes) -> Grant:
        """The grant of ``label`` if ``secret`` is its secret.

        Raises
        ------
        TrunkRefusal
            UNAUTHENTICATED, with the same message whether the label is
            unknown, the secret wrong, expired or another node's.
        """
        with self._lock:
            grant = self._grants.get(label)
        expected = grant.secret if grant is not None else self._dummy
        ok = hmac.compare_digest(expected, secret)  # constant time
        if grant is None or not ok:
            raise TrunkRefusal(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        return grant

    def revoke_through(self, server_round: int) -> None:
        """Forget the grants of ``server_round`` and earlier."""
        with self._lock:
            self._grants = {
                k: g for k, g in self._grants.items() if g.server_round > server_round
            }

    def valid(self, label: str, server_round: int) -> bool:
        """Whether ``label`` still holds a grant for ``server_round``."""
        with self._lock:
            grant = self._grants.get(label)
        return grant is not None and grant.server_round == server_round


# --- memory -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActivationCost:
    """Bytes a training Forward of a (B, L) frame keeps until its Backward.

    ``bytes(B, L) = B * (per_token * L + per_token_pair * L**2) + fixed``, where
    the quadratic term is the attention (mask, scores) of every block.
    """

    per_token: int
    per_token_pair: int = 0
    fixed: int = 0

    def bytes(self, batch: int, length: int) -> int:
        """Predicted bytes for a (batch, length) frame."""
        return batch * (self.per_token * length + self.per_token_pair * length**2) + (
            self.fixed
        )

    @classmethod
    def measure(
        cls,
        body: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        exclude: Iterable[torch.Tensor] = (),
        lengths: tuple[int, int] = (8, 16),
        margin: float = 1.5,
    ) -> ActivationCost:
        """Fit the cost of ``body`` from two probe forwards (batch 1).

        Every tensor autograd saves is summed by storage, except ``exclude``
        (the body's own weights); the probe input and output are counted
        too. The fit is exact for a body whose saved memory is linear plus
        quadratic in L; ``margin`` covers transient buffers and allocator
        slack (the bench checks the prediction against measured memory).
        """
        weights = {t.untyped_storage().data_ptr() for t in exclude}
        sizes = []
        for length in lengths:
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
                st = t.untyped_storage()
                if st.data_ptr() not in weights:
                    seen[st.data_ptr()] = st.nbytes()
                return t

            h = torch.zeros(1, length, hidden_size, dtype=dtype, device=device)
            mask = torch.ones(1, length, dtype=torch.int64, device=device)
            with (
                torch.enable_grad(),
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            ):
                out = body(h.requires_grad_(), mask)
            sizes.append(sum(seen.values()) + 2 * out.numel() * out.element_size())
            del out
        (l1, l2), (b1, b2) = lengths, sizes
        # b = a * L + q * L**2 through both probes (q >= 0, a >= 0)
        q = max(0.0, (b2 / l2 - b1 / l1) / (l2 - l1))
        a = max(0.0, b1 / l1 - q * l1)
        return cls(
            per_token=int(a * margin) + 1,
            per_token_pair=int(q * margin) + (1 if q else 0),
        )


class MemoryBudget:
    """Reserved activation bytes per node and server-wide; thread-safe."""

    def __init__(self, total_bytes: int, node_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.node_bytes = node_bytes
        self._lock = threading.Lock()
        self._used = 0
        self._by_node: dict[str, int] = {}

    def reserve(self, label: str, nbytes: int) -> int:
        """Reserve ``nbytes`` for ``label``; return it for :meth:`release`.

        Raises
        ------
        TrunkRefusal
            RESOURCE_EXHAUSTED if the node's share or the server's budget
            would be exceeded (nothing is reserved then).
        """
        with self._lock:
            mine = self._by_node.get(label, 0)
            if mine + nbytes > self.node_bytes:
                raise TrunkRefusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this frame needs about {nbytes} bytes of activation memory, "
                    "over this node's share; send a smaller batch or finish "
                    "pending steps",
                )
            if self._used + nbytes > self.total_bytes:
                raise TrunkRefusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the trunk's memory budget is in use; retry later",
                )
            self._used += nbytes
            self._by_node[label] = mine + nbytes
        return nbytes

    def release(self, label: str, nbytes: int) -> None:
        """Return a reservation."""
        with self._lock:
            self._used -= nbytes
            left = self._by_node.get(label, 0) - nbytes
            if left > 0:
                self._by_node[label] = left
            else:
                self._by_node.pop(label, None)

    def used(self, label: str | None = None) -> int:
        """Reserved bytes of ``label``, or server-wide."""
        with self._lock:
            return self._used if label is None else self._by_node.get(label, 0)


# --- sessions -----------------------------------------------------------------


@dataclass
class Pending:
    """A training step waiting for its Backward call."""

    step: int
    h_in: torch.Tensor  # (B, P + T, D) leaf on body.device, requires grad
    h_out: torch.Tensor  # (B, P + T, D) body output, part of the graph
    reserved: int  # bytes held in the MemoryBudget
    since: float


@dataclass
class Session:
    """State of one device session; mutable fields are guarded by ``lock``."""

    id: str
    label: str
    server_round: int
    last_used: float
    next_step: int = 0
    pending: Pending | None = None
    steps: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class TrunkSessions:
    """The session table with its grants, quotas and memory budget.

    Parameters
    ----------
    limits : TrunkLimits
        Quotas and deadlines.
    clock : Callable[[], float]
        Monotonic seconds (tests inject a fake one).
    """

    def __init__(
        self, limits: TrunkLimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.grants = GrantBook()
        self.budget = MemoryBudget(limits.memory_budget_bytes, limits.node_memory_bytes)
        self._clock = clock
        self._lock = threading.Lock()  # guards _sessions and _calls
        self._sessions: dict[str, Session] = {}
        self._calls: dict[str, int] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, grant: Grant) -> Session:
        """A new session for a redeemed grant.

        Raises
        ------
        TrunkRefusal
            RESOURCE_EXHAUSTED past the node's or the server's session quota.
        """
        now = self._clock()
        self.sweep(now)
        lim = self.limits
        s = Session(uuid.uuid4().hex, grant.label, grant.server_round, last_used=now)
        with self._lock:
            mine = sum(1 for o in self._sessions.values() if o.label == grant.label)
            if mine >= lim.sessions_per_node:
                raise TrunkRefusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this node already has {mine} open session(s), its quota; "
                    "close one first",
                )
            if len(self._sessions) >= lim.max_sessions:
                raise TrunkRefusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the trunk has no free session; retry later",
                )
            self._sessions[s.id] = s
        return s

    @contextmanager
    def call(self, session_id: str) -> Iterator[Session]:
        """Hold a live session for one call (its lock held, its node counted).

        Raises
        ------
        TrunkRefusal
            NOT_FOUND for an unknown or closed session; RESOURCE_EXHAUSTED when
            the node already has ``calls_per_node`` calls in progress or the
            session stays busy for ``lock_wait_s``.
        """
        if len(session_id) > 64:
            raise TrunkRefusal(grpc.StatusCode.INVALID_ARGUMENT, "session_id too long")
        self.sweep()
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise _not_found()
            if self._calls.get(s.label, 0) >= self.limits.calls_per_node:
                raise TrunkRefusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "this node has too many calls in progress; wait for them",
                )
            self._calls[s.label] = self._calls.get(s.label, 0) + 1
        try:
            if not s.lock.acquire(timeout=self.limits.lock_wait_s):
                raise TrunkRefusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the session is busy with another call; retry later",
                )
            try:
                if s.closed:
                    raise _not_found()
                yield s
            finally:
                if s.closed:  # closed (end of round) while this call ran
                    self.drop_pending(s)
                s.lock.release()
        finally:
            with self._lock:
                left = self._calls[s.label] - 1
                if left:
                    self._calls[s.label] = left
                else:
                    del self._calls[s.label]

    def touch(self, s: Session) -> None:
        """Mark a call that did its work (refused calls never touch)."""
        s.last_used = self._clock()

    def check_pending_quota(self, s: Session) -> None:
        """Refuse a training Forward past the node's pending-graph quota."""
        with self._lock:
            mine = sum(
                1
                for o in self._sessions.values()
                if o.label == s.label and o.pending is not None
            )
        if mine >= self.limits.pending_per_node:
            raise TrunkRefusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this node already has {mine} step(s) awaiting Backward, its quota",
            )

    def set_pending(self, s: Session, pending: Pending) -> None:
        """Keep a training step's graph (caller holds the session's lock)."""
        s.pending = pending

    def drop_pending(self, s: Session) -> None:
        """Free the session's graph and its reservation (caller holds its lock)."""
        if s.pending is not None:
            reserved, on_host = s.pending.reserved, s.pending.h_out.device.type == "cpu"
            self.budget.release(s.label, reserved)
            s.pending = None  # the last reference: the graph is freed here
            if on_host and reserved >= _TRIM_BYTES:
                _trim_host_heap()

    def close(self, s: Session) -> None:
        """Remove a session (caller holds its lock); frees its graph."""
        with self._lock:
            self._sessions.pop(s.id, None)
        s.closed = True
        self.drop_pending(s)

    def sweep(self, now: float | None = None) -> int:
        """Free late graphs and close idle sessions; return how many closed.

        A session busy in a call is skipped (its call holds the lock; the next
        sweep sees it).
        """
        now = self._clock() if now is None else now
        lim = self.limits
        with self._lock:
            live = list(self._sessions.values())
        closed = 0
        for s in live:
            if not s.lock.acquire(blocking=False):
                continue
            try:
                p = s.pending
                if p is not None and now - p.since > lim.pending_timeout_s:
                    self.drop_pending(s)
                    _log.info("split session of %s: pending graph freed", s.label)
                if now - s.last_used > lim.idle_timeout_s:
                    self.close(s)
                    closed += 1
                    _log.info("split session of %s expired", s.label)
            finally:
                s.lock.release()
        return closed

    def end_round(self, server_round: int) -> int:
        """Revoke the grants of ``server_round`` and earlier; close their sessions.

        Sessions busy in a call are closed too: they leave the table now and
        their call frees its graph when it returns.
        """
        self.grants.revoke_through(server_round)
        with self._lock:
            ended = [
                s for s in self._sessions.values() if s.server_round <= server_round
            ]
            for s in ended:
                del self._sessions[s.id]
                s.closed = True
        for s in ended:
            if s.lock.acquire(blocking=False):
                try:
                    self.drop_pending(s)
                finally:
                    s.lock.release()
        return len(ended)


_TRIM_BYTES = 64 << 20


def _trim_host_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``).

    Without it a large freed graph stays in the process (glibc keeps freed
    arenas), so the resident size no longer shows what the trunk holds.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "malloc_trim") else None


def _not_found() -> TrunkRefusal:
    return TrunkRefusal(
        grpc.StatusCode.NOT_FOUND,
        "unknown split session (closed, expired or never opened)",
    )
