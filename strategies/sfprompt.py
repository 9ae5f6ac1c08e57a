"""SFPrompt's aggregation: example-weighted FedAvg of soft prompts and tail.

The split-training traffic (activations, gradients) goes over the trunk
service; what reaches this strategy after a round is each device's prompts
and tail. Replies are triaged like every strategy's (errors, duplicates,
wrong layout, NaN/Inf dropped with a reason) before the average.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from protocols import DEFAULT_MAX_PAYLOAD_BYTES, TensorLayout
from protocols.specs import SplitSpec
from protocols.split_messages import (
    MESSAGE_TRAIN_SFPROMPT,
    SplitRoundConfig,
    SplitTrainIns,
    SplitTrainRes,
    decode_split_train_res,
    encode_split_train_ins,
)
from strategies.aggregation import weighted_mean
from strategies.replies import CentrallyEvaluated, triage

__all__ = ["SFPromptFedAvg", "SplitAggregate", "SplitRoundSettings"]


@dataclass(frozen=True, slots=True)
class SplitRoundSettings:
    """Device settings sent every round (see :class:`SplitRoundConfig`)."""

    local_steps: int
    local_loss_steps: int
    batch_size: int
    learning_rate: float
    gamma: float


@dataclass
class SplitAggregate:
    """Outcome of one round (``tensors`` is None when nothing was usable)."""

    tensors: dict[str, torch.Tensor] | None
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    train_loss: float | None = None
    local_loss: float | None = None
    kept: int = 0
    trunk_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)


class SFPromptFedAvg(CentrallyEvaluated):
    """FedAvg of SFPrompt's device-side trainable tensors.

    Parameters
    ----------
    spec : SplitSpec
        The split contract sent with every round.
    layout : TensorLayout
        Layout of the prompts-and-tail payload every reply must have.
    settings : SplitRoundSettings
        Device settings.
    trunk_address : str
        ``host:port`` of the trunk service the devices must use.
    trunk_root_certificate : bytes
        PEM of the CA behind the trunk's TLS certificate (empty: plaintext).
    fraction_train, min_train_nodes, seed :
        Node sampling (see :class:`strategies.replies.NodeBook`).
    device : torch.device or str
        Where aggregation runs.
    max_payload_bytes : int
        Largest prompts-and-tail payload accepted from a client.
    """

    def __init__(
        self,
        *,
        spec: SplitSpec,
        layout: TensorLayout,
        settings: SplitRoundSettings,
        trunk_address: str,
        trunk_root_certificate: bytes = b"",
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.spec = spec
        self.layout = layout
        self.settings = settings
        self.trunk_address = trunk_address
        self.trunk_root_certificate = trunk_root_certificate
        self.seed = seed
        self.device = torch.device(device)
        self.max_payload_bytes = max_payload_bytes
        self._sample_nodes(fraction_train, min_train_nodes, seed)

    def configure(
        self, server_round: int, tensors: Mapping[str, torch.Tensor], grid: Grid
    ) -> list[Message]:
        """Send the global prompts and tail to this round's nodes."""
        s = self.settings
        config = SplitRoundConfig(
            server_round=server_round,
            local_steps=s.local_steps,
            local_loss_steps=s.local_loss_steps,
            batch_size=s.batch_size,
            learning_rate=s.learning_rate,
            gamma=s.gamma,
            seed=self.seed,
            trunk_address=self.trunk_address,
            trunk_root_certificate=self.trunk_root_certificate,
        )
        content = encode_split_train_ins(
            SplitTrainIns(self.spec, config, dict(tensors))
        )
        return [
            Message(content=content, dst_node_id=n, message_type=MESSAGE_TRAIN_SFPROMPT)
            for n in self.nodes.sample(server_round, grid)
        ]

    def aggregate(
        self, server_round: int, replies: Iterable[Message]
    ) -> SplitAggregate:
        """Validate replies, then average the accepted prompts and tails."""

        def decode(reply: Message) -> SplitTrainRes:
            return decode_split_train_res(
                reply.content,
                expected=self.layout,
                max_bytes=self.max_payload_bytes,
                device=self.device,
            )

        good, rejected = triage(server_round, replies, self.nodes, decode)
        if not good:
            return SplitAggregate(tensors=None, rejected=rejected)
        weights = [float(r.num_examples) for _, r in good]
        tensors = weighted_mean(
            [r.tensors for _, r in good], weights, device=self.device
        )
        total = sum(weights)
        return SplitAggregate(
            tensors=tensors,
            accepted=[who for who, _ in good],
            rejected=rejected,
            train_loss=sum(r.train_loss * r.num_examples for _, r in good) / total,
            local_loss=sum(r.local_loss * r.num_examples for _, r in good) / total,
            kept=sum(r.kept for _, r in good),
            trunk_bytes={
                who: (r.trunk_bytes_up, r.trunk_bytes_down) for who, r in good
            },
        )

    # -- Flower Strategy API (the round loop in server/ drives the typed API) ---
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower entry point: ``arrays`` holds the encoded prompts and tail."""
        from protocols import decode_tensors

        return self.configure(
            server_round, decode_tensors(arrays, expected=self.layout), grid
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower entry point: the averaged tensors, encoded, and metrics."""
        from protocols import encode_tensors

        result = self.aggregate(server_round, replies)
        if result.tensors is None:
            return None, MetricRecord({"accepted": 0, "rejected": len(result.rejected)})
        metrics = MetricRecord(
            {"accepted": len(result.accepted), "rejected": len(result.rejected)}
        )
        return encode_tensors(result.tensors), metrics

    def summary(self) -> None:
        """Nothing beyond the run config to report."""
