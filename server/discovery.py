"""Node discovery: who takes part in a run, each under one proven label.

Before round 0 the server asks every connecting node for its hello
(:func:`discover_nodes`): a stable label, its example count and, when the
server authenticates nodes, its signature of a fresh nonce
(:func:`check_hello_identity` against ``<auth_keys>/<label>.pub``, the folder
:func:`node_auth_keys` reads from the run folder). A label goes to one node
for the run; a node whose hello is bad, unproven or late is refused or asked
once more, never waited for forever. :mod:`server.federation`, the round
loop, re-exports every name here.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid

from protocols import (
    MESSAGE_HELLO,
    ByteLedger,
    NodeHello,
    ProtocolError,
    decode_hello,
    payload_bytes,
)
from protocols.identity import (
    NONCE_BYTES,
    IdentityError,
    check_key_name,
    verify_hello,
)
from protocols.messages import encode_hello_ins
from protocols.run_folder import RunFolder
from protocols.specs import LoraSpec
from strategies.sampling import settle_label_claims

__all__ = [
    "FederationError",
    "check_hello_identity",
    "discover_nodes",
    "hello_rank",
    "node_auth_keys",
]

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation cannot proceed (too few nodes, every update rejected...).

    Defined here, where the federation is assembled and can first fail;
    :mod:`server.federation` raises it too and re-exports it.
    """


def node_auth_keys(folder: RunFolder) -> Path | None:
    """The folder of registered node keys if this run's server authenticates nodes.

    Read from the run folder's ``server.json`` (written by ``pollinate server
    start --auth-keys DIR`` before the run is submitted); None in simulation
    and for a server without node authentication.

    Raises
    ------
    server.processes.DeployError
        If ``server.json`` is damaged (the run must not start unauthenticated).
    """
    from server.deploy import read_server_info

    info = read_server_info(folder.path)
    return Path(info.auth_keys) if info is not None and info.auth_keys else None


def check_hello_identity(
    auth_keys: Path, node_id: int, nonce: bytes, hello: NodeHello
) -> None:
    """Check that ``hello`` proves its label: signed with ``auth_keys/<label>.pub``'s key.

    Raises
    ------
    protocols.identity.IdentityError
        If the label cannot name a key, no key is registered under it, or the
        signature of (nonce, label, node id) does not verify with it.
    """
    key = auth_keys / f"{check_key_name(hello.label)}.pub"
    try:
        public = key.read_bytes()
    except OSError:
        raise IdentityError(f"no key is registered for this label ({key})") from None
    verify_hello(public, nonce, hello.label, node_id, hello.signature)


_POLL_S = 0.2
"""Seconds between two looks at the grid's node ids (Flower has no wait-for-nodes call)."""

_HELLO_TRIES = 2
"""Hellos a node is sent at most: a second only after one it did not answer
within the timeout or answered with an error reply."""


@dataclass
class _Discovery:
    """What :func:`discover_nodes` knows of each node id it has asked."""

    accepted: dict[int, str] = field(default_factory=dict)
    """Node id to the label it holds for the run."""
    refused: set[int] = field(default_factory=set)
    """Nodes whose hello was refused (bad, unproven, a held label): never asked again."""
    failed: dict[int, int] = field(default_factory=dict)
    """Node id to its hellos that got no answer or an error reply."""
    sent: dict[int, int] = field(default_factory=dict)
    """Node id to the hello bytes sent to it, every try together."""

    def askable(self, connected: Sequence[int]) -> list[int]:
        """The ``connected`` nodes a hello may still go to, in node id order."""
        return sorted(
            n
            for n in set(connected)
            if n not in self.accepted
            and n not in self.refused
            and self.failed.get(n, 0) < _HELLO_TRIES
        )

    def fail(self, node: int, reason: str) -> None:
        """Count a hello ``node`` did not answer usefully; log whether it is retried."""
        tries = self.failed[node] = self.failed.get(node, 0) + 1
        if tries < _HELLO_TRIES:
            log.warning(
                "node %d: hello failed, it will be asked once more: %s", node, reason
            )
        else:
            log.warning("node %d left out: %s", node, reason)

    def shortfall(
        self, expected: int, timeout_s: float, connected: Sequence[int]
    ) -> str:
        """The message when discovery ends before ``expected`` were accepted."""
        gave_up = sum(1 for tries in self.failed.values() if tries >= _HELLO_TRIES)
        none = (
            "no node answered the hello with usable data: " if not self.accepted else ""
        )
        return (
            f"{none}only {len(self.accepted)} of {expected} nodes accepted within "
            f"{timeout_s:g} s: {len(self.refused)} refused at hello, {gave_up} "
            f"left out after {_HELLO_TRIES} unanswered or failed hellos, "
            f"{len(self.askable(connected))} connected and still to be asked "
            f"({len(connected)} connected in all)"
        )


def hello_rank(hello: NodeHello, lora: LoraSpec) -> int:
    """The LoRA rank ``hello``'s node trains under ``lora``.

    The rank it reported, or the global rank ``lora.rank`` if it reported
    none.

    Raises
    ------
    FederationError
        If that rank is not one of ``lora.allowed_ranks()``; the message names
        the label, the rank and the allowed ranks.
    """
    rank = lora.rank if hello.lora_rank is None else hello.lora_rank
    allowed = lora.allowed_ranks()
    if rank not in allowed:
        said = "reports" if hello.lora_rank is not None else "reports no rank, so"
        raise FederationError(
            f"label {hello.label!r} {said} LoRA rank {rank}, not one of the "
            f"run's ranks {list(allowed)} (pollinate client join --lora-rank N)"
        )
    return rank


def _checked_hello(
    node: int,
    reply: Message,
    nonce: bytes,
    auth_keys: Path | None,
    lora: LoraSpec | None = None,
) -> NodeHello | None:
    """``node``'s hello reply (not an error), or None (logged) if refused."""
    try:
        hello = decode_hello(reply.content)
    except ProtocolError as exc:
        log.warning("node %d left out: bad hello: %s", node, exc)
        return None
    if auth_keys is not None:
        try:
            check_hello_identity(auth_keys, node, nonce, hello)
        except IdentityError as exc:
            log.warning("node %d left out: claims label %r: %s", node, hello.label, exc)
            return None
    if lora is not None:
        try:
            hello_rank(hello, lora)
        except FederationError as exc:
            log.warning("node %d left out: %s", node, exc)
            return None
    return hello


def _hello_pass(
    grid: Grid,
    nodes: list[int],
    book: _Discovery,
    *,
    timeout_s: float,
    auth_keys: Path | None,
    lora: LoraSpec | None = None,
) -> dict[int, tuple[NodeHello, int]]:
    """Send one hello to each of ``nodes``; return node id to (hello, reply bytes).

    Only claims whose hello checks out are returned; ``book`` learns the
    refused nodes (bad or unproven hello, answered twice), the failed ones
    (error reply, or no reply within ``timeout_s``) and the bytes sent.
    """
    nonces = {n: secrets.token_bytes(NONCE_BYTES) for n in nodes}
    msgs = [
        Message(encode_hello_ins(nonce), dst_node_id=n, message_type=MESSAGE_HELLO)
        for n, nonce in nonces.items()
    ]
    for m in msgs:
        node = m.metadata.dst_node_id
        book.sent[node] = book.sent.get(node, 0) + payload_bytes(m.content)
    claims: dict[int, tuple[NodeHello, int]] = {}
    answered: set[int] = set()
    for reply in grid.send_and_receive(msgs, timeout=timeout_s):
        node = reply.metadata.src_node_id
        if node not in nonces:
            log.warning("ignored a hello reply from node %d, which was not asked", node)
            continue
        if node in answered:
            log.warning("node %d left out: it answered a hello twice", node)
            claims.pop(node, None)
            book.refused.add(node)
            continue
        answered.add(node)
        if reply.has_error():
            book.fail(node, reply.error.reason or f"error {reply.error.code}")
            continue
        hello = _checked_hello(node, reply, nonces[node], auth_keys, lora)
        if hello is None:
            book.refused.add(node)
        else:
            claims[node] = (hello, payload_bytes(reply.content))
    for node in nodes:
        if node not in answered:
            book.fail(node, f"no answer to the hello within {timeout_s:.0f} s")
    return claims


def discover_nodes(
    grid: Grid,
    *,
    expected: int,
    timeout_s: float,
    ledger: ByteLedger,
    auth_keys: Path | None = None,
    minimum: int | None = None,
    late_join_s: float | None = None,
    counts: dict[str, int] | None = None,
    lora: LoraSpec | None = None,
    ranks: dict[str, int] | None = None,
) -> dict[int, str]:
    """Ask connecting nodes for their labels until ``expected`` are accepted.

    The grid's node ids are polled every 0.2 s. The first hellos go out together
    once ``expected`` nodes are connected; after that, each poll sends one to
    every node that connected since (and to any due a second try). Each hello
    carries a fresh nonce.

    With ``auth_keys`` (the server authenticates nodes) a label is a key name: a
    hello is accepted only if signed with the key registered as
    ``auth_keys/<label>.pub`` (:func:`check_hello_identity`). A label goes to
    one node id for the run (:func:`strategies.sampling.settle_label_claims`): a
    label accepted at an earlier poll keeps its holder, even against a lower
    node id, and one first claimed by several nodes in one poll goes to the
    lowest node id. Every claim lost that way, a bad or unproven hello, or a
    second answer to one hello refuses the node for the run: it is never asked
    again and never counts toward ``expected``, so the holder's updates are
    never rejected as duplicates and a node that connects later is still asked.

    A node that answers with an error (e.g. no local data) or not within
    ``timeout_s`` is asked once more at a later poll, if ``timeout_s`` has not
    passed, then left out. Each refusal and failure is logged on one line naming
    the node id (and the label claimed, if any). The ledger's round 0 records,
    per accepted label, the hello bytes sent to it (every try) and its accepted
    reply.

    ``counts``, when given, receives each accepted label's example count as
    its hello reported it (the cap on the weight its updates can claim).
    With ``lora`` (a LoRA run's spec) a node whose LoRA rank the spec does
    not allow is refused (:func:`hello_rank`), and ``ranks``, when given,
    receives each accepted label's rank.

    Returns node id to label, every label once, in node id order: at least
    ``expected`` nodes (more if more answered the last hellos together), or,
    once ``timeout_s`` has passed, the ``minimum`` or more accepted by then
    (a broken or refused node must not stop a federation that can train
    without it; the shortfall is logged). With ``late_join_s``, discovery
    ends sooner: once ``expected`` nodes connected and every connected node
    is settled (accepted, refused or given up) for ``late_join_s`` with no
    newcomer, it goes on with the ``minimum`` or more accepted (or fails).
    Hellos start only before ``timeout_s`` has passed and each waits at most
    ``timeout_s`` for replies, so this returns or raises within about
    ``2 * timeout_s``.

    Raises
    ------
    ValueError
        If ``expected < 1``.
    FederationError
        If fewer than ``minimum`` (default ``expected``) nodes are accepted
        within ``timeout_s``; the message counts the accepted, refused and
        failed nodes.
    """
    if expected < 1:
        raise ValueError(f"expected must be >= 1, got {expected}")
    minimum = expected if minimum is None else minimum
    if not 1 <= minimum <= expected:
        raise ValueError(f"minimum must be in [1, {expected}], got {minimum}")
    deadline = time.monotonic() + timeout_s
    book = _Discovery()
    settled_since: float | None = None  # every connected node answered, since
    while True:
        connected = list(grid.get_node_ids())
        ask = book.askable(connected)
        if ask or len(connected) < expected:
            settled_since = None
        elif settled_since is None:
            settled_since = time.monotonic()
        if ask and (book.sent or len(connected) >= expected):
            claims = _hello_pass(
                grid, ask, book, timeout_s=timeout_s, auth_keys=auth_keys, lora=lora
            )
            wanted = {node: hello.label for node, (hello, _) in claims.items()}
            labels, refused = settle_label_claims(wanted, held=book.accepted)
            for node, reason in sorted(refused.items()):
                log.warning(
                    "node %d left out: claims label %r: %s", node, wanted[node], reason
                )
                book.refused.add(node)
            for node, label in sorted(labels.items()):
                book.accepted[node] = label
                ledger.record(0, label, "down", book.sent[node])
                ledger.record(0, label, "up", claims[node][1])
                if counts is not None:
                    counts[label] = claims[node][0].num_examples
                if ranks is not None and lora is not None:
                    ranks[label] = hello_rank(claims[node][0], lora)
            if len(book.accepted) >= expected:
                return dict(sorted(book.accepted.items()))
        late = (
            late_join_s is not None
            and settled_since is not None
            and time.monotonic() - settled_since >= late_join_s
        )
        if late or time.monotonic() > deadline:
            shortfall = book.shortfall(expected, timeout_s, connected)
            if len(book.accepted) >= minimum:
                log.warning("%s; going on with them", shortfall)
                return dict(sorted(book.accepted.items()))
            raise FederationError(shortfall)
        time.sleep(_POLL_S)  # polling the grid: Flower offers no wait-for-nodes call
