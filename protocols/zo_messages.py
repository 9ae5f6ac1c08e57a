"""Payloads of the seed-based zeroth-order exchange (``train.zo``).

Server -> client (:class:`ZoTrainIns`): the :class:`~protocols.specs.ZOSpec`,
the round's local settings, the *catch-up* history that brings the node from
the round it last synced to the current global model, the hash that model must
have, (FedKSeed-Pro) the round's seed importances and (local differential
privacy) the clip norm and noise multiplier the client applies to its reply,
as :func:`protocols.messages.put_local_privacy` records them, or (central
privacy with client-side clipping) the clip norm alone, as
:func:`protocols.messages.put_client_clip` records it. No weight tensor ever
travels: the history is a list of rounds, each a sorted list of
``(seed index, coefficient)`` pairs, and every party applies them with
:func:`protocols.seeds.apply_seed_sum_` in the same order.

Client -> server (:class:`ZoTrainRes`): one ``(seed index, scalar gradient)``
pair per local step (with local DP, one merged noisy pair per distinct seed,
in increasing seed order; with a client clip, one merged clipped pair per
distinct seed), the example count, the mean local loss, and the round and
model hash the node synced to before training (proof that it was in sync).

Everything is validated on decode: index ranges, finiteness of every scalar,
array lengths, history order, and sizes.

The payloads hold NumPy arrays and this module needs no torch, so a client
without it (an edge device) reads and writes the same bytes through the same
code; torch callers convert at their boundary (``torch.from_numpy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)

from protocols.codecs import decode_arrays, encode_arrays
from protocols.errors import ProtocolError
from protocols.messages import (
    MAX_WIRE_FLOAT,
    ClientClip,
    LocalPrivacy,
    RoundSchedule,
    get_client_clip,
    get_local_privacy,
    put_client_clip,
    put_local_privacy,
)
from protocols.methods import FEDKSEED
from protocols.record_fields import get_field as _get
from protocols.record_fields import get_record as _record
from protocols.specs import ZOSpec

__all__ = [
    "ACTION_ZO",
    "MESSAGE_TRAIN_ZO",
    "RoundDelta",
    "ZoTrainIns",
    "ZoTrainRes",
    "decode_zo_train_ins",
    "decode_zo_train_res",
    "encode_zo_train_ins",
    "encode_zo_train_res",
]

ACTION_ZO = FEDKSEED.action  # FedKSeed and FedKSeed-Pro share it
MESSAGE_TRAIN_ZO = f"train.{ACTION_ZO}"
MAX_ZO_PAYLOAD_BYTES = 64 * 1024 * 1024

_SPEC, _TRAIN, _SYNC, _HISTORY, _PROBS = (  # noqa: RUF100
    "spec",
    "train",
    "sync",
    "history",
    "importance",
)
_STEPS, _METRICS = "steps", "metrics"


_MAX_SCALAR = float(np.float32(MAX_WIRE_FLOAT))
""":data:`~protocols.messages.MAX_WIRE_FLOAT` as float32 rounds it (1.0000000150e30):
a scalar a client wrote as ``1e30`` is within the bound."""


def _check_pairs(
    what: str,
    indices: npt.NDArray[np.int32],
    values: npt.NDArray[np.float32],
    names: tuple[str, str],
) -> None:
    """Raise TypeError unless both are 1-D NumPy arrays (int32, float32) of one length."""
    if not (
        isinstance(indices, np.ndarray)
        and isinstance(values, np.ndarray)
        and indices.dtype == np.int32
        and values.dtype == np.float32
        and indices.ndim == 1
        and indices.shape == values.shape
    ):
        raise TypeError(
            f"{what}: {names[0]} and {names[1]} must be 1-D numpy arrays of one "
            f"length (int32, float32), got {_describe(indices)} and {_describe(values)}"
        )


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"ndarray {a.dtype} {a.shape}"
    return type(a).__name__


@dataclass(frozen=True, slots=True)
class RoundDelta:
    """One round's change to the global model: ``w += sum_j coefficients[j] * z(seed[indices[j]])``.

    ``indices`` are strictly increasing int32 pool indices (1-D NumPy);
    ``coefficients`` float32 (the learning rate and the minus sign already
    folded in). Construction checks the types (TypeError), decoding the values.
    """

    round: int
    indices: npt.NDArray[np.int32]
    coefficients: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        _check_pairs(
            f"RoundDelta {self.round}",
            self.indices,
            self.coefficients,
            ("indices", "coefficients"),
        )


@dataclass(frozen=True, slots=True)
class ZoTrainIns:
    """Server -> client instruction of one FedKSeed round."""

    spec: ZOSpec
    config: RoundSchedule
    base_round: int
    target_round: int
    target_hash: str
    history: tuple[RoundDelta, ...]
    importance: npt.NDArray[np.uint8] | None = None
    local_privacy: LocalPrivacy | None = None  # privacy.mode = "local"
    client_clip: ClientClip | None = None  # privacy.clipping = "client"

    def __post_init__(self) -> None:
        q = self.importance
        if q is not None and not (
            isinstance(q, np.ndarray) and q.dtype == np.uint8 and q.ndim == 1
        ):
            raise TypeError(
                f"importance must be a 1-D numpy uint8 array, got {_describe(q)}"
            )

    def probabilities(self) -> npt.NDArray[np.float64] | None:
        """FedKSeed-Pro's sampling distribution, or None for uniform sampling.

        The server sends the min-max-scaled importances quantised to uint8
        (``q = round(255 * psi~)``, K bytes instead of 4K); the distribution is
        ``softmax(q / 255)``, evaluated here in float64 NumPy (max subtracted
        first). Its last bits may differ from ``torch.softmax`` on the same
        values: the torch client keeps computing its own from
        :attr:`importance` so that its draws stay those of earlier runs.
        """
        if self.importance is None:
            return None
        x = self.importance.astype(np.float64) / 255.0
        e = np.exp(x - x.max())
        p: npt.NDArray[np.float64] = e / e.sum()
        return p


@dataclass(frozen=True, slots=True)
class ZoTrainRes:
    """Client -> server reply: per-step (seed index, scalar) pairs and sync proof."""

    indices: npt.NDArray[np.int32]
    scalars: npt.NDArray[np.float32]
    num_examples: int
    train_loss: float
    synced_round: int
    synced_hash: str
    skipped_steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_pairs("ZoTrainRes", self.indices, self.scalars, ("indices", "scalars"))


def _history_record(history: tuple[RoundDelta, ...]) -> ArrayRecord:
    counts = [len(d.indices) for d in history]
    return encode_arrays(
        {
            "rounds": np.array([d.round for d in history], dtype=np.int32),
            "counts": np.array(counts, dtype=np.int32),
            "indices": np.concatenate([d.indices for d in history])
            if history
            else np.zeros(0, dtype=np.int32),
            "coefficients": np.concatenate([d.coefficients for d in history])
            if history
            else np.zeros(0, dtype=np.float32),
        }
    )


def encode_zo_train_ins(ins: ZoTrainIns) -> RecordDict:
    """Build the content of a ``train.zo`` instruction."""
    content = RecordDict(
        {
            _SPEC: ins.spec.to_config_record(),
            _TRAIN: ins.config.to_config_record(),
            _SYNC: ConfigRecord(
                {
                    "base-round": ins.base_round,
                    "target-round": ins.target_round,
                    "target-hash": ins.target_hash,
                }
            ),
            _HISTORY: _history_record(ins.history),
        }
    )
    if ins.importance is not None:
        content[_PROBS] = encode_arrays({"importance": ins.importance})
    put_client_clip(content, ins.client_clip)
    return put_local_privacy(content, ins.local_privacy)


def _check_indices(indices: npt.NDArray[np.int32], k: int, what: str) -> None:
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= k):
        bad = indices[(indices < 0) | (indices >= k)][0]
        raise ProtocolError(
            f"{what}: seed index {int(bad)} is outside the pool [0, {k})"
        )


def _split_history(
    arrays: dict[str, npt.NDArray[Any]], k: int
) -> tuple[RoundDelta, ...]:
    rounds, counts = arrays["rounds"], arrays["counts"]
    indices, coefficients = arrays["indices"], arrays["coefficients"]
    want: dict[str, type[np.generic]] = {
        "rounds": np.int32,
        "counts": np.int32,
        "indices": np.int32,
        "coefficients": np.float32,
    }
    for name, dtype in want.items():
        if arrays[name].dtype != dtype or arrays[name].ndim != 1:
            raise ProtocolError(
                f"history '{name}' must be a 1-D {np.dtype(dtype).name} array, got "
                f"{arrays[name].dtype} of shape {arrays[name].shape}"
            )
    if rounds.shape != counts.shape or indices.shape != coefficients.shape:
        raise ProtocolError("history arrays have inconsistent lengths")
    if int(counts.sum(dtype=np.int64)) != indices.size or bool((counts < 0).any()):
        raise ProtocolError("history counts do not add up to its entries")
    _check_indices(indices, k, "history")
    out, start, prev = [], 0, None
    for r, n in zip(rounds.tolist(), counts.tolist(), strict=True):
        idx = indices[start : start + n]
        if prev is not None and r <= prev:
            raise ProtocolError(f"history rounds are not increasing at round {r}")
        if n > 1 and bool((idx[1:] <= idx[:-1]).any()):
            raise ProtocolError(
                f"history round {r}: indices are not strictly increasing"
            )
        out.append(RoundDelta(r, idx, coefficients[start : start + n]))
        start, prev = start + n, r
    return tuple(out)


def decode_zo_train_ins(content: RecordDict) -> ZoTrainIns:
    """Read and validate a ``train.zo`` instruction.

    Raises
    ------
    ProtocolError
        On a bad spec, train config, history, probabilities or local DP record.
    """
    spec = ZOSpec.from_config_record(_record(content, _SPEC, ConfigRecord))
    config = RoundSchedule.from_config_record(_record(content, _TRAIN, ConfigRecord))
    sync = _record(content, _SYNC, ConfigRecord)
    arrays = decode_arrays(
        _record(content, _HISTORY, ArrayRecord), max_bytes=MAX_ZO_PAYLOAD_BYTES
    )
    missing = {"rounds", "counts", "indices", "coefficients"} - set(arrays)
    if missing:
        raise ProtocolError(f"history lacks arrays {sorted(missing)}")
    history = _split_history(arrays, spec.num_seeds)
    base, target = _get(sync, "base-round", int), _get(sync, "target-round", int)
    if not 0 <= base <= target:
        raise ProtocolError(
            f"sync rounds must satisfy 0 <= base <= target, got {base}, {target}"
        )
    if history and (history[0].round <= base or history[-1].round > target):
        raise ProtocolError(f"history rounds fall outside ({base}, {target}]")
    probs = None
    if _PROBS in content:
        arrays = decode_arrays(_record(content, _PROBS, ArrayRecord))
        probs = arrays.get("importance")
        if probs is None or probs.dtype != np.uint8 or probs.shape != (spec.num_seeds,):
            raise ProtocolError(f"importance must be {spec.num_seeds} uint8 values")
    return ZoTrainIns(
        spec,
        config,
        base,
        target,
        _get(sync, "target-hash", str),
        history,
        probs,
        get_local_privacy(content),
        get_client_clip(content),
    )


def encode_zo_train_res(res: ZoTrainRes) -> RecordDict:
    """Build the content of a ``train.zo`` reply."""
    metrics: dict[str, MetricRecordValues] = {
        "num-examples": res.num_examples,
        "train-loss": res.train_loss,
        "skipped-steps": res.skipped_steps,
        **res.extra,
    }
    return RecordDict(
        {
            _STEPS: encode_arrays(
                {
                    "indices": res.indices,
                    "scalars": res.scalars,
                }
            ),
            _SYNC: ConfigRecord(
                {"synced-round": res.synced_round, "synced-hash": res.synced_hash}
            ),
            _METRICS: MetricRecord(metrics),
        }
    )


def decode_zo_train_res(
    content: RecordDict, *, num_seeds: int, max_steps: int
) -> ZoTrainRes:
    """Read and fully validate a ``train.zo`` reply.

    Raises
    ------
    ProtocolError
        On an out-of-pool seed index, a NaN/Inf scalar or one beyond
        :data:`~protocols.messages.MAX_WIRE_FLOAT` in magnitude, more pairs
        than ``max_steps``, mismatched lengths, a missing record, or a
        metric that is not finite or beyond that bound.
    """
    steps = decode_arrays(
        _record(content, _STEPS, ArrayRecord), max_bytes=16 * max_steps + 4096
    )
    if set(steps) != {"indices", "scalars"}:
        raise ProtocolError(
            f"steps record must hold 'indices' and 'scalars', got {sorted(steps)}"
        )
    idx, g = steps["indices"], steps["scalars"]
    if (
        idx.dtype != np.int32
        or g.dtype != np.float32
        or idx.ndim != 1
        or idx.shape != g.shape
    ):
        raise ProtocolError(
            "steps must be two 1-D arrays of equal length (int32, float32)"
        )
    if idx.size > max_steps:
        raise ProtocolError(
            f"reply holds {idx.size} steps, at most {max_steps} were asked for"
        )
    _check_indices(idx, num_seeds, "reply")
    # Finite (decode_arrays checked) but also bounded, so that the per-seed
    # sums and their float32 coefficients stay finite.
    peak = float(np.abs(g).max()) if g.size else 0.0
    if peak > _MAX_SCALAR:
        raise ProtocolError(
            f"step scalars must have magnitude <= {MAX_WIRE_FLOAT:g}, got {peak!r}"
        )
    sync = _record(content, _SYNC, ConfigRecord)
    metrics = _record(content, _METRICS, MetricRecord)
    n = _get(metrics, "num-examples", int)
    if n <= 0:
        raise ProtocolError(f"'num-examples' must be > 0, got {n}")
    return ZoTrainRes(
        indices=idx,
        scalars=g,
        num_examples=n,
        train_loss=_get(metrics, "train-loss", float),
        synced_round=_get(sync, "synced-round", int),
        synced_hash=_get(sync, "synced-hash", str),
        skipped_steps=_get(metrics, "skipped-steps", int),
    )
