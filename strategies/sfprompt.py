"""SFPrompt's aggregation: bounded FedAvg of soft prompts and tail.

The split-training traffic (activations, gradients) goes over the trunk
service; what reaches this strategy after a round is each device's prompts
and tail. Replies are triaged like every strategy's (errors, duplicates,
wrong layout, NaN/Inf dropped with a reason), then each device's change to
the global prompts and tail is bounded like a LoRA update (clipped norm,
capped weight, configured aggregator; :class:`strategies.fedavg.TensorFedAvg`)
and a non-finite aggregate refuses the round. No differential privacy: the
activations a device sends every step are not covered by it (the run config
refuses it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import Message

from protocols import DEFAULT_MAX_PAYLOAD_BYTES, ProtocolError, TensorLayout
from protocols.specs import SplitSpec
from protocols.split_messages import (
    MESSAGE_TRAIN_SFPROMPT,
    SplitRoundConfig,
    SplitTrainIns,
    decode_split_train_res,
    encode_split_train_ins_per_node,
)
from strategies.fedavg import TensorFedAvg
from strategies.robust import Bounds
from strategies.strategy import Aggregate, LabelledReply, Nodes

__all__ = ["SFPromptFedAvg", "SplitAggregate", "SplitRoundSettings"]

Tensors = Mapping[str, torch.Tensor]
"""The device-side trainable tensors (soft prompts, tail) by name."""


@dataclass(frozen=True, slots=True)
class SplitRoundSettings:
    """Device settings sent every round (see :class:`SplitRoundConfig`)."""

    local_steps: int
    local_loss_steps: int
    batch_size: int
    learning_rate: float
    gamma: float


@dataclass
class SplitAggregate(Aggregate):
    """Outcome of one round (``tensors`` is None when nothing was usable)."""

    tensors: dict[str, torch.Tensor] | None = None
    local_loss: float | None = None
    kept: int = 0
    trunk_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)


class SFPromptFedAvg:
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
    seed : int
        Run seed: the devices derive their batch order from it.
    device : torch.device or str
        Where aggregation runs.
    max_payload_bytes : int
        Largest prompts-and-tail payload accepted from a client.
    bounds : Bounds, optional
        Clipping, weight caps and aggregator (default: :class:`Bounds`'s).
    """

    def __init__(
        self,
        *,
        spec: SplitSpec,
        layout: TensorLayout,
        settings: SplitRoundSettings,
        trunk_address: str,
        trunk_root_certificate: bytes = b"",
        seed: int = 0,
        device: torch.device | str = "cpu",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        bounds: Bounds | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.trunk_address = trunk_address
        self.trunk_root_certificate = trunk_root_certificate
        self.seed = seed
        self.fedavg = TensorFedAvg(
            layout, device=device, max_payload_bytes=max_payload_bytes, bounds=bounds
        )
        self.hello_counts: dict[str, int] = {}

    def budget_allows(self, sampled: int) -> bool:
        """Always True: SFPrompt has no differential privacy."""
        return True

    def configure(
        self,
        server_round: int,
        nodes: Nodes,
        current: Tensors,
        *,
        grants: Mapping[str, bytes] | None = None,
    ) -> list[Message]:
        """Send the global prompts and tail to this round's nodes.

        Parameters
        ----------
        server_round : int
            The round (>= 1).
        nodes : Nodes
            ``node id -> label`` of the sampled nodes.
        current : Tensors
            The global prompts and tail.
        grants : Mapping[str, bytes]
            ``label -> secret`` issued by the trunk for this round; each node
            gets only its own.

        Raises
        ------
        ProtocolError
            If a sampled node has no grant.
        """
        s = self.settings
        grants = grants or {}
        configs = []
        for label in nodes.values():
            grant = grants.get(label)
            if grant is None:
                raise ProtocolError(f"no trunk grant for node {label!r}")
            configs.append(
                SplitRoundConfig(
                    server_round=server_round,
                    local_steps=s.local_steps,
                    local_loss_steps=s.local_loss_steps,
                    batch_size=s.batch_size,
                    learning_rate=s.learning_rate,
                    gamma=s.gamma,
                    seed=self.seed,
                    trunk_address=self.trunk_address,
                    trunk_grant=grant,
                    trunk_root_certificate=self.trunk_root_certificate,
                )
            )
        if not configs:
            return []
        contents = encode_split_train_ins_per_node(
            SplitTrainIns(self.spec, configs[0], dict(current)), configs
        )
        return [
            Message(content=c, dst_node_id=n, message_type=MESSAGE_TRAIN_SFPROMPT)
            for n, c in zip(nodes, contents, strict=True)
        ]

    def aggregate(
        self,
        server_round: int,
        replies: Sequence[LabelledReply],
        current: Tensors | None = None,
    ) -> SplitAggregate:
        """Validate replies, then aggregate the accepted prompts and tails.

        ``current`` is the global prompts and tail the round started from
        (None: the bounds apply to the replied tensors themselves).
        """
        r = self.fedavg.round(
            server_round,
            replies,
            decode_split_train_res,
            lambda res: res.tensors,
            current=current,
            reported=self.hello_counts,
        )
        return SplitAggregate(
            tensors=r.mean,
            accepted=r.accepted,
            rejected=r.rejected,
            train_loss=r.weighted(lambda res: res.train_loss),
            local_loss=r.weighted(lambda res: res.local_loss),
            num_examples=r.num_examples,
            kept=sum(res.kept for _, res in r.good),
            trunk_bytes={
                who: (res.trunk_bytes_up, res.trunk_bytes_down) for who, res in r.good
            },
            stats=dict(r.stats),
        )

    def summary(self) -> str:
        """The strategy's settings in one line."""
        st = self.settings
        return (
            f"SFPromptFedAvg: prompts={self.spec.num_prompts} "
            f"client_blocks={self.spec.client_blocks} tail={self.spec.tail} "
            f"steps={st.local_steps} local_loss_steps={st.local_loss_steps} "
            f"batch={st.batch_size} lr={st.learning_rate:g} gamma={st.gamma:g} "
            f"trunk={self.trunk_address} {self.fedavg.bounds.summary()}"
        )
