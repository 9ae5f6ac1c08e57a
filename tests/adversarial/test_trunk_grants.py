"""Who may open a trunk session: only a node the server sampled, this round.

An attacker who reaches the trunk's port holds no grant: every Open without
the node's current secret is refused with one UNAUTHENTICATED message that
names no label, round or spec, and leaves the sessions, the byte ledger and
the memory budget as they were. The round a session belongs to is the grant's,
so a claimed far-future round cannot keep a session past ``end_round``.
"""

from __future__ import annotations

import secrets

import grpc
import pytest

from protocols.proto import trunk_pb2
from protocols.split_wire import split_spec_to_json
from tests.test_trunk_service import (
    Served,
    inputs,
    make_spec,
    raises_code,
    train_step,
)

DENIED = "no valid trunk grant for this node in the current round"


def _state(srv: Served) -> tuple[int, dict[str, dict[str, int]], int]:
    return (
        srv.service.open_sessions(),
        srv.service.usage(),
        srv.service.sessions.budget.used(),
    )


def _refused_open(srv: Served, client, label: str, grant: bytes) -> str:
    """Open must fail UNAUTHENTICATED; returns the message."""
    with raises_code(grpc.StatusCode.UNAUTHENTICATED) as info:
        client.open(srv.service.spec, label, grant)
    return info.value.details


def test_open_without_wrong_or_another_nodes_grant_is_refused(serve, clients) -> None:
    """Missing, wrong, truncated and another node's secrets are all refused alike.

    Breaks if the trunk serves whoever reaches its port, if a node can use
    another's grant, or if the message tells an attacker which labels exist.
    """
    srv = serve()
    client = clients(srv.address)
    victim = client.open(srv.service.spec, "dev-a", srv.grant("dev-a"))
    hidden, mask, _ = inputs(0)
    victim.forward(hidden, mask, train=True)  # a pending step to protect
    before = _state(srv)
    attempts = [
        ("dev-b", b""),
        ("dev-b", secrets.token_bytes(32)),
        ("dev-b", srv.grant("dev-a")),  # node A's secret used by node B
        ("dev-b", srv.grant("dev-b")[:16]),
        ("intruder", srv.grant("dev-a")),
    ]
    messages = {_refused_open(srv, client, label, g) for label, g in attempts}
    assert messages == {DENIED}
    assert _state(srv) == before
    victim.backward(inputs(0)[2])  # the victim's step is untouched
    train_step(victim, srv.body, seed=1)


def test_unauthenticated_open_learns_nothing_about_the_spec(serve, clients) -> None:
    """Without a grant, even a wrong spec only gets UNAUTHENTICATED.

    Breaks if the spec check runs before the grant check (it would tell an
    outsider whether its guess of the split is right).
    """
    srv = serve()
    client = clients(srv.address)
    other = make_spec(client_blocks=1)
    with raises_code(grpc.StatusCode.UNAUTHENTICATED, DENIED) as info:
        client.open(other, "dev-0", b"x" * 32)
    assert other.fingerprint() not in info.value.details
    assert srv.service.spec.fingerprint() not in info.value.details


def test_grants_die_with_their_round_and_so_do_sessions(serve, clients) -> None:
    """end_round(1) refuses round-1 secrets and closes round-1 sessions.

    Breaks if a secret outlives its round, or a session of an ended round
    keeps its pending graph (and memory reservation) alive.
    """
    srv = serve()
    client = clients(srv.address)
    old = client.open(srv.service.spec, "dev-0", srv.grant("dev-0"))
    hidden, mask, grad = inputs(0)
    old.forward(hidden, mask, train=True)
    assert srv.service.sessions.budget.used() > 0
    fresh = srv.service.grant_round(2, ["dev-0", "dev-1"])
    # Issuing round 2 revokes round 1's secrets at once ...
    assert _refused_open(srv, client, "dev-0", srv.grant("dev-0")) == DENIED
    keep = client.open(srv.service.spec, "dev-1", fresh["dev-1"])
    assert srv.service.end_round(1) == 1
    # ... and ending round 1 closes its sessions and frees their graphs.
    assert srv.service.sessions.budget.used() == 0
    with raises_code(grpc.StatusCode.NOT_FOUND):
        old.backward(grad)
    train_step(keep, srv.body, seed=2)
    srv.service.end_round(2)
    assert srv.service.open_sessions() == 0
    assert _refused_open(srv, client, "dev-1", fresh["dev-1"]) == DENIED


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_claimed_round_is_ignored(serve, clients) -> None:
    """An Open claiming round 2**62 (old field 3) gets the grant's round.

    Breaks if the client's claim decides the round: such a session survived
    every ``end_round`` and pinned its graph forever.
    """
    srv = serve()
    client = clients(srv.address)
    request = trunk_pb2.OpenRequest(
        client="dev-0",
        spec_json=split_spec_to_json(srv.service.spec),
        grant=srv.grant("dev-0"),
    )
    raw = request.SerializeToString() + b"\x18" + _varint(2**62)  # field 3, varint
    open_raw = client._channel.unary_unary(
        "/pollinate.split.v1.SplitTrunk/Open",
        request_serializer=None,
        response_deserializer=trunk_pb2.OpenReply.FromString,
    )
    reply = open_raw(raw, timeout=10)
    assert srv.service.open_sessions() == 1
    assert srv.service.end_round(1) == 1
    assert srv.service.open_sessions() == 0
    close = client._stub.Close
    with pytest.raises(grpc.RpcError) as info:
        close(trunk_pb2.CloseRequest(session_id=reply.session_id), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
