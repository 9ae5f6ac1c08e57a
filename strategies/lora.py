"""Federated LoRA: example-weighted FedAvg of adapter tensors.

A :class:`~strategies.strategy.Strategy`: it builds ``train.lora``
instructions, decodes and validates replies through :mod:`protocols`, and
averages the accepted adapters with :func:`strategies.aggregation.weighted_mean`
on its device. A reply that is an error, malformed, of the wrong layout, or
holds NaN/Inf is dropped with a logged reason before anything is summed, so
the global adapter is either fully updated from good replies or left exactly
as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from flwr.app import Message

from protocols import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MESSAGE_TRAIN_LORA,
    LocalTrainConfig,
    LoraSpec,
    LoraTrainIns,
    TensorLayout,
    decode_lora_train_res,
    encode_lora_train_ins,
)
from strategies.fedavg import TensorFedAvg
from strategies.strategy import Aggregate, LabelledReply, Nodes

__all__ = ["LocalTrainSettings", "LoraAggregate", "LoraFedAvg"]

Adapter = Mapping[str, torch.Tensor]
"""Adapter tensors by PEFT parameter name."""


@dataclass(frozen=True, slots=True)
class LocalTrainSettings:
    """Local training settings the strategy sends every round."""

    local_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0


@dataclass
class LoraAggregate(Aggregate):
    """Outcome of one round.

    ``adapter`` is the new global adapter, or ``None`` when no reply was
    usable (the caller then keeps the previous one).
    """

    adapter: dict[str, torch.Tensor] | None = None


class LoraFedAvg:
    """Example-weighted FedAvg of LoRA adapters.

    Parameters
    ----------
    spec : LoraSpec
        Sent with every instruction; clients refuse one they cannot honour.
    layout : TensorLayout
        The adapter layout every reply must have.
    train : LocalTrainSettings
        Local steps, batch size and optimiser settings.
    seed : int
        Run seed: the clients derive their batch order from it.
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
        seed: int = 0,
        device: torch.device | str = "cpu",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.spec = spec
        self.train = train
        self.seed = seed
        self.fedavg = TensorFedAvg(
            layout, device=device, max_payload_bytes=max_payload_bytes
        )

    def configure(
        self, server_round: int, nodes: Nodes, current: Adapter
    ) -> list[Message]:
        """The round's ``train.lora`` messages, carrying the global adapter."""
        config = LocalTrainConfig(
            server_round=server_round,
            local_steps=self.train.local_steps,
            batch_size=self.train.batch_size,
            learning_rate=self.train.learning_rate,
            weight_decay=self.train.weight_decay,
            seed=self.seed,
        )
        content = encode_lora_train_ins(
            LoraTrainIns(spec=self.spec, config=config, adapter=dict(current))
        )
        return [
            Message(content=content, dst_node_id=node, message_type=MESSAGE_TRAIN_LORA)
            for node in nodes
        ]

    def aggregate(
        self,
        server_round: int,
        replies: Sequence[LabelledReply],
        current: Adapter | None = None,
    ) -> LoraAggregate:
        """Validate every reply, drop bad ones with a reason, average the rest."""
        del current  # FedAvg replaces the global adapter whole
        r = self.fedavg.round(
            server_round, replies, decode_lora_train_res, lambda res: res.adapter
        )
        return LoraAggregate(
            adapter=r.mean,
            accepted=r.accepted,
            rejected=r.rejected,
            train_loss=r.weighted(lambda res: res.train_loss),
            num_examples=r.num_examples,
        )

    def summary(self) -> str:
        """The strategy's settings in one line."""
        return (
            f"LoraFedAvg: rank={self.spec.rank} alpha={self.spec.alpha} "
            f"targets={','.join(self.spec.target_modules)} "
            f"steps={self.train.local_steps} batch={self.train.batch_size} "
            f"lr={self.train.learning_rate:g} device={self.fedavg.device}"
        )
