"""Federated LoRA: example-weighted FedAvg of adapter tensors.

A thin Flower ``Strategy``: it builds ``train.lora`` instructions, decodes and
validates replies through :mod:`protocols`, and averages the accepted
adapters with :func:`strategies.aggregation.weighted_mean` on its device. A
reply that is an error, malformed, of the wrong layout, or holds NaN/Inf is
dropped with a logged reason before anything is summed, so the global adapter
is either fully updated from good replies or left exactly as it was.

The typed entry points :meth:`LoraFedAvg.configure` and
:meth:`LoraFedAvg.aggregate` are what Pollinate's server loop calls; the
Flower ``Strategy`` methods wrap them so the class also works with
``Strategy.start``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from protocols import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MESSAGE_TRAIN_LORA,
    LocalTrainConfig,
    LoraSpec,
    LoraTrainIns,
    LoraTrainRes,
    TensorLayout,
    decode_lora_train_res,
    decode_tensors,
    encode_lora_train_ins,
    encode_tensors,
)
from strategies.aggregation import weighted_mean
from strategies.replies import CentrallyEvaluated, triage

__all__ = ["LoraAggregate", "LoraFedAvg", "LocalTrainSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LocalTrainSettings:
    """Local training settings the strategy sends every round."""

    local_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0


@dataclass
class LoraAggregate:
    """Outcome of one round's aggregation.

    Attributes
    ----------
    adapter : dict[str, torch.Tensor] | None
        The new global adapter, or ``None`` when no reply was usable (the
        caller then keeps the previous one).
    accepted : list[str]
        Labels of the nodes whose update was averaged, in summation order.
    rejected : dict[str, str]
        Label to the reason its reply was dropped.
    train_loss : float | None
        Example-weighted mean of the clients' reported training loss.
    num_examples : int
        Total examples behind the accepted updates.
    """

    adapter: dict[str, torch.Tensor] | None
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    train_loss: float | None = None
    num_examples: int = 0


class LoraFedAvg(CentrallyEvaluated):
    """Example-weighted FedAvg of LoRA adapters.

    Parameters
    ----------
    spec : LoraSpec
        Sent with every instruction; clients refuse one they cannot honour.
    layout : TensorLayout
        The adapter layout every reply must have.
    train : LocalTrainSettings
        Local steps, batch size and optimiser settings.
    fraction_train : float
        Share of the known nodes sampled each round, in (0, 1].
    min_train_nodes : int
        Fewest nodes a round samples.
    seed : int
        Run seed: drives node sampling and the clients' batch order.
    device : torch.device or str
        Where aggregation runs.
    max_payload_bytes : int
        Largest adapter payload accepted from a client.
    """

    def __init__(
        self,
        *,
        spec: LoraSpec,
        layout: TensorLayout,
        train: LocalTrainSettings,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.spec = spec
        self.layout = layout
        self.train = train
        self.seed = seed
        self.device = torch.device(device)
        self.max_payload_bytes = max_payload_bytes
        self._sample_nodes(fraction_train, min_train_nodes, seed)

    # -- typed API -----------------------------------------------------------
    def configure(
        self, server_round: int, adapter: Mapping[str, torch.Tensor], grid: Grid
    ) -> list[Message]:
        """Build this round's ``train.lora`` messages for the sampled nodes."""
        nodes = self.nodes.sample(server_round, grid)
        config = LocalTrainConfig(
            server_round=server_round,
            local_steps=self.train.local_steps,
            batch_size=self.train.batch_size,
            learning_rate=self.train.learning_rate,
            weight_decay=self.train.weight_decay,
            seed=self.seed,
        )
        content = encode_lora_train_ins(
            LoraTrainIns(spec=self.spec, config=config, adapter=dict(adapter))
        )
        return [
            Message(content=content, dst_node_id=node, message_type=MESSAGE_TRAIN_LORA)
            for node in nodes
        ]

    def aggregate(self, server_round: int, replies: Iterable[Message]) -> LoraAggregate:
        """Validate every reply, drop bad ones with a reason, average the rest."""

        def decode(reply: Message) -> LoraTrainRes:
            return decode_lora_train_res(
                reply.content,
                expected=self.layout,
                max_bytes=self.max_payload_bytes,
                device=self.device,
            )

        good, rejected = triage(server_round, replies, self.nodes, decode)
        if not good:
            return LoraAggregate(adapter=None, rejected=rejected)
        # triage returns replies sorted by label: the sum has a fixed order.
        weights = [float(res.num_examples) for _, res in good]
        adapter = weighted_mean(
            [res.adapter for _, res in good], weights, device=self.device
        )
        total = int(sum(weights))
        loss = sum(res.train_loss * res.num_examples for _, res in good) / total
        return LoraAggregate(
            adapter=adapter,
            accepted=[who for who, _ in good],
            rejected=rejected,
            train_loss=loss,
            num_examples=total,
        )

    # -- Flower Strategy API -------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower entry point: ``arrays`` is the codec-encoded global adapter."""
        del config
        adapter = decode_tensors(arrays, expected=self.layout, device=self.device)
        return self.configure(server_round, adapter, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower entry point: the new adapter, encoded, and round metrics."""
        result = self.aggregate(server_round, replies)
        if result.adapter is None:
            return None, MetricRecord({"accepted": 0, "rejected": len(result.rejected)})
        metrics = MetricRecord(
            {
                "train-loss": float(result.train_loss or 0.0),
                "num-examples": result.num_examples,
                "accepted": len(result.accepted),
                "rejected": len(result.rejected),
            }
        )
        return encode_tensors(result.adapter), metrics

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info(
            "LoraFedAvg: rank=%d alpha=%s targets=%s steps=%d batch=%d lr=%g "
            "fraction=%.2f min_nodes=%d device=%s",
            self.spec.rank,
            self.spec.alpha,
            ",".join(self.spec.target_modules),
            self.train.local_steps,
            self.train.batch_size,
            self.train.learning_rate,
            self.nodes.fraction,
            self.nodes.min_nodes,
            self.device,
        )
