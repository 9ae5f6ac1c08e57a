"""Payloads of the split-learning round (``train.sfprompt``).

Flower messages only coordinate SFPrompt's rounds; activations and gradients
stream over the trunk service (``protocols/proto/trunk.proto``).

Server -> client (:class:`SplitTrainIns`): the :class:`~protocols.specs.SplitSpec`,
the round's device settings, where the trunk service listens, and the global
trainable tensors (soft prompts and tail). Client -> server
(:class:`SplitTrainRes`): the trained tensors, the example count, the losses
of the local-loss and split phases, how many examples pruning kept and the
bytes the device moved over the trunk service.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocols.codecs import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    TensorLayout,
    decode_tensors,
    encode_tensors,
)
from protocols.errors import ProtocolError
from protocols.methods import SFPROMPT
from protocols.record_fields import get_field as _get
from protocols.record_fields import get_record as _record
from protocols.specs import SplitSpec

__all__ = [
    "ACTION_SFPROMPT",
    "GRANT_BYTES",
    "MESSAGE_TRAIN_SFPROMPT",
    "SplitRoundConfig",
    "SplitTrainIns",
    "SplitTrainRes",
    "decode_split_train_ins",
    "decode_split_train_res",
    "encode_split_train_ins",
    "encode_split_train_ins_per_node",
    "encode_split_train_res",
]

ACTION_SFPROMPT = SFPROMPT.action
MESSAGE_TRAIN_SFPROMPT = f"train.{ACTION_SFPROMPT}"

GRANT_BYTES = 32
"""Length of a trunk grant (``secrets.token_bytes(32)``)."""

_SPEC, _ROUND, _TENSORS, _METRICS = "spec", "round", "tensors", "metrics"


@dataclass(frozen=True, slots=True)
class SplitRoundConfig:
    """One round's device settings and how to reach the trunk service.

    ``trunk_grant`` is this node's secret for this round (:data:`GRANT_BYTES`
    random bytes, a different one per node): the trunk opens a session only
    for it, and forgets it when the round ends. ``trunk_root_certificate`` is
    the PEM of the CA that signed the trunk service's certificate (empty:
    plaintext). Both travel over the Flower connection, which the device
    already trusts, so a device needs no extra set-up to reach the trunk.
    """

    server_round: int
    local_steps: int
    local_loss_steps: int
    batch_size: int
    learning_rate: float
    gamma: float
    seed: int
    trunk_address: str
    trunk_grant: bytes = field(repr=False)
    trunk_root_certificate: bytes = b""

    def __post_init__(self) -> None:
        checks = {
            "server_round": self.server_round >= 1,
            "local_steps": self.local_steps >= 1,
            "local_loss_steps": self.local_loss_steps >= 0,
            "batch_size": self.batch_size >= 1,
            "learning_rate": math.isfinite(self.learning_rate)
            and self.learning_rate > 0,
            "gamma": 0.0 < self.gamma <= 1.0,
            "trunk_address": ":" in self.trunk_address,
            "trunk_grant": len(self.trunk_grant) == GRANT_BYTES,
        }
        for name, ok in checks.items():
            if not ok:
                shown = "<secret>" if name == "trunk_grant" else getattr(self, name)
                raise ProtocolError(
                    f"split round field '{name}' is out of range: {shown!r}"
                )

    def to_config_record(self) -> ConfigRecord:
        """Encode for the wire."""
        return ConfigRecord(
            {
                "server-round": self.server_round,
                "local-steps": self.local_steps,
                "local-loss-steps": self.local_loss_steps,
                "batch-size": self.batch_size,
                "learning-rate": self.learning_rate,
                "gamma": self.gamma,
                "seed": self.seed,
                "trunk-address": self.trunk_address,
                "trunk-grant": self.trunk_grant,
                "trunk-root-certificate": self.trunk_root_certificate,
            }
        )

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> SplitRoundConfig:
        """Decode and validate; raises :class:`ProtocolError` naming the key."""
        return cls(
            server_round=_get(record, "server-round", int),
            local_steps=_get(record, "local-steps", int),
            local_loss_steps=_get(record, "local-loss-steps", int),
            batch_size=_get(record, "batch-size", int),
            learning_rate=_get(record, "learning-rate", float),
            gamma=_get(record, "gamma", float),
            seed=_get(record, "seed", int),
            trunk_address=_get(record, "trunk-address", str),
            trunk_grant=_get(record, "trunk-grant", bytes),
            trunk_root_certificate=_get(record, "trunk-root-certificate", bytes),
        )


@dataclass(frozen=True, slots=True)
class SplitTrainIns:
    """Server -> client: train these prompts and tail with this trunk."""

    spec: SplitSpec
    config: SplitRoundConfig
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class SplitTrainRes:
    """Client -> server: trained prompts and tail, and how the round went."""

    tensors: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    local_loss: float
    kept: int
    trunk_bytes_up: int
    trunk_bytes_down: int


def encode_split_train_ins(ins: SplitTrainIns) -> RecordDict:
    """Build the content of a ``train.sfprompt`` instruction."""
    return RecordDict(
        {
            _SPEC: ins.spec.to_config_record(),
            _ROUND: ins.config.to_config_record(),
            _TENSORS: encode_tensors(ins.tensors),
        }
    )


def encode_split_train_ins_per_node(
    ins: SplitTrainIns, configs: Sequence[SplitRoundConfig]
) -> list[RecordDict]:
    """One instruction per round config (per node), sharing the encoded tensors.

    The spec and tensors are encoded once; only the round record (which holds
    each node's grant) differs. ``ins.config`` is not used.
    """
    spec = ins.spec.to_config_record()
    tensors = encode_tensors(ins.tensors)
    return [
        RecordDict({_SPEC: spec, _ROUND: c.to_config_record(), _TENSORS: tensors})
        for c in configs
    ]


def decode_split_train_ins(
    content: RecordDict, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> SplitTrainIns:
    """Read a ``train.sfprompt`` instruction (layout checked by the caller)."""
    return SplitTrainIns(
        spec=SplitSpec.from_config_record(_record(content, _SPEC, ConfigRecord)),
        config=SplitRoundConfig.from_config_record(
            _record(content, _ROUND, ConfigRecord)
        ),
        tensors=decode_tensors(
            _record(content, _TENSORS, ArrayRecord), max_bytes=max_bytes
        ),
    )


def encode_split_train_res(res: SplitTrainRes) -> RecordDict:
    """Build the content of a ``train.sfprompt`` reply."""
    return RecordDict(
        {
            _TENSORS: encode_tensors(res.tensors),
            _METRICS: MetricRecord(
                {
                    "num-examples": res.num_examples,
                    "train-loss": res.train_loss,
                    "local-loss": res.local_loss,
                    "kept": res.kept,
                    "trunk-bytes-up": res.trunk_bytes_up,
                    "trunk-bytes-down": res.trunk_bytes_down,
                }
            ),
        }
    )


def decode_split_train_res(
    content: RecordDict,
    *,
    expected: TensorLayout,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    device: torch.device | str = "cpu",
) -> SplitTrainRes:
    """Read and fully validate a ``train.sfprompt`` reply.

    Raises
    ------
    ProtocolError
        On a missing record, a layout other than ``expected``, NaN/Inf values,
        a non-positive example count or non-finite losses.
    """
    metrics = _record(content, _METRICS, MetricRecord)
    n = _get(metrics, "num-examples", int)
    if n <= 0:
        raise ProtocolError(f"'num-examples' must be > 0, got {n}")
    tensors = decode_tensors(
        _record(content, _TENSORS, ArrayRecord),
        expected=expected,
        max_bytes=max_bytes,
        device=device,
    )
    return SplitTrainRes(
        tensors=tensors,
        num_examples=n,
        train_loss=_get(metrics, "train-loss", float),
        local_loss=_get(metrics, "local-loss", float),
        kept=_get(metrics, "kept", int),
        trunk_bytes_up=_get(metrics, "trunk-bytes-up", int),
        trunk_bytes_down=_get(metrics, "trunk-bytes-down", int),
    )
