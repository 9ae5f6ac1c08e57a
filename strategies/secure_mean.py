"""From a SecAgg+ round's unmasked mean to a method's new global state (pure).

Under ``privacy.secagg`` a strategy receives one reply, labelled
:data:`~protocols.messages.SECURE_MEAN_LABEL`, instead of one per node
(:mod:`server.secure_aggregation`). It holds the survivors' weighted mean
of their flat updates, the total weight their weight slots claimed, the
weights the server dictated and each survivor's clear metrics
(:class:`~protocols.messages.SecureMean`). This module checks it and maps
it back:

* LoRA: ``new adapter = current + unflatten(mean)`` (:func:`lora_update`);
* FedKSeed: ``coefficients = -lr * mean``, the non-zero ones kept as sorted
  int32 indices and float32 values (:func:`seed_coefficients`).

Every function refuses (:class:`SecureMeanError`; the caller keeps its
state) a result whose total weight differs from the sum of the survivors'
dictated weights by more than the quantization of the weight slots (a node
claimed a weight it was not given), or that holds a non-finite value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Message

from protocols.errors import ProtocolError
from protocols.messages import (
    MAX_WIRE_FLOAT,
    MESSAGE_SECURE_MEAN,
    SECURE_MEAN_LABEL,
    SecureMean,
    decode_secure_mean,
)
from strategies.strategy import LabelledReply

__all__ = [
    "SecureMeanError",
    "check_secure_mean",
    "find_secure_mean",
    "lora_update",
    "secure_train_loss",
    "seed_coefficients",
    "unflatten",
]


class SecureMeanError(ValueError):
    """A SecAgg+ result that must not become the global state."""


def find_secure_mean(replies: Sequence[LabelledReply]) -> SecureMean | None:
    """The round's SecAgg+ result, or None when the replies are plain ones.

    The result is the reply labelled ``secure-mean`` whose message type is
    :data:`~protocols.messages.MESSAGE_SECURE_MEAN`, which the server builds
    and no node's reply has (a node may call itself ``secure-mean``).

    Raises
    ------
    SecureMeanError
        If the secure-mean reply is not alone, or cannot be read.
    """
    secure = [
        m
        for who, m in replies
        if who == SECURE_MEAN_LABEL and m.metadata.message_type == MESSAGE_SECURE_MEAN
    ]
    if not secure:
        return None
    if len(replies) != 1:
        raise SecureMeanError(
            f"a secure-mean reply must come alone, got {len(replies)} replies"
        )
    message: Message = secure[0]
    try:
        return decode_secure_mean(message.content)
    except (ProtocolError, KeyError, TypeError, ValueError) as exc:
        raise SecureMeanError(f"unreadable secure-mean reply: {exc}") from None


def check_secure_mean(result: SecureMean) -> None:
    """Refuse a result with a wrong total weight or a non-finite value.

    The weight slot of each client is ``round(w_i / max_weight * T)``, so the
    total is exact to half a step per client.

    Raises
    ------
    SecureMeanError
        If no node survived, the total weight is off by more than
        ``n * weight_step / 2`` (plus float slack) from the dictated sum, or
        the mean holds NaN or Inf.
    """
    if not result.survivors:
        raise SecureMeanError("no node survived the SecAgg+ round")
    expected = float(sum(result.weights))
    tolerance = len(result.weights) * result.weight_step / 2 + 1e-9 * expected
    if not (
        math.isfinite(result.total_weight)
        and abs(result.total_weight - expected) <= tolerance
    ):
        raise SecureMeanError(
            f"total weight {result.total_weight!r} differs from the survivors' "
            f"dictated {expected:g} (tolerance {tolerance:.3g})"
        )
    if not np.isfinite(result.mean).all():
        raise SecureMeanError("the secure mean holds NaN or Inf")


def unflatten(
    flat: np.ndarray, like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Split ``flat`` into tensors shaped like ``like``'s, in its order (float32).

    Raises
    ------
    SecureMeanError
        If the lengths differ.
    """
    total = sum(t.numel() for t in like.values())
    if flat.ndim != 1 or flat.size != total:
        raise SecureMeanError(
            f"secure mean has {flat.size} values, the layout needs {total}"
        )
    out, start = {}, 0
    values = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    for name, t in like.items():
        n = t.numel()
        out[name] = values[start : start + n].reshape(t.shape).clone()
        start += n
    return out


def lora_update(
    current: Mapping[str, torch.Tensor], result: SecureMean
) -> dict[str, torch.Tensor]:
    """``current + unflatten(mean)``, each tensor in its own dtype and device.

    Raises
    ------
    SecureMeanError
        If :func:`check_secure_mean` refuses ``result``, the length does not
        fit ``current``, or the new adapter is not finite.
    """
    check_secure_mean(result)
    delta = unflatten(result.mean, current)
    new = {
        k: (t.float() + delta[k].to(t.device)).to(t.dtype) for k, t in current.items()
    }
    if not all(bool(torch.isfinite(t).all()) for t in new.values()):
        raise SecureMeanError("the new adapter would hold NaN or Inf")
    return new


def seed_coefficients(
    result: SecureMean, *, num_seeds: int, learning_rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedKSeed's round delta from the mean per-seed sums: ``-lr * mean``.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        Strictly increasing int32 indices of the seeds whose float32
        coefficient is non-zero, and those float32 coefficients.

    Raises
    ------
    SecureMeanError
        If :func:`check_secure_mean` refuses ``result``, the mean is not
        ``num_seeds`` long, or a float32 coefficient is not finite.
    """
    check_secure_mean(result)
    if result.mean.shape != (num_seeds,):
        raise SecureMeanError(
            f"secure mean has {result.mean.size} values, FedKSeed has {num_seeds} seeds"
        )
    c32 = torch.from_numpy(result.mean * -learning_rate).to(torch.float32)
    if not bool(torch.isfinite(c32).all()):
        raise SecureMeanError("a seed coefficient is not finite in float32")
    keep = torch.nonzero(c32 != 0).flatten()
    return keep.to(torch.int32), c32[keep]


def secure_train_loss(result: SecureMean) -> float | None:
    """The survivors' train loss, weighted by their dictated weights.

    Only clear ``train-loss`` values that are finite numbers within
    :data:`~protocols.messages.MAX_WIRE_FLOAT` count; None if none does.
    """
    total = acc = 0.0
    for label, weight in zip(result.survivors, result.weights, strict=True):
        loss = result.metrics.get(label, {}).get("train-loss")
        if (
            isinstance(loss, int | float)
            and not isinstance(loss, bool)
            and math.isfinite(loss)
            and abs(loss) <= MAX_WIRE_FLOAT
        ):
            acc += weight * float(loss)
            total += weight
    return acc / total if total > 0 else None
