"""The server's round loop for federated LoRA.

One place owns the global adapter and the order of events in a round:

1. wait for the federation to assemble and learn each node's stable label;
2. evaluate the initial adapter (round 0);
3. per round: sample and instruct nodes, collect replies, aggregate the
   valid ones, evaluate centrally, append a ``metrics.jsonl`` row, write a
   checkpoint.

Every payload is measured as serialized into the :class:`~protocols.ByteLedger`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from protocols import (
    MESSAGE_HELLO,
    ByteLedger,
    ProtocolError,
    decode_hello,
    payload_bytes,
)
from server.checkpoints import MetricsLog, save_checkpoint
from server.evaluation import CentralEvaluator
from strategies import LoraFedAvg

__all__ = ["FederationError", "RoundRow", "discover_nodes", "run_lora_rounds"]

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation cannot proceed (too few nodes, every update rejected...)."""


@dataclass(frozen=True, slots=True)
class RoundRow:
    """What ``metrics.jsonl`` records for one round."""

    round: int
    clients: int
    train_loss: float | None
    eval_loss: float
    eval_metric: float
    eval_metric_name: str
    bytes_up: int
    bytes_down: int
    seconds: float
    rejected: int = 0
    method: str = "lora"

    def as_dict(self) -> dict[str, Any]:
        """The JSON object written for this round."""
        return {name: getattr(self, name) for name in self.__slots__}


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


def run_lora_rounds(
    grid: Grid,
    strategy: LoraFedAvg,
    evaluator: CentralEvaluator,
    adapter: Mapping[str, torch.Tensor],
    *,
    rounds: int,
    run_dir: Path,
    timeout_s: float,
    ledger: ByteLedger,
    on_round: Callable[[RoundRow, Mapping[str, torch.Tensor]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``rounds`` rounds of federated LoRA; return the final global adapter.

    Raises
    ------
    FederationError
        If every update of a round is rejected.
    """
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    global_adapter = {k: v.to(strategy.device) for k, v in adapter.items()}
    t0 = time.monotonic()
    first = evaluator.evaluate(global_adapter)
    up, down = ledger.round_totals(0)  # the hello exchange
    row = RoundRow(
        0,
        0,
        None,
        first.loss,
        first.metric,
        first.metric_name,
        up,
        down,
        time.monotonic() - t0,
    )
    metrics.append(row.as_dict())
    if on_round:
        on_round(row, global_adapter)
    for server_round in range(1, rounds + 1):
        t0 = time.monotonic()
        messages = strategy.configure(server_round, global_adapter, grid)
        for m in messages:
            who = strategy.label(m.metadata.dst_node_id)
            ledger.record(server_round, who, "down", payload_bytes(m.content))
        replies = list(grid.send_and_receive(messages, timeout=timeout_s))
        for r in replies:
            if r.has_content():
                who = strategy.label(r.metadata.src_node_id)
                ledger.record(server_round, who, "up", payload_bytes(r.content))
        result = strategy.aggregate(server_round, replies)
        if result.adapter is None:
            raise FederationError(
                f"round {server_round}: no usable update ({len(replies)} replies of "
                f"{len(messages)}; rejected: {result.rejected})"
            )
        global_adapter = result.adapter
        ev = evaluator.evaluate(global_adapter)
        up, down = ledger.round_totals(server_round)
        row = RoundRow(
            server_round,
            len(result.accepted),
            result.train_loss,
            ev.loss,
            ev.metric,
            ev.metric_name,
            up,
            down,
            time.monotonic() - t0,
            rejected=len(result.rejected),
        )
        metrics.append(row.as_dict())
        save_checkpoint(
            run_dir,
            server_round,
            global_adapter,
            strategy.spec,
            {"metrics": row.as_dict(), "ledger": ledger.to_json()},
        )
        if on_round:
            on_round(row, global_adapter)
        log.info("round %d/%d: %s", server_round, rounds, row.as_dict())
    return global_adapter
