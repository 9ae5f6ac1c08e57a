"""The privacy records of an exchange: local DP, client clipping, SecAgg+.

Optional records a training instruction carries beside the method's own
(``train.lora``, ``train.zo``), and the one result a SecAgg+ round hands to
a strategy. Built and read only here; :mod:`protocols.messages` re-exports
every name.

``local-dp``
    :class:`LocalPrivacy`: ``privacy.mode = "local"``, the client clips and
    noises its own update (:func:`put_local_privacy`, :func:`get_local_privacy`).
``client-clip``
    :class:`ClientClip`: ``privacy.clipping = "client"``, the client clips its
    update, the server adds the noise (:func:`put_client_clip`,
    :func:`get_client_clip`).
``secagg``
    :class:`SecAggTask`: ``privacy.secagg``, what the method's handler does
    under Flower's SecAgg+ mod (:func:`put_secagg`, :func:`get_secagg`,
    :func:`strip_secagg`).
``train.secure_mean``
    :class:`SecureMean`: what a SecAgg+ round reveals, built by the server
    (:func:`encode_secure_mean`, :func:`decode_secure_mean`), never sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from protocols.errors import ProtocolError
from protocols.record_fields import MAX_WIRE_FLOAT, get_field, get_record

__all__ = [
    "MESSAGE_SECURE_MEAN",
    "SECURE_MEAN_LABEL",
    "ClearValue",
    "ClientClip",
    "LocalPrivacy",
    "SecAggTask",
    "SecureMean",
    "decode_secure_mean",
    "encode_secure_mean",
    "get_client_clip",
    "get_local_privacy",
    "get_secagg",
    "put_client_clip",
    "put_local_privacy",
    "put_secagg",
    "strip_secagg",
]

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
    rec = get_record(content, _LOCAL_DP, ConfigRecord)
    return LocalPrivacy(
        clip_norm=get_field(rec, "clip-norm", float),
        noise_multiplier=get_field(rec, "noise-multiplier", float),
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
    rec = get_record(content, _CLIENT_CLIP, ConfigRecord)
    return ClientClip(clip_norm=get_field(rec, "clip-norm", float))


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
    rec = get_record(content, _SECAGG, ConfigRecord)
    return SecAggTask(
        action=get_field(rec, "action", str),
        weight=get_field(rec, "weight", int),
        clip=get_field(rec, "clip", float),
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
    arrays = get_record(content, _SECURE_MEAN, ArrayRecord)
    if "mean" not in arrays:
        raise ProtocolError("secure-mean record lacks array 'mean'")
    mean = arrays["mean"].numpy()
    if mean.ndim != 1 or mean.dtype != np.float64:
        raise ProtocolError("secure mean must be a 1-D float64 array")
    summary = get_record(content, _SECURE_SUMMARY, ConfigRecord)
    survivors = tuple(str(s) for s in summary.get("survivors", []))
    weights = tuple(int(w) for w in summary.get("weights", []))
    if len(weights) != len(survivors):
        raise ProtocolError("secure-mean survivors and weights differ in length")
    metrics = {
        label: dict(get_record(content, f"{_SECURE_CLIENT}.{i}", ConfigRecord))
        for i, label in enumerate(survivors)
    }
    dropped_labels = [str(s) for s in summary.get("dropped", [])]
    reasons = [str(s) for s in summary.get("dropped-reasons", [])]
    if len(reasons) != len(dropped_labels):
        raise ProtocolError("secure-mean dropped nodes and reasons differ in length")
    return SecureMean(
        mean=mean,
        total_weight=float(get_field(summary, "total-weight", float)),
        weight_step=float(get_field(summary, "weight-step", float)),
        survivors=survivors,
        weights=weights,
        metrics=metrics,
        dropped=dict(zip(dropped_labels, reasons, strict=True)),
    )
