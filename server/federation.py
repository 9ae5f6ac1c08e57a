"""The server's round loop, the same for every method.

One place owns the order of events:

1. wait for the federation to assemble and learn each node's stable label;
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
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from protocols import (
    MESSAGE_HELLO,
    ByteLedger,
    ProtocolError,
    decode_hello,
    payload_bytes,
)
from server.checkpoints import MetricsLog
from server.evaluation import EvalResult

__all__ = [
    "FederationError",
    "RoundDriver",
    "RoundResult",
    "discover_nodes",
    "run_rounds",
]

log = logging.getLogger(__name__)


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
    """A method's server side: instruct, aggregate-and-apply, evaluate, save."""

    method: str

    def set_nodes(self, node_labels: dict[int, str]) -> None:
        """Learn the federation's nodes and their stable labels."""

    def label(self, node_id: int) -> str:
        """A node's stable label."""

    def configure(self, server_round: int, grid: Grid) -> list[Message]:
        """Build the round's instructions."""

    def apply(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        """Validate replies and update the global state; raise FederationError if none usable."""

    def evaluate(self) -> EvalResult:
        """Central evaluation of the current global model."""

    def checkpoint(
        self, run_dir: Path, server_round: int, extra: dict[str, Any]
    ) -> None:
        """Persist everything needed to continue after ``server_round``."""

    def finish(self, run_dir: Path) -> None:
        """Write the final artefacts (adapter, model)."""

    def close(self) -> None:
        """Release what the driver started (services), finished or not."""

    def restore(self, run_dir: Path) -> int:
        """Load the last checkpoint of ``run_dir``; return its round."""


def discover_nodes(
    grid: Grid, *, expected: int, timeout_s: float, ledger: ByteLedger
) -> dict[int, str]:
    """Wait for ``expected`` nodes, then ask each for its label.

    Nodes that reply with an error (e.g. no local data) are left out with a
    warning. Returns node id to label.

    Raises
    ------
    FederationError
        If fewer than ``expected`` nodes connect within ``timeout_s``, or none
        answers the hello.
    """
    deadline = time.monotonic() + timeout_s
    while len(grid.get_node_ids()) < expected:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(grid.get_node_ids())} of {expected} nodes connected "
                f"within {timeout_s:.0f} s"
            )
        time.sleep(0.2)  # polling the grid: Flower offers no wait-for-nodes call
    nodes = sorted(grid.get_node_ids())
    msgs = [
        Message(RecordDict(), dst_node_id=n, message_type=MESSAGE_HELLO) for n in nodes
    ]
    down = {m.metadata.dst_node_id: payload_bytes(m.content) for m in msgs}
    labels: dict[int, str] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d left out: %s", node, reply.error.reason)
            continue
        try:
            labels[node] = decode_hello(reply.content).label
        except ProtocolError as exc:
            log.warning("node %d left out: bad hello: %s", node, exc)
            continue
        ledger.record(0, labels[node], "down", down[node])
        ledger.record(0, labels[node], "up", payload_bytes(reply.content))
    if not labels:
        raise FederationError("no node answered the hello with usable data")
    return labels


def _row(
    server_round: int,
    result: RoundResult,
    ev: EvalResult,
    ledger: ByteLedger,
    seconds: float,
    method: str,
) -> dict[str, Any]:
    up, down = ledger.round_totals(server_round)
    return {
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


def run_rounds(
    grid: Grid,
    driver: RoundDriver,
    *,
    rounds: int,
    run_dir: Path,
    timeout_s: float,
    ledger: ByteLedger,
    start_round: int = 0,
    crash_after: int | None = None,
    min_replies: int = 1,
) -> None:
    """Run rounds ``start_round + 1 .. rounds`` of ``driver``'s method.

    A fresh run (``start_round == 0``) first records round 0, the initial
    model. Each round's checkpoint is written before its ``metrics.jsonl``
    row, so after a crash every recorded row has a checkpoint at or past it;
    a resumed run drops rows past its checkpoint and redoes them.
    ``crash_after`` (fault injection for tests) kills the process like a
    SIGKILL right after that round is recorded.

    Raises
    ------
    FederationError
        If a round has no usable update.
    """
    metrics = MetricsLog(run_dir / "metrics.jsonl")
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
    for server_round in range(start_round + 1, rounds + 1):
        t0 = time.monotonic()
        messages = driver.configure(server_round, grid)
        for m in messages:
            who = driver.label(m.metadata.dst_node_id)
            ledger.record(server_round, who, "down", payload_bytes(m.content))
        replies = list(grid.send_and_receive(messages, timeout=timeout_s))
        for r in replies:
            if r.has_content():
                who = driver.label(r.metadata.src_node_id)
                ledger.record(server_round, who, "up", payload_bytes(r.content))
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
            run_dir, server_round, {"metrics": row, "ledger": ledger.to_json()}
        )
        metrics.append(row)
        log.info("round %d/%d: %s", server_round, rounds, row)
        if crash_after == server_round:
            log.error(
                "fault injection: killing the server after round %d", server_round
            )
            os._exit(137)
    driver.finish(run_dir)
