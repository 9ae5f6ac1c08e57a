"""Message actions, record keys and the typed payloads of each exchange.

Every payload that crosses between server and client is built and read here
or in a sibling that owns one family of records (:mod:`protocols.privacy_messages`:
local DP, client clipping and SecAgg+, re-exported here;
:mod:`protocols.zo_messages`, :mod:`protocols.split_messages`), so no other
module spells a record key. Decoders read each key through
:mod:`protocols.record_fields`, validate, and raise
:class:`~protocols.errors.ProtocolError` naming the offending key.

Exchanges
---------
``query.hello``
    Server -> client: a fresh random nonce (:func:`encode_hello_ins`).
    Client -> server: :class:`NodeHello` (its label, example count and, when
    it has a node key, its signature of the nonce, label and node id; see
    :mod:`protocols.identity`), used to order nodes deterministically, to
    bind labels to keys and to wait for the federation to assemble.
``train.lora``
    Server -> client: :class:`LoraTrainIns` (spec, local training settings,
    the global adapter). Client -> server: :class:`LoraTrainRes` (its trained
    adapter, example count and mean training loss).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocols.codecs import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    TensorLayout,
    decode_tensors,
    encode_tensors,
)
from protocols.errors import ProtocolError
from protocols.methods import LORA
from protocols.privacy_messages import (
    MESSAGE_SECURE_MEAN,
    SECURE_MEAN_LABEL,
    ClientClip,
    LocalPrivacy,
    SecAggTask,
    SecureMean,
    decode_secure_mean,
    encode_secure_mean,
    get_client_clip,
    get_local_privacy,
    get_secagg,
    put_client_clip,
    put_local_privacy,
    put_secagg,
    strip_secagg,
)
from protocols.record_fields import MAX_WIRE_FLOAT, get_field, get_record
from protocols.specs import LoraSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "ACTION_HELLO",
    "ERROR_BAD_INSTRUCTION",
    "ERROR_NODE_SETUP",
    "ERROR_OUT_OF_SYNC",
    "ACTION_LORA",
    "MAX_LABEL_CHARS",
    "MAX_LORA_RANK",
    "MAX_WIRE_FLOAT",
    "ClientClip",
    "LocalPrivacy",
    "LocalTrainConfig",
    "LoraTrainIns",
    "LoraTrainRes",
    "MESSAGE_HELLO",
    "MESSAGE_TRAIN_LORA",
    "NodeHello",
    "RoundSchedule",
    "decode_hello",
    "decode_hello_ins",
    "decode_lora_train_ins",
    "decode_lora_train_res",
    "check_adapter_rank",
    "check_residual",
    "encode_hello",
    "encode_hello_ins",
    "encode_lora_train_ins",
    "encode_lora_train_res",
    "get_client_clip",
    "get_local_privacy",
    "put_client_clip",
    "put_local_privacy",
    "MESSAGE_SECURE_MEAN",
    "SECURE_MEAN_LABEL",
    "SecAggTask",
    "SecureMean",
    "decode_secure_mean",
    "encode_secure_mean",
    "get_secagg",
    "put_secagg",
    "strip_secagg",
]

# Error codes of client error replies (flwr ``Error.code``).
ERROR_BAD_INSTRUCTION = 4001  # the instruction broke the contract (spec, payload)
ERROR_NODE_SETUP = 4002  # the node lacks what it needs (data, model)
ERROR_OUT_OF_SYNC = (
    4003  # the node cannot reach the target model: resend history from 0
)

ACTION_HELLO = "hello"
ACTION_LORA = LORA.action
MESSAGE_HELLO = f"query.{ACTION_HELLO}"
MESSAGE_TRAIN_LORA = f"train.{ACTION_LORA}"

_SPEC = "spec"
_TRAIN = "train"
_ADAPTER = "adapter"
_METRICS = "metrics"
_HELLO = "hello"
_HELLO_INS = "hello-ins"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
_PROXIMAL_MU = "proximal-mu"  # the key of Flower's FedProx

MAX_LABEL_CHARS = 128
MAX_LORA_RANK = 4096
"""The largest LoRA rank a node may report at hello."""
_LORA_RANK = "lora-rank"  # hello: the node's rank; train.lora: the rank to train
_LORA_RESIDUAL = "lora-residual"  # train.lora: FedEx-LoRA's cumulative residual


@dataclass(frozen=True, slots=True)
class RoundSchedule:
    """What every method's round instruction says about local work.

    Attributes
    ----------
    server_round : int
        The round this training belongs to (>= 1).
    local_steps : int
        Steps to take (>= 1).
    batch_size : int
        Examples per step (>= 1).
    seed : int
        Run seed; the client derives its batch order (and dropout, seed
        draws) from (seed, round, its partition label).

    Method settings that a spec already carries (FedKSeed's learning rate)
    are not repeated here: every setting travels once per message.
    """

    server_round: int
    local_steps: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        _check_fields(
            self,
            {
                "server_round": self.server_round >= 1,
                "local_steps": self.local_steps >= 1,
                "batch_size": self.batch_size >= 1,
            },
        )

    def to_config_record(self) -> ConfigRecord:
        """Encode for the wire."""
        return ConfigRecord(
            {
                "server-round": self.server_round,
                "local-steps": self.local_steps,
                "batch-size": self.batch_size,
                "seed": self.seed,
            }
        )

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> RoundSchedule:
        """Decode and validate; raises :class:`ProtocolError` naming the key."""
        return RoundSchedule(**_schedule_fields(record))


def _schedule_fields(record: ConfigRecord) -> dict[str, int]:
    return {
        "server_round": get_field(record, "server-round", int),
        "local_steps": get_field(record, "local-steps", int),
        "batch_size": get_field(record, "batch-size", int),
        "seed": get_field(record, "seed", int),
    }


def _check_fields(config: object, checks: Mapping[str, bool]) -> None:
    for name, ok in checks.items():
        if not ok:
            raise ProtocolError(
                f"train config field '{name}' is out of range: "
                f"{getattr(config, name)!r}"
            )


@dataclass(frozen=True, slots=True)
class LocalTrainConfig(RoundSchedule):
    """A round of gradient training: the schedule plus the optimiser settings.

    Attributes
    ----------
    learning_rate : float
        AdamW learning rate (> 0).
    weight_decay : float
        AdamW decoupled weight decay (>= 0).
    proximal_mu : float
        FedProx's proximal weight mu (>= 0; Li et al. 2020): the client adds
        (mu / 2) * ||w - w_global||^2 over its trainable tensors to its loss.
        On the wire as ``"proximal-mu"`` (Flower's FedProx key), written only
        when non-zero, so a message without it means 0.
    """

    learning_rate: float
    weight_decay: float
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        RoundSchedule.__post_init__(self)
        _check_fields(
            self,
            {
                "learning_rate": self.learning_rate > 0
                and math.isfinite(self.learning_rate),
                "weight_decay": self.weight_decay >= 0
                and math.isfinite(self.weight_decay),
                "proximal_mu": self.proximal_mu >= 0
                and math.isfinite(self.proximal_mu),
            },
        )

    def to_config_record(self) -> ConfigRecord:
        """Encode for the wire."""
        record = RoundSchedule.to_config_record(self)
        record["learning-rate"] = self.learning_rate
        record["weight-decay"] = self.weight_decay
        if self.proximal_mu != 0.0:
            record[_PROXIMAL_MU] = self.proximal_mu
        return record

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> LocalTrainConfig:
        """Decode and validate; raises :class:`ProtocolError` naming the key."""
        return LocalTrainConfig(
            **_schedule_fields(record),
            learning_rate=get_field(record, "learning-rate", float),
            weight_decay=get_field(record, "weight-decay", float),
            proximal_mu=get_field(record, _PROXIMAL_MU, float)
            if _PROXIMAL_MU in record
            else 0.0,
        )


def encode_hello_ins(nonce: bytes) -> RecordDict:
    """Server -> client ``query.hello``: the nonce the node signs."""
    return RecordDict({_HELLO_INS: ConfigRecord({"nonce": nonce})})


def decode_hello_ins(content: RecordDict) -> bytes | None:
    """The nonce of a ``query.hello``; None for an empty hello (nothing to sign).

    Raises
    ------
    ProtocolError
        If the record is there but its nonce is not 16-64 bytes.
    """
    if _HELLO_INS not in content:
        return None
    nonce: bytes = get_field(
        get_record(content, _HELLO_INS, ConfigRecord), "nonce", bytes
    )
    if not 16 <= len(nonce) <= 64:
        raise ProtocolError(f"hello nonce must be 16-64 bytes, got {len(nonce)}")
    return nonce


@dataclass(frozen=True, slots=True)
class NodeHello:
    """A node's self-description: a stable label and how much data it holds.

    ``signature`` is the node's signature of (nonce, label, node id)
    (:func:`protocols.identity.sign_hello`), empty when it has no key.
    ``lora_rank`` is the LoRA rank the node trains (node config
    ``lora-rank``), None when it did not say (it then trains the run's
    global rank); on the wire only when set.
    """

    label: str
    num_examples: int
    signature: bytes = b""
    lora_rank: int | None = None


def encode_hello(hello: NodeHello) -> RecordDict:
    """Client -> server reply to ``query.hello``."""
    record = ConfigRecord(
        {
            "label": hello.label,
            NUM_EXAMPLES: hello.num_examples,
            "signature": hello.signature,
        }
    )
    if hello.lora_rank is not None:
        record[_LORA_RANK] = hello.lora_rank
    return RecordDict({_HELLO: record})


def decode_hello(content: RecordDict) -> NodeHello:
    """Read a ``query.hello`` reply.

    Raises
    ------
    ProtocolError
        On a missing key, a label that is empty, longer than
        :data:`MAX_LABEL_CHARS` or not printable (labels go into logs), or a
        LoRA rank outside ``1..MAX_LORA_RANK``.
    """
    rec = get_record(content, _HELLO, ConfigRecord)
    label: str = get_field(rec, "label", str)
    if not (0 < len(label) <= MAX_LABEL_CHARS and label.isprintable()):
        raise ProtocolError(
            f"'label' must be 1-{MAX_LABEL_CHARS} printable characters, "
            f"got {label[:MAX_LABEL_CHARS]!r}"
        )
    rank: int | None = None
    if _LORA_RANK in rec:
        rank = get_field(rec, _LORA_RANK, int)
        if not 1 <= rank <= MAX_LORA_RANK:
            raise ProtocolError(
                f"'{_LORA_RANK}' must be in 1..{MAX_LORA_RANK}, got {rank}"
            )
    return NodeHello(
        label=label,
        num_examples=get_field(rec, NUM_EXAMPLES, int),
        signature=get_field(rec, "signature", bytes),
        lora_rank=rank,
    )


@dataclass(frozen=True, slots=True)
class LoraTrainIns:
    """Server -> client: train this adapter under this spec.

    ``client_rank`` is the rank this node trains, one of
    ``spec.allowed_ranks()``; ``adapter`` has that rank (``lora_A`` rows,
    ``lora_B`` columns). 0, the default, means ``spec.rank`` (it is replaced
    by it). On the wire only when it is not ``spec.rank``, so a same-rank
    instruction encodes as before per-client ranks.

    ``residual`` is FedEx-LoRA's cumulative residual (``spec.aggregation ==
    "exact"`` only): per adapted module prefix (the adapter's names less
    ``.lora_A.weight``), a dense float32 ``(out, in)`` tensor the client adds
    to that module's frozen base weight
    (:func:`strategies.lora_factors.fold_residual`). On the wire (record
    ``lora-residual``, the adapter's codec) only when non-empty.

    Raises
    ------
    ProtocolError
        If ``client_rank`` is not one of ``spec.allowed_ranks()``, or the
        residual does not fit the spec and adapter (:func:`check_residual`).
    """

    spec: LoraSpec
    config: LocalTrainConfig
    adapter: dict[str, torch.Tensor]
    client_rank: int = 0
    residual: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.client_rank == 0:
            object.__setattr__(self, "client_rank", self.spec.rank)
        if self.client_rank not in self.spec.allowed_ranks():
            raise ProtocolError(
                f"'{_LORA_RANK}' {self.client_rank} is not one of the spec's "
                f"allowed ranks {list(self.spec.allowed_ranks())}"
            )
        if self.residual:
            check_residual(self.residual, self.adapter, self.spec)


@dataclass(frozen=True, slots=True)
class LoraTrainRes:
    """Client -> server: the trained adapter and how it was obtained."""

    adapter: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float


def encode_lora_train_ins(ins: LoraTrainIns) -> RecordDict:
    """Build the content of a ``train.lora`` instruction."""
    content = RecordDict(
        {
            _SPEC: ins.spec.to_config_record(),
            _TRAIN: ins.config.to_config_record(),
            _ADAPTER: encode_tensors(ins.adapter),
        }
    )
    if ins.client_rank != ins.spec.rank:
        content[_LORA_RANK] = ConfigRecord({"rank": ins.client_rank})
    if ins.residual:
        content[_LORA_RESIDUAL] = encode_tensors(ins.residual)
    return content


def decode_lora_train_ins(
    content: RecordDict,
    *,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> LoraTrainIns:
    """Read a ``train.lora`` instruction (the layout is checked by the caller).

    Raises
    ------
    ProtocolError
        On a missing record, a bad spec or train config, a bad adapter, a
        client rank the spec does not allow, or (with a client rank on the
        wire) an adapter tensor of another rank, named in the message. An
        instruction at the global rank decodes as before per-client ranks:
        the client's layout check (its model at that rank) refuses a tensor
        of another shape. A residual larger than ``max_bytes``, not under
        ``exact``, or not fitting the adapter (:func:`check_residual`) is
        refused naming the tensor.
    """
    spec = LoraSpec.from_config_record(get_record(content, _SPEC, ConfigRecord))
    config = LocalTrainConfig.from_config_record(
        get_record(content, _TRAIN, ConfigRecord)
    )
    adapter = decode_tensors(
        get_record(content, _ADAPTER, ArrayRecord), max_bytes=max_bytes
    )
    residual: dict[str, torch.Tensor] = {}
    if _LORA_RESIDUAL in content:
        residual = decode_tensors(
            get_record(content, _LORA_RESIDUAL, ArrayRecord), max_bytes=max_bytes
        )
        if not residual:
            raise ProtocolError(f"'{_LORA_RESIDUAL}' is on the wire but empty")
    rank = spec.rank
    if _LORA_RANK in content:
        rank = get_field(get_record(content, _LORA_RANK, ConfigRecord), "rank", int)
    ins = LoraTrainIns(
        spec=spec, config=config, adapter=adapter, client_rank=rank, residual=residual
    )
    check_adapter_rank(adapter, rank)
    return ins


def check_residual(
    residual: Mapping[str, torch.Tensor],
    adapter: Mapping[str, torch.Tensor],
    spec: LoraSpec,
) -> None:
    """Check an ``exact`` residual against the spec and the adapter it goes with.

    Every key must be the prefix of an adapter module (``<key>.lora_A.weight``
    ``(r, in)`` and ``<key>.lora_B.weight`` ``(out, r)`` present), the tensor
    float32 of shape ``(out, in)`` and finite; only under
    ``spec.aggregation == "exact"``. The total size is bounded where it is
    decoded (the payload limit).

    Raises
    ------
    ProtocolError
        Naming the first offending residual tensor.
    """
    import torch

    if spec.aggregation != "exact":
        raise ProtocolError(
            f"'{_LORA_RESIDUAL}' is only sent under lora.aggregation 'exact', "
            f"not {spec.aggregation!r}"
        )
    for key, tensor in residual.items():
        a = adapter.get(f"{key}.lora_A.weight")
        b = adapter.get(f"{key}.lora_B.weight")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2:
            raise ProtocolError(
                f"residual tensor {key!r} names no LoRA module of the adapter"
            )
        want = (int(b.shape[0]), int(a.shape[1]))
        if tuple(tensor.shape) != want or tensor.dtype != torch.float32:
            raise ProtocolError(
                f"residual tensor {key!r} is {tensor.dtype} {list(tensor.shape)}, "
                f"not torch.float32 {list(want)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(f"residual tensor {key!r} contains NaN or Inf values")


def check_adapter_rank(adapter: Mapping[str, torch.Tensor], rank: int) -> None:
    """Check that every ``lora_A`` has ``rank`` rows and every ``lora_B`` columns.

    Raises
    ------
    ProtocolError
        Naming the first tensor of another rank (or not a matrix).
    """
    for name, tensor in adapter.items():
        axis = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
        if axis is None:
            continue
        shape = tuple(tensor.shape)
        if len(shape) != 2 or shape[axis] != rank:
            raise ProtocolError(
                f"adapter tensor {name!r} has shape {list(shape)}, not rank {rank}"
            )


def encode_lora_train_res(res: LoraTrainRes) -> RecordDict:
    """Build the content of a ``train.lora`` reply."""
    return RecordDict(
        {
            _ADAPTER: encode_tensors(res.adapter),
            _METRICS: MetricRecord(
                {NUM_EXAMPLES: res.num_examples, TRAIN_LOSS: res.train_loss}
            ),
        }
    )


def decode_lora_train_res(
    content: RecordDict,
    *,
    expected: TensorLayout,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    device: torch.device | str = "cpu",
) -> LoraTrainRes:
    """Read and fully validate a ``train.lora`` reply.

    Raises
    ------
    ProtocolError
        On a missing record, a layout other than ``expected``, NaN/Inf values,
        a non-positive example count, or a loss that is not finite or exceeds
        :data:`MAX_WIRE_FLOAT` in magnitude (the reason names the metric).
    """
    metrics = get_record(content, _METRICS, MetricRecord)
    num_examples = get_field(metrics, NUM_EXAMPLES, int)
    if num_examples <= 0:
        raise ProtocolError(f"'{NUM_EXAMPLES}' must be > 0, got {num_examples}")
    train_loss = get_field(metrics, TRAIN_LOSS, float)
    adapter = decode_tensors(
        get_record(content, _ADAPTER, ArrayRecord),
        expected=expected,
        max_bytes=max_bytes,
        device=device,
    )
    return LoraTrainRes(
        adapter=adapter, num_examples=num_examples, train_loss=train_loss
    )
