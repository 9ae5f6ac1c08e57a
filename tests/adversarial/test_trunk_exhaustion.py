"""A granted node cannot exhaust the trunk, and an outsider cannot stall it.

Each refusal is checked for its status, a one-line message that reveals no
server state, and for leaving other sessions, the byte ledger and the memory
budget as they were. Time-based limits run on an injected clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
import torch

from models import load_causal_lm
from models.split import Trunk, split_spec_for
from protocols.proto import trunk_pb2
from protocols.split_wire import split_spec_to_json, tensor_to_proto
from server.trunk_service import TrunkService, start_trunk_server
from server.trunk_sessions import ActivationCost, TrunkLimits
from server.trunk_transport import TrunkTransport
from tests.test_trunk_service import (
    LABELS,
    P,
    Served,
    ToyBody,
    inputs,
    make_spec,
    raises_code,
    train_step,
)

MiB = 1 << 20


def _no_state(details: str, srv: Served) -> None:
    """The message is one line and names no spec, fingerprint or other node."""
    assert "\n" not in details
    assert srv.service.spec.fingerprint() not in details
    assert "toy" not in details
    for label in LABELS:
        assert label not in details


def test_per_node_session_quota(serve, clients) -> None:
    """A node past ``sessions_per_node`` is refused; other nodes still open.

    Breaks if one granted node can take every session slot (256 cheap Opens
    locked every device out).
    """
    srv = serve(limits=TrunkLimits(sessions_per_node=2))
    client = clients(srv.address)
    mine = [client.open(srv.service.spec, "dev-0", srv.grant("dev-0")) for _ in "ab"]
    usage = srv.service.usage()
    with raises_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota") as info:
        client.open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    _no_state(info.value.details, srv)
    assert srv.service.open_sessions() == 2 and srv.service.usage() == usage
    other = client.open(srv.service.spec, "dev-1", srv.grant("dev-1"))
    train_step(other, srv.body, seed=0)
    mine[0].close()
    client.open(srv.service.spec, "dev-0", srv.grant("dev-0"))  # a slot again


class CountingTrunk:
    """A real (tiny Llama) trunk that counts its forward calls."""

    def __init__(self, trunk: Trunk) -> None:
        self.trunk = trunk
        self.device = trunk.device
        self.calls = 0

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.trunk.parameters()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.trunk(hidden, mask)


@pytest.fixture(scope="module")
def tiny_trunk() -> tuple[CountingTrunk, object]:
    loaded = load_causal_lm("tiny-llama", dtype="float32", device=torch.device("cpu"))
    spec = split_spec_for(
        loaded.model, "tiny-llama", num_prompts=2, client_blocks=0, max_length=64
    )
    loaded.model.requires_grad_(False)
    return CountingTrunk(Trunk(loaded.model, spec)), spec


def _saved_bytes(body: CountingTrunk, batch: int, length: int, d: int) -> int:
    """Bytes autograd keeps for one training forward (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in body.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t

    h = torch.randn(batch, length, d).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = body.forward(h, torch.ones(batch, length, dtype=torch.int64))
    return sum(seen.values()) + 2 * out.numel() * out.element_size()


def test_activation_cost_bounds_what_autograd_keeps(tiny_trunk) -> None:
    """The measured cost predicts at least the saved bytes of larger frames.

    Breaks if admission control under-estimates a frame (the budget would be
    exceeded while the accounting says it is not).
    """
    body, spec = tiny_trunk
    cost = ActivationCost.measure(
        body.forward,
        hidden_size=spec.hidden_size,
        dtype=torch.float32,
        device=body.device,
        exclude=list(body.parameters()),
    )
    for batch, length in [(1, 8), (3, 40), (8, 66)]:
        real = _saved_bytes(body, batch, length, spec.hidden_size)
        assert real <= cost.bytes(batch, length) <= 2 * real, (batch, length)


def test_memory_budget_refuses_before_allocating(tiny_trunk, clients) -> None:
    """A frame over the budget is RESOURCE_EXHAUSTED before the body runs.

    Breaks if a Forward allocates first and checks later (one maximal frame
    per session took the server from 0.4 to 6.9 GB), or if a refused frame
    leaves memory accounted.
    """
    body, spec = tiny_trunk
    service = TrunkService(body, spec, limits=TrunkLimits())
    small, big = service.cost.bytes(1, P + 8), service.cost.bytes(4, P + 64)
    budget = small + (small // 2)
    assert big > budget
    limits = TrunkLimits(node_memory_bytes=budget, memory_budget_bytes=budget)
    service = TrunkService(body, spec, limits=limits, cost=service.cost)
    server, port = start_trunk_server(service)
    hd = spec.hidden_size
    try:
        grants = service.grant_round(1, ["dev-0", "dev-1"])
        client = clients(f"127.0.0.1:{port}")
        s = client.open(spec, "dev-0", grants["dev-0"])
        calls = body.calls
        h, m = torch.randn(4, P + 64, hd), torch.ones(4, P + 64, dtype=torch.int64)
        with raises_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "memory") as info:
            s.forward(h, m, train=True)
        assert "\n" not in info.value.details and "dev-1" not in info.value.details
        assert body.calls == calls  # the body never ran
        assert service.sessions.budget.used() == 0
        h1, m1 = torch.randn(1, P + 8, hd), torch.ones(1, P + 8, dtype=torch.int64)
        s.forward(h1, m1, train=True)
        assert service.sessions.budget.used("dev-0") == small
        other = client.open(spec, "dev-1", grants["dev-1"])  # server-wide budget
        with raises_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "budget"):
            other.forward(h1, m1, train=False)
        s.backward(torch.randn(1, P + 8, hd))
        assert service.sessions.budget.used() == 0
        other.forward(h1, m1, train=False)
        assert service.sessions.budget.used() == 0
    finally:
        server.stop(None)


def test_late_graph_is_freed_and_refused_calls_do_not_refresh(serve, clients) -> None:
    """A Forward whose Backward never comes is freed at ``pending_timeout_s``;
    a session that only gets refused calls expires at ``idle_timeout_s``.

    Breaks if a vanished device pins its graph until the round ends, or if one
    refused call every few seconds keeps a session alive past its TTL.
    """
    now = [0.0]
    limits = TrunkLimits(pending_timeout_s=30.0, idle_timeout_s=100.0)
    srv = serve(limits=limits, clock=lambda: now[0])
    client = clients(srv.address)
    idle = client.open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    busy = client.open(srv.service.spec, "dev-1", srv.grant("dev-1"))
    hidden, mask, grad = inputs(0)
    idle.forward(hidden, mask, train=True)
    assert srv.service.sessions.budget.used("dev-0") > 0
    now[0] = 31.0
    srv.service.sweep()
    assert srv.service.sessions.budget.used() == 0  # graph freed, session kept
    with raises_code(grpc.StatusCode.FAILED_PRECONDITION, "no training step"):
        idle.backward(grad)
    for t in (60.0, 90.0, 99.0):  # refused calls only
        now[0] = t
        with raises_code(grpc.StatusCode.FAILED_PRECONDITION):
            idle.backward(grad)
    now[0] = 99.0
    busy.forward(hidden, mask, train=False)  # a successful call refreshes
    now[0] = 101.0
    assert srv.service.sweep() == 1
    with raises_code(grpc.StatusCode.NOT_FOUND):
        idle.forward(hidden, mask, train=False)
    train_step(busy, srv.body, seed=3)


@pytest.mark.parametrize(
    ("field", "value"),
    [("client", "n" * 129), ("client", "x" * (1 << 20)), ("spec_json", "{" * 20000)],
)
def test_oversized_names_are_refused(serve, clients, field, value) -> None:
    """Names and spec over their limits are INVALID_ARGUMENT, not echoed back.

    Breaks if megabyte names are accepted (and stored in the ledger).
    """
    srv = serve()
    client = clients(srv.address)
    request = trunk_pb2.OpenRequest(
        client="dev-0",
        spec_json=split_spec_to_json(srv.service.spec),
        grant=srv.grant("dev-0"),
    )
    setattr(request, field, value)
    with pytest.raises(grpc.RpcError) as info:
        client._stub.Open(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"'{field}'" in info.value.details() and value not in info.value.details()
    assert srv.service.open_sessions() == 0 and srv.service.usage() == {}


def test_oversized_metadata_is_refused(serve, clients) -> None:
    """Call metadata past ``grpc.max_metadata_size`` never reaches the service."""
    srv = serve()
    client = clients(srv.address)
    request = trunk_pb2.OpenRequest(
        client="dev-0",
        spec_json=split_spec_to_json(srv.service.spec),
        grant=srv.grant("dev-0"),
    )
    with pytest.raises(grpc.RpcError) as info:
        client._stub.Open(request, timeout=10, metadata=[("x-pad", "a" * 32768)])
    assert info.value.code() != grpc.StatusCode.OK
    assert srv.service.open_sessions() == 0
    client.open(srv.service.spec, "dev-0", srv.grant("dev-0"))  # still serving


def test_transport_options() -> None:
    """The server bounds streams, pings, idle and old connections, sizes, metadata.

    Breaks if an option is dropped (each closes one exhaustion route).
    """
    opts = dict(TrunkTransport().options(64 * MiB))
    assert opts["grpc.max_concurrent_streams"] == 4
    assert opts["grpc.max_receive_message_length"] == 64 * MiB
    assert opts["grpc.max_metadata_size"] == 8192
    for key in (
        "grpc.keepalive_time_ms",
        "grpc.keepalive_timeout_ms",
        "grpc.http2.max_pings_without_data",
        "grpc.http2.min_recv_ping_interval_without_data_ms",
        "grpc.http2.max_ping_strikes",
        "grpc.max_connection_idle_ms",
        "grpc.max_connection_age_ms",
        "grpc.max_connection_age_grace_ms",
    ):
        assert opts[key] > 0, key
    with pytest.raises(ValueError, match="max_concurrent_rpcs"):
        TrunkTransport(workers=4, max_concurrent_rpcs=8)


def test_stalled_streams_do_not_block_other_clients(serve, clients) -> None:
    """Eight never-finished requests on one connection leave the trunk serving.

    Each stalled stream holds a worker while its request is read; before the
    stream cap, 8 of them took every worker. Breaks if one connection can
    hold more than ``max_concurrent_streams`` workers.
    """
    srv = serve()
    # Its own connection (channels with equal arguments may share one).
    attacker = grpc.insecure_channel(
        srv.address, options=[("grpc.use_local_subchannel_pool", 1)]
    )
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(30)
        return
        yield b""  # a generator that sends nothing

    stall = attacker.stream_unary(
        "/pollinate.split.v1.SplitTrunk/Open",
        request_serializer=None,
        response_deserializer=None,
    )
    futures = [stall.future(never(), timeout=30) for _ in range(8)]
    try:
        device = clients(srv.address)
        s = device.open(srv.service.spec, "dev-0", srv.grant("dev-0"))
        train_step(s, srv.body, seed=0)
        s.close()
    finally:
        release.set()
        for f in futures:
            f.cancel()
        attacker.close()


def test_per_node_call_cap(clients) -> None:
    """A node with ``calls_per_node`` calls in progress is refused at once;
    another node is served meanwhile.

    Breaks if one node's parallel calls can queue up on worker threads.
    """

    class GatedBody(ToyBody):
        def __init__(self) -> None:
            super().__init__()
            self.entered = threading.Event()
            self.go = threading.Event()

        def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            if hidden.shape[0] == 2:  # the gated call
                self.entered.set()
                self.go.wait(10)
            return super().forward(hidden, mask)

    body = GatedBody()
    service = TrunkService(
        body,
        make_spec(),
        limits=TrunkLimits(calls_per_node=1),
        cost=ActivationCost(per_token=1),
    )
    server, port = start_trunk_server(service)
    try:
        grants = service.grant_round(1, ["dev-0", "dev-1"])
        client = clients(f"127.0.0.1:{port}")
        a1 = client.open(service.spec, "dev-0", grants["dev-0"])
        a2 = client.open(service.spec, "dev-0", grants["dev-0"])
        b = client.open(service.spec, "dev-1", grants["dev-1"])
        hidden, mask, _ = inputs(0)
        gated = threading.Thread(
            target=a1.forward, args=(hidden[:2], mask[:2]), kwargs={"train": False}
        )
        gated.start()
        assert body.entered.wait(10)
        with raises_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "calls in progress"):
            a2.forward(hidden, mask, train=False)
        b.forward(hidden, mask, train=False)
        body.go.set()
        gated.join(10)
        a2.forward(hidden, mask, train=False)
    finally:
        body.go.set()
        server.stop(None)


def test_call_waits_for_busy_session_only_briefly(clients) -> None:
    """A second call on a busy session gives up after ``lock_wait_s``."""
    body = ToyBody()
    service = TrunkService(
        body,
        make_spec(),
        limits=TrunkLimits(calls_per_node=2, lock_wait_s=0.05),
        cost=ActivationCost(per_token=1),
    )
    server, port = start_trunk_server(service)
    try:
        grants = service.grant_round(1, ["dev-0"])
        s = clients(f"127.0.0.1:{port}").open(service.spec, "dev-0", grants["dev-0"])
        with service.sessions.call(s.session_id):  # hold the session
            hidden, mask, _ = inputs(0)
            request = trunk_pb2.ForwardRequest(
                session_id=s.session_id,
                step=0,
                hidden=tensor_to_proto(hidden),
                attention_mask=tensor_to_proto(mask),
            )
            with pytest.raises(grpc.RpcError) as info:
                s._client._stub.Forward(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "busy" in info.value.details()
        s.forward(hidden, mask, train=False)
    finally:
        server.stop(None)


def test_per_node_pending_graph_quota(serve, clients) -> None:
    """A node may keep ``pending_per_node`` graphs awaiting Backward, no more.

    Breaks if a node can pin one graph per session (each maximal frame pinned
    about 1.6 GB on tiny-llama).
    """
    srv = serve(limits=TrunkLimits(pending_per_node=1))
    client = clients(srv.address)
    first, second = (
        client.open(srv.service.spec, "dev-0", srv.grant("dev-0")) for _ in "ab"
    )
    hidden, mask, grad = inputs(0)
    first.forward(hidden, mask, train=True)
    used = srv.service.sessions.budget.used()
    with raises_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "awaiting Backward") as info:
        second.forward(hidden, mask, train=True)
    _no_state(info.value.details, srv)
    assert srv.service.sessions.budget.used() == used
    second.forward(hidden, mask, train=False)  # eval keeps no graph: allowed
    first.backward(grad)
    train_step(second, srv.body, seed=4)
