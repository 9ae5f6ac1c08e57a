"""FedKSeed and FedKSeed-Pro: federated zeroth-order tuning over a seed pool.

The strategy never sees a weight. It keeps the round history (one
:class:`~protocols.zo_messages.RoundDelta` per round), the round each node
last synced to, and, for Pro, the per-seed importance statistics. Each round
it sends every sampled node only the history since that node's last sync, and
turns the replies' ``(seed index, scalar)`` pairs into the next round delta.

A reply is rejected, with a logged reason, when it is an error, malformed
(out-of-pool index, NaN scalar, too many steps) or out of sync (its model hash
differs from the global model's): nothing of it reaches the aggregate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Error, Message

from protocols import ProtocolError, ZOSpec
from protocols.messages import ERROR_OUT_OF_SYNC, RoundSchedule
from protocols.zo_messages import (
    MESSAGE_TRAIN_ZO,
    RoundDelta,
    ZoTrainIns,
    ZoTrainRes,
    decode_zo_train_res,
    encode_zo_train_ins,
)
from strategies.replies import triage, weighted_loss
from strategies.seed_pool import ProStatistics, SeedUpdate, aggregate_seed_scalars
from strategies.strategy import Aggregate, LabelledReply, Nodes

__all__ = ["FedKSeed", "ZoAggregate", "ZoGlobal"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ZoGlobal:
    """The global model as FedKSeed's strategy sees it: a round and a hash."""

    round: int
    hash: str


@dataclass
class ZoAggregate(Aggregate):
    """Outcome of one FedKSeed round (``delta`` is None when nothing was usable)."""

    delta: RoundDelta | None = None
    steps: int = 0


class FedKSeed:
    """Seed-pool zeroth-order federated tuning (uniform or Pro sampling).

    Parameters
    ----------
    spec : ZOSpec
        Sent with every instruction; ``spec.sampling`` picks FedKSeed or -Pro.
    local_steps, batch_size : int
        Local ZO steps per round and examples per step.
    seed : int
        Run seed (the clients' batch and seed draws).
    """

    def __init__(
        self,
        *,
        spec: ZOSpec,
        local_steps: int,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.seed = seed
        self.history: list[RoundDelta] = []
        self.node_rounds: dict[str, int] = {}
        self.pro = (
            ProStatistics(spec.num_seeds, spec.grad_clip)
            if spec.sampling == "pro"
            else None
        )

    def history_since(self, base_round: int) -> tuple[RoundDelta, ...]:
        """The round deltas a node synced at ``base_round`` still has to apply."""
        return tuple(d for d in self.history if d.round > base_round)

    def configure(
        self, server_round: int, nodes: Nodes, current: ZoGlobal
    ) -> list[Message]:
        """The round's ``train.zo`` messages, each with its node's catch-up."""
        # The learning rate travels in the spec only.
        config = RoundSchedule(
            server_round=server_round,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        importance = self.pro.quantized() if self.pro is not None else None
        messages = []
        for node, label in nodes.items():
            base = self.node_rounds.get(label, 0)
            ins = ZoTrainIns(
                spec=self.spec,
                config=config,
                base_round=base,
                target_round=current.round,
                target_hash=current.hash,
                history=self.history_since(base),
                importance=importance,
            )
            messages.append(
                Message(
                    encode_zo_train_ins(ins),
                    dst_node_id=node,
                    message_type=MESSAGE_TRAIN_ZO,
                )
            )
        return messages

    def aggregate(
        self, server_round: int, replies: Sequence[LabelledReply], current: ZoGlobal
    ) -> ZoAggregate:
        """Validate replies, then build and record the round delta."""

        def decode(reply: Message) -> ZoTrainRes:
            res = decode_zo_train_res(
                reply.content, num_seeds=self.spec.num_seeds, max_steps=self.local_steps
            )
            if (res.synced_round, res.synced_hash) != (current.round, current.hash):
                raise ProtocolError(
                    f"out of sync: trained from round {res.synced_round} hash "
                    f"{res.synced_hash}, global is round {current.round} hash "
                    f"{current.hash}"
                )
            return res

        def on_error(who: str, error: Error) -> None:
            if error.code == ERROR_OUT_OF_SYNC:
                self.node_rounds[who] = 0  # it lost its state: full history next time

        good, rejected = triage(server_round, replies, decode, on_error)
        if not good:
            return ZoAggregate(rejected=rejected)
        for who, _ in good:
            self.node_rounds[who] = current.round
        updates = [SeedUpdate(r.indices, r.scalars, r.num_examples) for _, r in good]
        indices, coefficients = aggregate_seed_scalars(
            updates,
            num_seeds=self.spec.num_seeds,
            learning_rate=self.spec.learning_rate,
        )
        if not bool(torch.isfinite(coefficients).all()):
            # Only reachable with learning_rate * local_steps beyond ~3e8 (the
            # decoder bounds every scalar): refuse the round, keep the model.
            reason = "the round's seed coefficients overflow float32"
            return ZoAggregate(
                rejected={**rejected, **dict.fromkeys((who for who, _ in good), reason)}
            )
        if self.pro is not None:
            for u in updates:
                self.pro.update(u.indices, u.scalars)
        delta = RoundDelta(server_round, indices, coefficients)
        self.history.append(delta)
        return ZoAggregate(
            delta=delta,
            accepted=[who for who, _ in good],
            rejected=rejected,
            train_loss=weighted_loss([(r.train_loss, r.num_examples) for _, r in good]),
            num_examples=sum(u.num_examples for u in updates),
            steps=sum(int(u.indices.numel()) for u in updates),
        )

    def state(self) -> dict[str, object]:
        """Everything needed to continue exactly (history, node rounds, Pro stats)."""
        return {
            "history": [
                {
                    "round": d.round,
                    "indices": d.indices.tolist(),
                    "coefficients": d.coefficients.tolist(),
                }
                for d in self.history
            ],
            "node_rounds": dict(self.node_rounds),
            "pro": {k: v.tolist() for k, v in self.pro.state().items()}
            if self.pro
            else None,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state`'s history and Pro statistics (node rounds reset).

        Nodes are assumed to hold nothing after a restart: each gets the full
        history at its next round, which keeps the replay exact.
        """
        self.history = [
            RoundDelta(
                int(d["round"]),
                torch.tensor(d["indices"], dtype=torch.int32),
                torch.tensor(d["coefficients"], dtype=torch.float32),
            )
            for d in state["history"]
        ]
        self.node_rounds = {}
        pro = state.get("pro")
        if self.pro is not None and pro:
            self.pro.load_state(
                {k: torch.tensor(v, dtype=torch.float64) for k, v in pro.items()}
            )

    def summary(self) -> str:
        """The strategy's settings in one line."""
        return (
            f"FedKSeed{'-Pro' if self.pro else ''}: K={self.spec.num_seeds} "
            f"eps={self.spec.eps:g} lr={self.spec.learning_rate:g} "
            f"steps={self.local_steps} batch={self.batch_size}"
        )
