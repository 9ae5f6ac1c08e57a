"""Message actions, record keys and the typed payloads of each exchange.

Every payload that crosses between server and client is built and read here,
so no other module spells a record key. Decoders validate and raise
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
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocols.codecs import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    TensorLayout,
    decode_tensors,
    encode_tensors,
)
from protocols.errors import ProtocolError
from protocols.methods import LORA
from protocols.specs import LoraSpec

__all__ = [
    "ACTION_HELLO",
    "ERROR_BAD_INSTRUCTION",
    "ERROR_NODE_SETUP",
    "ERROR_OUT_OF_SYNC",
    "ACTION_LORA",
    "MAX_LABEL_CHARS",
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

MAX_WIRE_FLOAT = 1e30
"""Largest magnitude of any float read from the wire (metrics, settings).

A loss or rate beyond it is nonsense, and the bound keeps every aggregate
finite: an example-weighted mean of values within it cannot overflow float64,
where ``1e308`` alone overflows once weighted by two examples.
"""

MAX_LABEL_CHARS = 128


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
        "server_round": _get(record, "server-round", int),
        "local_steps": _get(record, "local-steps", int),
        "batch_size": _get(record, "batch-size", int),
        "seed": _get(record, "seed", int),
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
    """

    learning_rate: float
    weight_decay: float

    def __post_init__(self) -> None:
        RoundSchedule.__post_init__(self)
        _check_fields(
            self,
            {
                "learning_rate": self.learning_rate > 0
                and math.isfinite(self.learning_rate),
                "weight_decay": self.weight_decay >= 0
                and math.isfinite(self.weight_decay),
            },
        )

    def to_config_record(self) -> ConfigRecord:
        """Encode for the wire."""
        record = RoundSchedule.to_config_record(self)
        record["learning-rate"] = self.learning_rate
        record["weight-decay"] = self.weight_decay
        return record

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> LocalTrainConfig:
        """Decode and validate; raises :class:`ProtocolError` naming the key."""
        return LocalTrainConfig(
            **_schedule_fields(record),
            learning_rate=_get(record, "learning-rate", float),
            weight_decay=_get(record, "weight-decay", float),
        )


def _get(record: Mapping[str, Any], key: str, kind: type) -> Any:
    """Read ``record[key]`` as ``kind``, naming the key when it is wrong."""
    if key not in record:
        raise ProtocolError(f"record lacks key '{key}'")
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(
            f"key '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, float) and not (
        math.isfinite(value) and abs(value) <= MAX_WIRE_FLOAT
    ):
        raise ProtocolError(
            f"key '{key}' must be finite with magnitude <= {MAX_WIRE_FLOAT:g}, "
            f"got {value!r}"
        )
    return value


def _record(content: RecordDict, key: str, kind: type) -> Any:
    if key not in content:
        raise ProtocolError(f"message content lacks record '{key}'")
    rec = content[key]
    if not isinstance(rec, kind):
        raise ProtocolError(f"record '{key}' must be a {kind.__name__}")
    return rec


_LOCAL_DP = "local-dp"


@dataclass(frozen=True, slots=True)
class LocalPrivacy:
    """Local differential privacy a client applies to its update before replying.

    Sent, as an optional ``local-dp`` record, in a training instruction of a
    run with ``privacy.mode = "local"`` (see :mod:`strategies.privacy`): the
    client clips its update to L2 norm ``clip_norm`` and adds Gaussian noise
    of standard deviation ``noise_multiplier * clip_norm`` to every value.

    Attributes
    ----------
    clip_norm : float
        C, > 0.
    noise_multiplier : float
        sigma, > 0.
    """

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_WIRE_FLOAT):
                raise ProtocolError(
                    f"local-dp field '{name}' must be finite and > 0, got {value!r}"
                )

    def std(self) -> float:
        """The noise's standard deviation, ``sigma * C``."""
        return self.noise_multiplier * self.clip_norm


def put_local_privacy(content: RecordDict, dp: LocalPrivacy | None) -> RecordDict:
    """Add ``dp`` to an instruction's content (nothing when None); returns it."""
    if dp is not None:
        content[_LOCAL_DP] = ConfigRecord(
            {"clip-norm": dp.clip_norm, "noise-multiplier": dp.noise_multiplier}
        )
    return content


def get_local_privacy(content: RecordDict) -> LocalPrivacy | None:
    """The instruction's local DP settings, or None when it asks for none.

    Raises
    ------
    ProtocolError
        If the record is there but malformed.
    """
    if _LOCAL_DP not in content:
        return None
    rec = _record(content, _LOCAL_DP, ConfigRecord)
    return LocalPrivacy(
        clip_norm=_get(rec, "clip-norm", float),
        noise_multiplier=_get(rec, "noise-multiplier", float),
    )


_CLIENT_CLIP = "client-clip"


@dataclass(frozen=True, slots=True)
class ClientClip:
    """The L2 bound a client clips its update to before replying (no noise).

    Sent, as an optional ``client-clip`` record, in a training instruction of
    a run with ``privacy.mode = "central"`` and ``privacy.clipping =
    "client"`` (Flower's client-side fixed clipping; see
    :mod:`strategies.privacy`): the server adds the noise to the sum.

    Attributes
    ----------
    clip_norm : float
        C, > 0.
    """

    clip_norm: float

    def __post_init__(self) -> None:
        value = self.clip_norm
        if not (math.isfinite(value) and 0 < value <= MAX_WIRE_FLOAT):
            raise ProtocolError(
                f"client-clip field 'clip-norm' must be finite and > 0, got {value!r}"
            )


def put_client_clip(content: RecordDict, clip: ClientClip | None) -> RecordDict:
    """Add ``clip`` to an instruction's content (nothing when None); returns it."""
    if clip is not None:
        content[_CLIENT_CLIP] = ConfigRecord({"clip-norm": clip.clip_norm})
    return content


def get_client_clip(content: RecordDict) -> ClientClip | None:
    """The instruction's client clip, or None when it asks for none.

    Raises
    ------
    ProtocolError
        If the record is there but malformed.
    """
    if _CLIENT_CLIP not in content:
        return None
    rec = _record(content, _CLIENT_CLIP, ConfigRecord)
    return ClientClip(clip_norm=_get(rec, "clip-norm", float))


_SECAGG = "secagg"
_SECAGGPLUS_CONFIGS = "secaggplus_configs"  # Flower's RECORD_KEY_CONFIGS (SecAgg+ mod)
_SECURE_MEAN = "secure-mean"
_SECURE_SUMMARY = "secure-summary"
_SECURE_CLIENT = "secure-client"
SECURE_MEAN_LABEL = "secure-mean"
"""The label of the one reply a SecAgg+ round hands to a strategy."""
MESSAGE_SECURE_MEAN = "train.secure_mean"
"""Its message type: built by the server, never a node's reply type."""


@dataclass(frozen=True, slots=True)
class SecAggTask:
    """What a SecAgg+ ``train`` instruction asks of the method's own handler.

    Sent, as a ``secagg`` record, next to the method's instruction records in
    a ``privacy.secagg`` run (:mod:`server.secure_aggregation`).

    Attributes
    ----------
    action : str
        The method's training action (``lora``, ``zo``) whose handler runs.
    weight : int
        The weight the server dictates for this node's update (>= 1); the
        node reports it as its ``num_examples`` to Flower's SecAgg+ mod.
    clip : float
        SecAgg+ clipping range: each weighted value is clipped to +-clip
        before quantization (> 0).
    """

    action: str
    weight: int
    clip: float

    def __post_init__(self) -> None:
        if not (self.action.isidentifier() and self.action.islower()):
            raise ProtocolError(f"secagg action {self.action!r} is not an action")
        if self.weight < 1:
            raise ProtocolError(f"secagg weight must be >= 1, got {self.weight}")
        if not (math.isfinite(self.clip) and 0 < self.clip <= MAX_WIRE_FLOAT):
            raise ProtocolError(f"secagg clip must be finite and > 0, got {self.clip}")


def put_secagg(content: RecordDict, task: SecAggTask) -> RecordDict:
    """Add ``task`` to an instruction's content; returns it."""
    content[_SECAGG] = ConfigRecord(
        {"action": task.action, "weight": task.weight, "clip": task.clip}
    )
    return content


def get_secagg(content: RecordDict) -> SecAggTask | None:
    """The instruction's SecAgg+ task, or None when it has none.

    Raises
    ------
    ProtocolError
        If the record is there but malformed.
    """
    if _SECAGG not in content:
        return None
    rec = _record(content, _SECAGG, ConfigRecord)
    return SecAggTask(
        action=_get(rec, "action", str),
        weight=_get(rec, "weight", int),
        clip=_get(rec, "clip", float),
    )


def strip_secagg(content: RecordDict) -> RecordDict:
    """A copy of ``content`` without the SecAgg+ records (the method's own records).

    The records themselves are shared, not copied.
    """
    drop = {_SECAGG, _SECAGGPLUS_CONFIGS}
    return RecordDict({k: v for k, v in content.items() if k not in drop})


ClearValue = int | float | str | bool | bytes


@dataclass(frozen=True)
class SecureMean:
    """What a SecAgg+ round reveals to the server: a mean, never an update.

    Attributes
    ----------
    mean : np.ndarray
        1-D float64: ``sum_i w_i x_i / sum_i w_i`` over the survivors, each
        ``x_i`` the node's flat update (LoRA: adapter change in layout order;
        FedKSeed: per-seed scalar sums), within the quantization error.
    total_weight : float
        ``sum_i w_i`` as the unmasked weight slot says (each client's slot is
        its own claim; quantized to ``weight_step``).
    weight_step : float
        Quantum of one client's weight (``max_weight / quantization``).
    survivors : tuple[str, ...]
        Labels of the nodes whose update is in ``mean``, sorted.
    weights : tuple[int, ...]
        The weight the server dictated to each survivor (same order).
    metrics : dict[str, dict[str, ClearValue]]
        Each survivor's clear metrics (train loss, example count...), as
        the node sent them: unvalidated.
    dropped : dict[str, str]
        Each sampled node left out of the mean, and why (its error reply's
        text, or that it did not answer a stage).
    """

    mean: np.ndarray
    total_weight: float
    weight_step: float
    survivors: tuple[str, ...]
    weights: tuple[int, ...]
    metrics: dict[str, dict[str, ClearValue]]
    dropped: dict[str, str] = field(default_factory=dict)


def encode_secure_mean(result: SecureMean) -> RecordDict:
    """The content of the server-side ``secure-mean`` reply (never on the wire)."""
    content = RecordDict(
        {
            _SECURE_MEAN: ArrayRecord(
                {"mean": Array(np.ascontiguousarray(result.mean, dtype=np.float64))}
            ),
            _SECURE_SUMMARY: ConfigRecord(
                {
                    "total-weight": float(result.total_weight),
                    "weight-step": float(result.weight_step),
                    "survivors": list(result.survivors),
                    "weights": [int(w) for w in result.weights],
                    "dropped": list(result.dropped),
                    "dropped-reasons": list(result.dropped.values()),
                }
            ),
        }
    )
    for i, label in enumerate(result.survivors):
        content[f"{_SECURE_CLIENT}.{i}"] = ConfigRecord(
            dict(result.metrics.get(label, {}))
        )
    return content


def decode_secure_mean(content: RecordDict) -> SecureMean:
    """Read a ``secure-mean`` reply (values are not checked for finiteness here).

    Raises
    ------
    ProtocolError
        On a missing record or inconsistent lengths.
    """
    arrays = _record(content, _SECURE_MEAN, ArrayRecord)
    if "mean" not in arrays:
        raise ProtocolError("secure-mean record lacks array 'mean'")
    mean = arrays["mean"].numpy()
    if mean.ndim != 1 or mean.dtype != np.float64:
        raise ProtocolError("secure mean must be a 1-D float64 array")
    summary = _record(content, _SECURE_SUMMARY, ConfigRecord)
    survivors = tuple(str(s) for s in summary.get("survivors", []))
    weights = tuple(int(w) for w in summary.get("weights", []))
    if len(weights) != len(survivors):
        raise ProtocolError("secure-mean survivors and weights differ in length")
    metrics = {
        label: dict(_record(content, f"{_SECURE_CLIENT}.{i}", ConfigRecord))
        for i, label in enumerate(survivors)
    }
    dropped_labels = [str(s) for s in summary.get("dropped", [])]
    reasons = [str(s) for s in summary.get("dropped-reasons", [])]
    if len(reasons) != len(dropped_labels):
        raise ProtocolError("secure-mean dropped nodes and reasons differ in length")
    return SecureMean(
        mean=mean,
        total_weight=float(_get(summary, "total-weight", float)),
        weight_step=float(_get(summary, "weight-step", float)),
        survivors=survivors,
        weights=weights,
        metrics=metrics,
        dropped=dict(zip(dropped_labels, reasons, strict=True)),
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
    nonce: bytes = _get(_record(content, _HELLO_INS, ConfigRecord), "nonce", bytes)
    if not 16 <= len(nonce) <= 64:
        raise ProtocolError(f"hello nonce must be 16-64 bytes, got {len(nonce)}")
    return nonce


@dataclass(frozen=True, slots=True)
class NodeHello:
    """A node's self-description: a stable label and how much data it holds.

    ``signature`` is the node's signature of (nonce, label, node id)
    (:func:`protocols.identity.sign_hello`), empty when it has no key.
    """

    label: str
    num_examples: int
    signature: bytes = b""


def encode_hello(hello: NodeHello) -> RecordDict:
    """Client -> server reply to ``query.hello``."""
    return RecordDict(
        {
            _HELLO: ConfigRecord(
                {
                    "label": hello.label,
                    NUM_EXAMPLES: hello.num_examples,
                    "signature": hello.signature,
                }
            )
        }
    )


def decode_hello(content: RecordDict) -> NodeHello:
    """Read a ``query.hello`` reply.

    Raises
    ------
    ProtocolError
        On a missing key, or a label that is empty, longer than
        :data:`MAX_LABEL_CHARS` or not printable (labels go into logs).
    """
    rec = _record(content, _HELLO, ConfigRecord)
    label: str = _get(rec, "label", str)
    if not (0 < len(label) <= MAX_LABEL_CHARS and label.isprintable()):
        raise ProtocolError(
            f"'label' must be 1-{MAX_LABEL_CHARS} printable characters, "
            f"got {label[:MAX_LABEL_CHARS]!r}"
        )
    return NodeHello(
        label=label,
        num_examples=_get(rec, NUM_EXAMPLES, int),
        signature=_get(rec, "signature", bytes),
    )


@dataclass(frozen=True, slots=True)
class LoraTrainIns:
    """Server -> client: train this adapter under this spec."""

    spec: LoraSpec
    config: LocalTrainConfig
    adapter: dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class LoraTrainRes:
    """Client -> server: the trained adapter and how it was obtained."""

    adapter: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float


def encode_lora_train_ins(ins: LoraTrainIns) -> RecordDict:
    """Build the content of a ``train.lora`` instruction."""
    return RecordDict(
        {
            _SPEC: ins.spec.to_config_record(),
            _TRAIN: ins.config.to_config_record(),
            _ADAPTER: encode_tensors(ins.adapter),
        }
    )


def decode_lora_train_ins(
    content: RecordDict,
    *,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> LoraTrainIns:
    """Read a ``train.lora`` instruction (the layout is checked by the caller).

    Raises
    ------
    ProtocolError
        On a missing record, a bad spec or train config, or a bad adapter.
    """
    spec = LoraSpec.from_config_record(_record(content, _SPEC, ConfigRecord))
    config = LocalTrainConfig.from_config_record(_record(content, _TRAIN, ConfigRecord))
    adapter = decode_tensors(
        _record(content, _ADAPTER, ArrayRecord), max_bytes=max_bytes
    )
    return LoraTrainIns(spec=spec, config=config, adapter=adapter)


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
    metrics = _record(content, _METRICS, MetricRecord)
    num_examples = _get(metrics, NUM_EXAMPLES, int)
    if num_examples <= 0:
        raise ProtocolError(f"'{NUM_EXAMPLES}' must be > 0, got {num_examples}")
    train_loss = _get(metrics, TRAIN_LOSS, float)
    adapter = decode_tensors(
        _record(content, _ADAPTER, ArrayRecord),
        expected=expected,
        max_bytes=max_bytes,
        device=device,
    )
    return LoraTrainRes(
        adapter=adapter, num_examples=num_examples, train_loss=train_loss
    )
