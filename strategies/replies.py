"""What every strategy does with nodes and replies, in one place.

:class:`NodeBook` knows the federation's nodes by stable label and samples
them reproducibly each round. :func:`triage` sorts a round's replies into
decoded updates and rejections with reasons (error replies, duplicate
replies from one node, payloads that fail to decode), logging each rejection,
so that a strategy aggregates only what passed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocols import ProtocolError
from strategies.sampling import sample_nodes

__all__ = ["CentrallyEvaluated", "NodeBook", "triage"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class NodeBook:
    """The nodes of a federation, by stable label, and who trains each round.

    Parameters
    ----------
    fraction, min_nodes, seed : see :func:`strategies.sampling.sample_nodes`.
    """

    def __init__(self, *, fraction: float, min_nodes: int, seed: int) -> None:
        self.fraction = fraction
        self.min_nodes = min_nodes
        self.seed = seed
        self._labels: dict[int, str] = {}

    def set_nodes(self, node_labels: Mapping[int, str]) -> None:
        """Record the federation's nodes and their stable labels."""
        self._labels = dict(node_labels)

    def label(self, node_id: int) -> str:
        """The stable label of a node (derived from its id if it never said hello)."""
        return self._labels.get(node_id, f"node-{node_id}")

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """Pick the round's nodes (from the known ones, else from the grid's)."""
        labels = self._labels or {n: f"node-{n}" for n in grid.get_node_ids()}
        return sample_nodes(
            labels,
            fraction=self.fraction,
            min_nodes=self.min_nodes,
            seed=self.seed,
            server_round=server_round,
        )


def triage(
    server_round: int,
    replies: Iterable[Message],
    book: NodeBook,
    decode: Callable[[Message], T],
    on_error: Callable[[str, Error], None] | None = None,
) -> tuple[list[tuple[str, T]], dict[str, str]]:
    """Split replies into ``(label, decoded)`` pairs sorted by label, and rejections.

    ``decode`` raises :class:`~protocols.ProtocolError` for a reply it refuses;
    ``on_error`` sees every error reply (e.g. to act on its code). A node that
    replies twice has both replies rejected.
    """
    good: dict[str, T] = {}
    rejected: dict[str, str] = {}
    for reply in replies:
        who = book.label(reply.metadata.src_node_id)
        if who in good or who in rejected:
            good.pop(who, None)
            rejected[who] = "the node replied more than once this round"
            continue
        if reply.has_error():
            rejected[who] = f"client error: {reply.error.reason}"
            if on_error is not None:
                on_error(who, reply.error)
            continue
        try:
            good[who] = decode(reply)
        except ProtocolError as exc:
            rejected[who] = str(exc)
    for who, reason in sorted(rejected.items()):
        log.warning("round %d: rejected update from %s: %s", server_round, who, reason)
    return sorted(good.items()), rejected


class CentrallyEvaluated(Strategy):
    """A Flower ``Strategy`` whose evaluation happens on the server only.

    Pollinate evaluates the global model centrally, so no client is asked to
    evaluate and there is nothing to aggregate; the training half stays
    abstract.
    """

    nodes: NodeBook
    """The known nodes, their labels and the per-round sampling."""

    def _sample_nodes(self, fraction: float, min_nodes: int, seed: int) -> None:
        """Set up :attr:`nodes` (subclasses call this from ``__init__``)."""
        self.nodes = NodeBook(fraction=fraction, min_nodes=min_nodes, seed=seed)

    def set_nodes(self, node_labels: Mapping[int, str]) -> None:
        """Tell the strategy which nodes exist and their stable labels."""
        self.nodes.set_nodes(node_labels)

    def label(self, node_id: int) -> str:
        """The stable label of a node (derived from its id if it never said hello)."""
        return self.nodes.label(node_id)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client evaluates."""
        del server_round, arrays, config, grid
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate."""
        del server_round, replies
        return None
