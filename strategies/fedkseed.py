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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.serverapp import Grid

from protocols import LocalTrainConfig, ProtocolError, ZOSpec
from protocols.messages import ERROR_OUT_OF_SYNC
from protocols.zo_messages import (
    MESSAGE_TRAIN_ZO,
    RoundDelta,
    ZoTrainIns,
    ZoTrainRes,
    decode_zo_train_res,
    encode_zo_train_ins,
)
from strategies.replies import CentrallyEvaluated, triage
from strategies.seed_pool import ProStatistics, SeedUpdate, aggregate_seed_scalars

__all__ = ["FedKSeed", "ZoAggregate"]

log = logging.getLogger(__name__)


@dataclass
class ZoAggregate:
    """Outcome of one FedKSeed round (``delta`` is None when nothing was usable)."""

    delta: RoundDelta | None
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    train_loss: float | None = None
    num_examples: int = 0
    steps: int = 0


class FedKSeed(CentrallyEvaluated):
    """Seed-pool zeroth-order federated tuning (uniform or Pro sampling).

    Parameters
    ----------
    spec : ZOSpec
        Sent with every instruction; ``spec.sampling`` picks FedKSeed or -Pro.
    local_steps, batch_size : int
        Local ZO steps per round and examples per step.
    fraction_train : float
        Share of the known nodes sampled each round.
    min_train_nodes : int
        Fewest nodes a round samples.
    seed : int
        Run seed (node sampling, clients' batch and seed draws).
    """

    def __init__(
        self,
        *,
        spec: ZOSpec,
        local_steps: int,
        batch_size: int,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.seed = seed
        self._sample_nodes(fraction_train, min_train_nodes, seed)
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
        self, server_round: int, grid: Grid, *, global_round: int, global_hash: str
    ) -> list[Message]:
        """Build the round's ``train.zo`` messages, each with its node's catch-up."""
        nodes = self.nodes.sample(server_round, grid)
        config = LocalTrainConfig(
            server_round=server_round,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            learning_rate=self.spec.learning_rate,
            weight_decay=0.0,
            seed=self.seed,
        )
        importance = self.pro.quantized() if self.pro is not None else None
        messages = []
        for node in nodes:
            base = self.node_rounds.get(self.nodes.label(node), 0)
            ins = ZoTrainIns(
                spec=self.spec,
                config=config,
                base_round=base,
                target_round=global_round,
                target_hash=global_hash,
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
        self,
        server_round: int,
        replies: Iterable[Message],
        *,
        global_round: int,
        global_hash: str,
    ) -> ZoAggregate:
        """Validate replies, then build and record the round delta."""

        def decode(reply: Message) -> ZoTrainRes:
            res = decode_zo_train_res(
                reply.content, num_seeds=self.spec.num_seeds, max_steps=self.local_steps
            )
            if (res.synced_round, res.synced_hash) != (global_round, global_hash):
                raise ProtocolError(
                    f"out of sync: trained from round {res.synced_round} hash "
                    f"{res.synced_hash}, global is round {global_round} hash {global_hash}"
                )
            return res

        def on_error(who: str, error: Error) -> None:
            if error.code == ERROR_OUT_OF_SYNC:
                self.node_rounds[who] = 0  # it lost its state: full history next time

        good, rejected = triage(server_round, replies, self.nodes, decode, on_error)
        if not good:
            return ZoAggregate(delta=None, rejected=rejected)
        for who, _ in good:
            self.node_rounds[who] = global_round
        updates = [SeedUpdate(r.indices, r.scalars, r.num_examples) for _, r in good]
        indices, coefficients = aggregate_seed_scalars(
            updates,
            num_seeds=self.spec.num_seeds,
            learning_rate=self.spec.learning_rate,
        )
        if self.pro is not None:
            for u in updates:
                self.pro.update(u.indices, u.scalars)
        delta = RoundDelta(server_round, indices, coefficients)
        self.history.append(delta)
        total = sum(u.num_examples for u in updates)
        loss = sum(r.train_loss * r.num_examples for _, r in good) / total
        return ZoAggregate(
            delta=delta,
            accepted=[who for who, _ in good],
            rejected=rejected,
            train_loss=loss,
            num_examples=total,
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

    # -- Flower Strategy API (the round loop in server/ drives the typed API) ---
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower entry point: ``config`` carries ``global-round`` and ``global-hash``."""
        del arrays
        return self.configure(
            server_round,
            grid,
            global_round=int(config["global-round"]),  # type: ignore[arg-type]
            global_hash=str(config["global-hash"]),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Not used: FedKSeed's aggregate depends on the global hash (see :meth:`aggregate`)."""
        raise NotImplementedError(
            "FedKSeed is driven through aggregate(); see server/zo_driver.py (ZoDriver.apply)"
        )

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info(
            "FedKSeed%s: K=%d eps=%g lr=%g steps=%d batch=%d fraction=%.2f",
            "-Pro" if self.pro else "",
            self.spec.num_seeds,
            self.spec.eps,
            self.spec.learning_rate,
            self.local_steps,
            self.batch_size,
            self.nodes.fraction,
        )
