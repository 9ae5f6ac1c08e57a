"""Example-weighted FedAvg of tensor payloads: the round LoRA and SFPrompt share.

Both methods send the global tensors out and get each client's trained
tensors back; the server keeps the example-weighted mean of the replies that
pass validation. :class:`TensorFedAvg` is that step, composed into each
method's strategy: it decodes every reply against the expected layout and
size limit on the aggregation device, drops the bad ones with a reason
(:func:`strategies.replies.triage`), and averages the rest in a fixed order
(sorted by node label) with :func:`strategies.aggregation.weighted_mean`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import torch
from flwr.app import RecordDict

from protocols import DEFAULT_MAX_PAYLOAD_BYTES, TensorLayout
from strategies.aggregation import weighted_mean
from strategies.replies import triage, weighted_loss
from strategies.strategy import LabelledReply

__all__ = ["FedAvgRound", "TensorFedAvg", "TensorReply"]


class TensorReply(Protocol):
    """What a decoded reply of a tensor method carries."""

    @property
    def num_examples(self) -> int:
        """Examples the client trained on (its weight)."""

    @property
    def train_loss(self) -> float:
        """Its mean training loss."""


R = TypeVar("R", bound=TensorReply)

Decoder = Callable[..., R]
"""``decode(content, *, expected, max_bytes, device)`` of a method's reply."""


@dataclass
class FedAvgRound(Generic[R]):
    """One round's outcome: the decoded replies, the rejections, the mean.

    ``mean`` is None when no reply was usable.
    """

    good: list[tuple[str, R]]
    rejected: dict[str, str] = field(default_factory=dict)
    mean: dict[str, torch.Tensor] | None = None

    @property
    def accepted(self) -> list[str]:
        """Labels of the averaged clients, in summation order."""
        return [who for who, _ in self.good]

    @property
    def num_examples(self) -> int:
        """Examples behind the mean."""
        return sum(r.num_examples for _, r in self.good)

    def weighted(self, value: Callable[[R], float]) -> float | None:
        """Example-weighted mean of ``value`` over the accepted replies."""
        if not self.good:
            return None
        return weighted_loss([(value(r), r.num_examples) for _, r in self.good])


class TensorFedAvg:
    """Validate and average tensor replies of one layout.

    Parameters
    ----------
    layout : TensorLayout
        The layout every reply's tensors must have.
    device : torch.device or str
        Where decoding and aggregation run.
    max_payload_bytes : int
        Largest payload accepted from a client.
    """

    def __init__(
        self,
        layout: TensorLayout,
        *,
        device: torch.device | str = "cpu",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.max_payload_bytes = max_payload_bytes

    def round(
        self,
        server_round: int,
        replies: Sequence[LabelledReply],
        decode: Decoder[R],
        tensors: Callable[[R], Mapping[str, torch.Tensor]],
    ) -> FedAvgRound[R]:
        """Decode, triage and average one round's replies."""

        def decode_one(content: RecordDict) -> R:
            return decode(
                content,
                expected=self.layout,
                max_bytes=self.max_payload_bytes,
                device=self.device,
            )

        good, rejected = triage(server_round, replies, lambda m: decode_one(m.content))
        if not good:
            return FedAvgRound(good, rejected)
        weights = [float(r.num_examples) for _, r in good]
        mean = weighted_mean([tensors(r) for _, r in good], weights, device=self.device)
        return FedAvgRound(good, rejected, mean)
