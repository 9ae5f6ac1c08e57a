"""What a Pollinate strategy is: one protocol for every method's aggregation.

A strategy turns the global state into one round's instructions for the
sampled nodes (:meth:`Strategy.configure`) and the nodes' replies into the
next global state (:meth:`Strategy.aggregate`). It never loads a model, reads
a file or talks to the network; the round loop (:mod:`server.federation`)
owns the nodes, the clock, the ledger and the checkpoints, and drives every
method's strategy the same way.

Why Pollinate's own protocol, and not Flower's ``Strategy`` class
-----------------------------------------------------------------
Flower's Message-API ``Strategy`` passes the global model by value, as an
``ArrayRecord``, into ``configure_train`` and out of ``aggregate_train`` every
round, and its ``start`` loop owns sampling and evaluation. That fits
FedAvg-style methods, but not the methods Pollinate exists for:

* FedKSeed's global model never travels: the strategy keeps a seed history
  and, per node, the round it last synced to, and an instruction carries only
  that node's catch-up. Serialising the whole model into an ``ArrayRecord``
  twice a round on the server (540 MB for SmolLM2-135M, gigabytes for larger
  models) would cost more than the round itself, for nothing.
* SFPrompt's round has a side channel (the trunk service) whose traffic and
  sessions are the round loop's business, not an ``ArrayRecord``'s.
* Every method needs what ``Strategy.start`` lacks: checkpoints and exact
  resume, a byte ledger per client, stable node labels for reproducible
  sampling, and a quorum of usable replies (``federation.min_replies``).

So the strategies are a small typed protocol instead of half-used subclasses
of Flower's class (FedKSeed's ``aggregate_train`` used to raise
``NotImplementedError``). What a user of a plain Flower ``ServerApp`` can
reuse are the pure kernels beneath them (:mod:`strategies.aggregation`,
:mod:`strategies.seed_pool`, :mod:`strategies.sampling`) and the wire
formats in :mod:`protocols`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from flwr.app import Message

__all__ = ["Aggregate", "LabelledReply", "Nodes", "Strategy"]

Nodes = Mapping[int, str]
"""The nodes an instruction goes to: Flower node id to stable label."""

LabelledReply = tuple[str, Message]
"""A reply and the stable label of the node that sent it."""

GlobalT = TypeVar("GlobalT", contravariant=True)
AggregateT = TypeVar("AggregateT", covariant=True)


@dataclass
class Aggregate:
    """What every strategy reports of a round (subclasses add the new state).

    Attributes
    ----------
    accepted : list[str]
        Labels of the nodes whose update was used, in summation order.
    rejected : dict[str, str]
        Label to the reason its reply was dropped.
    train_loss : float | None
        Example-weighted mean of the accepted clients' training loss.
    num_examples : int
        Total examples behind the accepted updates.
    stats : dict[str, Any]
        What bounded the round, for its metrics row (JSON-able values):
        ``clip_bound``, ``clipped`` (clients scaled down), ``weights_capped``,
        ``aggregator_used`` (clients a robust rule kept), ``epsilon`` (DP).
    """

    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    train_loss: float | None = None
    num_examples: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


class Strategy(Protocol[GlobalT, AggregateT]):
    """A method's aggregation (see the module docstring).

    ``GlobalT`` is what the round loop's driver holds as the global state
    (LoRA: the adapter tensors; FedKSeed: the global round and model hash;
    SFPrompt: the prompts and tail); ``AggregateT`` is an :class:`Aggregate`
    whose new state is ``None`` when no reply was usable, in which case the
    global state must stay exactly as it was.

    ``hello_counts`` (label to the example count the node reported at hello)
    is filled in by the server once the federation has assembled; a strategy
    caps a reply's claimed count by it (:func:`strategies.robust.capped_weights`).
    """

    hello_counts: dict[str, int]

    def configure(
        self, server_round: int, nodes: Nodes, current: GlobalT
    ) -> list[Message]:
        """One instruction per node in ``nodes``, for round ``server_round``."""

    def aggregate(
        self, server_round: int, replies: Sequence[LabelledReply], current: GlobalT
    ) -> AggregateT:
        """Validate every reply, drop bad ones with a reason, aggregate the rest."""

    def summary(self) -> str:
        """The strategy's settings in one line, for the run log."""

    def budget_allows(self, sampled: int) -> bool:
        """Whether a round of ``sampled`` nodes stays within the privacy budget.

        True without differential privacy or without ``privacy.target_epsilon``;
        the round loop asks it to know a round is the run's last in time to
        evaluate it.
        """
