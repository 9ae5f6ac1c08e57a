"""The server's round loop, the same for every method.

One place owns the order of events:

1. wait until the federation's expected number of nodes is accepted, each
   under its stable label, one node per label, proven by the node's key
   when nodes authenticate (:func:`discover_nodes`);
2. evaluate the initial model (round 0);
3. per round: the method's driver instructs the sampled nodes, the replies
   are collected, the driver validates and applies them to the global state,
   the model is evaluated centrally, a ``metrics.jsonl`` row is appended and
   a checkpoint written.

Every payload is measured as serialized into the :class:`~protocols.ByteLedger`.
A method plugs in through the :class:`RoundDriver` protocol.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

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
from server.evaluation import EvalResult
from strategies import Aggregate, LabelledReply, NodeBook, Nodes, Strategy
from strategies.privacy import PrivacyBudgetExhausted
from strategies.sampling import settle_label_claims

__all__ = [
    "Exchange",
    "FederationError",
    "RoundDriver",
    "RoundResult",
    "check_hello_identity",
    "discover_nodes",
    "node_auth_keys",
    "plain_exchange",
    "require_update",
    "run_rounds",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class FederationError(RuntimeError):
    """The federation cannot proceed (too few nodes, every update rejected...)."""


@dataclass
class RoundResult:
    """What a driver reports after applying one round."""

    clients: int
    rejected: int
    train_loss: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    side_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)


class RoundDriver(Protocol):
    """A method's server side: instruct, aggregate-and-apply, evaluate, save.

    The driver holds the global state and its method's strategy; the round
    loop owns the nodes (a :class:`~strategies.NodeBook`), the clock, the
    ledger and the run folder, and hands the driver the round's sampled nodes
    and their labelled replies.
    """

    method: str
    strategy: Strategy[Any, Any]

    def configure(self, server_round: int, nodes: Nodes) -> list[Message]:
        """Build the round's instructions for ``nodes``."""

    def apply(self, server_round: int, replies: Sequence[LabelledReply]) -> RoundResult:
        """Validate replies and update the global state.

        Raises FederationError when no reply is usable (the state is kept).
        """

    def evaluate(self) -> EvalResult:
        """Central evaluation of the current global model."""

    def checkpoint(
        self, folder: RunFolder, server_round: int, extra: dict[str, Any]
    ) -> None:
        """Persist everything needed to continue after ``server_round``."""

    def finish(self, folder: RunFolder) -> None:
        """Write the final artefacts (adapter, model)."""

    def close(self) -> None:
        """Release what the driver started (services), finished or not."""

    def restore(self, folder: RunFolder) -> int:
        """Load the last checkpoint of ``folder``; return its round."""


def require_update(server_round: int, result: Aggregate, new_state: T | None) -> T:
    """The round's new global state, or an error if no reply was usable.

    Raises
    ------
    FederationError
        If ``new_state`` is None: no reply survived validation (the caller
        keeps its previous state).
    """
    if new_state is None:
        total = len(result.accepted) + len(result.rejected)
        raise FederationError(
            f"round {server_round}: no usable update ({total} replies; "
            f"rejected: {result.rejected})"
        )
    return new_state


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


def _checked_hello(
    node: int, reply: Message, nonce: bytes, auth_keys: Path | None
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
    return hello


def _hello_pass(
    grid: Grid,
    nodes: list[int],
    book: _Discovery,
    *,
    timeout_s: float,
    auth_keys: Path | None,
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
        hello = _checked_hello(node, reply, nonces[node], auth_keys)
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
                grid, ask, book, timeout_s=timeout_s, auth_keys=auth_keys
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


def _json_safe(value: Any, where: str, fixed: list[str]) -> Any:
    """``value`` with every non-finite float made None and every non-JSON value a string.

    ``fixed`` collects the dotted paths of what was changed.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isfinite(number):
            return number
        fixed.append(f"{where}={number!r}")
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v, f"{where}.{k}", fixed) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]", fixed) for i, v in enumerate(value)]
    fixed.append(f"{where}={type(value).__name__}")
    return str(value)


def _row(
    server_round: int,
    result: RoundResult,
    ev: EvalResult,
    ledger: ByteLedger,
    seconds: float,
    method: str,
) -> dict[str, Any]:
    """The round's ``metrics.jsonl`` row, always JSON-able (strict, no NaN).

    Sanitized rather than validated: the row records what happened, and a
    value JSON cannot hold (an evaluation that diverged to NaN, an infinite
    loss a driver computed) must neither kill the run nor lose the row, whose
    checkpoint holds a copy. Such a value becomes ``null`` and is logged;
    replies' metrics never get here unchecked (decoders refuse non-finite or
    out-of-bound ones).
    """
    up, down = ledger.round_totals(server_round)
    row = {
        "round": server_round,
        "clients": result.clients,
        "train_loss": result.train_loss,
        "eval_loss": ev.loss,
        "eval_metric": ev.metric,
        "eval_metric_name": ev.metric_name,
        "bytes_up": up,
        "bytes_down": down,
        "seconds": seconds,
        "rejected": result.rejected,
        "method": method,
        **result.extra,
    }
    fixed: list[str] = []
    safe: dict[str, Any] = _json_safe(row, "row", fixed)
    if fixed:
        log.warning(
            "round %d: metrics not JSON-able, recorded as null/text: %s",
            server_round,
            ", ".join(fixed),
        )
    return safe


class Exchange(Protocol):
    """How a round's instructions become labelled replies (and ledger entries).

    :func:`plain_exchange` by default; :func:`server.secure_aggregation.secure_exchange`
    with ``privacy.secagg``.
    """

    def __call__(
        self,
        grid: Grid,
        messages: list[Message],
        timeout_s: float,
        *,
        server_round: int,
        label: Callable[[int], str],
        ledger: ByteLedger,
    ) -> list[LabelledReply]:
        """Send ``messages``; return the replies labelled by ``label`` (node id)."""
        ...


def plain_exchange(
    grid: Grid,
    messages: list[Message],
    timeout_s: float,
    *,
    server_round: int,
    label: Callable[[int], str],
    ledger: ByteLedger,
) -> list[LabelledReply]:
    """One send-and-receive: each reply labelled, every payload in the ledger."""
    for m in messages:
        who = label(m.metadata.dst_node_id)
        ledger.record(server_round, who, "down", payload_bytes(m.content))
    replies = [
        (label(r.metadata.src_node_id), r)
        for r in grid.send_and_receive(messages, timeout=timeout_s)
    ]
    for who, r in replies:
        if r.has_content():
            ledger.record(server_round, who, "up", payload_bytes(r.content))
    return replies


def run_rounds(
    grid: Grid,
    driver: RoundDriver,
    nodes: NodeBook,
    *,
    rounds: int,
    folder: RunFolder,
    timeout_s: float,
    ledger: ByteLedger,
    start_round: int = 0,
    crash_after: int | None = None,
    hold_after: int | None = None,
    min_replies: int = 1,
    exchange: Exchange = plain_exchange,
) -> int:
    """Run rounds ``start_round + 1 .. rounds`` of ``driver``'s method; the last round done.

    ``nodes`` knows the federation's nodes and samples each round's.

    A fresh run (``start_round == 0``) first records round 0, the initial
    model. Each round's checkpoint is written before its ``metrics.jsonl``
    row, both from one row that :func:`_row` made JSON-able, so after a crash every recorded row has a checkpoint at or past it;
    a resumed run drops rows past its checkpoint and redoes them.
    ``crash_after`` (fault injection for tests) kills the process like a
    SIGKILL right after that round is recorded; ``hold_after`` makes it hang
    there instead, until something kills it. ``exchange`` sends a round's
    instructions and returns the labelled replies, recording every payload
    in ``ledger`` (:func:`plain_exchange`; SecAgg+ runs pass
    :func:`server.secure_aggregation.secure_exchange`).

    A run with a privacy budget (``privacy.target_epsilon``) ends early, as a
    completed run with its final artefacts, when the driver refuses to
    configure a round that would spend past it
    (:class:`~strategies.privacy.PrivacyBudgetExhausted`); the return value
    says how many rounds were done.

    Raises
    ------
    FederationError
        If a round has no usable update.
    """
    metrics = folder.metrics_log()
    if start_round == 0:
        metrics.truncate_after(-1)
        t0 = time.monotonic()
        first = driver.evaluate()
        row0 = _row(
            0,
            RoundResult(0, 0, None),
            first,
            ledger,
            time.monotonic() - t0,
            driver.method,
        )
        metrics.append(row0)
    else:
        metrics.truncate_after(start_round)
    done = start_round
    for server_round in range(start_round + 1, rounds + 1):
        t0 = time.monotonic()
        try:
            messages = driver.configure(server_round, nodes.sample(server_round))
        except PrivacyBudgetExhausted as exc:
            log.warning("stopping before round %d: %s", server_round, exc)
            break
        replies = exchange(
            grid,
            messages,
            timeout_s,
            server_round=server_round,
            label=nodes.label,
            ledger=ledger,
        )
        result = driver.apply(server_round, replies)
        if result.clients < min_replies:
            raise FederationError(
                f"round {server_round}: {result.clients} usable replies of "
                f"{len(messages)} sampled clients, the run needs at least {min_replies} "
                "(federation.min_replies); the last checkpoint is round "
                f"{server_round - 1}: resume when clients are back"
            )
        for who, (up, down) in sorted(result.side_bytes.items()):
            ledger.record(server_round, who, "up", up, channel="side")
            ledger.record(server_round, who, "down", down, channel="side")
        ev = driver.evaluate()
        row = _row(
            server_round, result, ev, ledger, time.monotonic() - t0, driver.method
        )
        driver.checkpoint(
            folder, server_round, {"metrics": row, "ledger": ledger.to_json()}
        )
        metrics.append(row)
        log.info("round %d/%d: %s", server_round, rounds, row)
        if crash_after == server_round:
            log.error(
                "fault injection: killing the server after round %d", server_round
            )
            os._exit(137)
        if hold_after == server_round:
            log.error(
                "fault injection: holding the server after round %d", server_round
            )
            threading.Event().wait()  # until the process is killed
        done = server_round
    driver.finish(folder)
    return done
