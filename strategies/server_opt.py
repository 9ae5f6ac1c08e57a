"""Server optimizers on the aggregated adapter: FedAdam, FedYogi, FedAdagrad, FedAvgM.

The round's aggregate (already bounded, robustly combined, DP-noised: whatever
the aggregator released) is treated as a pseudo-gradient
``delta = aggregated - current`` and the server takes one optimizer step on the
global adapter (Reddi et al. 2021, "Adaptive Federated Optimization"; Hsu et al.
2019, "Measuring the Effects of Non-Identical Data Distribution", FedAvgM).

Flower's rules, not ours
------------------------
The update rules are Flower 1.42's own (``flwr.serverapp.strategy.FedAdam``,
``FedYogi``, ``FedAdagrad``, ``FedAvgM``). :class:`ServerOptimizer` holds one of
those strategies, sets its ``current_arrays`` to the global adapter, and feeds
it the aggregate as ONE synthetic reply (an ``ArrayRecord`` plus a
``MetricRecord`` with ``num-examples`` 1) through its ``aggregate_train``.
FedAvg's weighted mean of one reply with weight 1 multiplies by exactly 1.0, so
the strategy sees the aggregate bit for bit and applies its exact rule. What
Flower does that a reader of the papers might not expect:

- FedAdam's bias-corrected rate is ``eta * sqrt(1 - beta_2**(t+1)) /
  (1 - beta_1**(t+1))`` with ``t`` the server round (``server_round + 1`` in
  the exponents), and it is a NumPy float64 scalar, so that last step runs in
  float64; moments are float32. The result is cast back to the current dtype.
- FedYogi and FedAdam start ``v`` at 0 (the paper allows ``v_-1 >= tau**2``).
- FedAdagrad has no momentum (Flower fixes ``beta_1 = 0``); ``beta_1`` and
  ``beta_2`` are not used by it.
- FedAvgM follows PyTorch's SGD: the first round's momentum buffer is the
  pseudo-gradient ``current - aggregated`` itself, then
  ``buf = momentum * buf + pg``; ``new = current - eta * buf``. With
  ``momentum == 0`` and ``eta == 1`` Flower skips the step (plain FedAvg).

The synthetic reply is built from explicit ``Metadata`` (as
``simulation.inprocess`` does), because ``Message(content, reply_to=...)``
needs an instruction message, which needs ``TaskIdentity`` to be set (only
true inside a running ServerApp). Flower's ``aggregate_train`` logs
"Received 1 results and 0 failures" at INFO for every call; a logging filter,
scoped to this thread and to the duration of the call, drops that one record.

Steps are all-or-nothing: a non-finite result or state raises
:class:`ServerOptError` and the optimizer state is as before the call.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

__all__ = [
    "SERVER_OPTIMIZERS",
    "ServerOptError",
    "ServerOptSettings",
    "ServerOptimizer",
]

SERVER_OPTIMIZERS = ("none", "fedadam", "fedyogi", "fedadagrad", "fedavgm")

# Server learning rate when none is given. Reddi et al. tune eta per task on a
# log10 grid; 1e-2 is Flower's FedYogi default and a common best for Adam/Yogi.
# FedAdagrad takes 1e-2 too, not Flower's 1e-1: on SmolLM2 adapters (bench.lora_family,
# Natural Instructions) eta 1e-1 drove the eval loss from 3.2 to 9.3 in four rounds.
# Hsu et al.'s FedAvgM uses eta 1.
_DEFAULT_ETA = {
    "none": 1.0,
    "fedadam": 1e-2,
    "fedyogi": 1e-2,
    "fedadagrad": 1e-2,
    "fedavgm": 1.0,
}

NDArray = npt.NDArray[Any]
_ADAPTIVE = (FedAdam, FedYogi, FedAdagrad)
_FlowerOpt = FedAdam | FedYogi | FedAdagrad | FedAvgM


class ServerOptError(ValueError):
    """A server optimizer step or state restore was refused."""


@dataclass(frozen=True, slots=True)
class ServerOptSettings:
    """Which server optimizer and its hyperparameters (``[server_opt]``, resolved).

    Attributes
    ----------
    name : str
        One of :data:`SERVER_OPTIMIZERS`; ``"none"`` keeps the aggregate.
    eta : float or None
        Server learning rate (> 0); None: 1e-2 for FedAdam, FedYogi and
        FedAdagrad, 1.0 for FedAvgM (see :attr:`server_lr`).
    beta_1 : float
        First-moment decay in [0, 1) (Reddi et al.: 0.9). FedAdam, FedYogi.
    beta_2 : float
        Second-moment decay in [0, 1) (Reddi et al.: 0.99). FedAdam, FedYogi.
    tau : float
        Adaptivity, > 0 (Reddi et al.: 1e-3). FedAdam, FedYogi, FedAdagrad.
    momentum : float
        Server momentum in [0, 1) (Hsu et al.: 0.9). FedAvgM.
    """

    name: str = "none"
    eta: float | None = None
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"server_opt.name {self.name!r} is not one of {SERVER_OPTIMIZERS}"
            )
        if self.eta is not None and not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"server_opt.eta must be finite and > 0, got {self.eta}")
        for field in ("beta_1", "beta_2", "momentum"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"server_opt.{field} must be in [0, 1), got {value}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"server_opt.tau must be finite and > 0, got {self.tau}")

    @property
    def server_lr(self) -> float:
        """``eta``, or this optimizer's default when it is None."""
        return _DEFAULT_ETA[self.name] if self.eta is None else self.eta

    def describe(self) -> dict[str, object]:
        """JSON-able form: the name and the settings it uses, ``eta`` resolved."""
        used = {
            "none": (),
            "fedadam": ("beta_1", "beta_2", "tau"),
            "fedyogi": ("beta_1", "beta_2", "tau"),
            "fedadagrad": ("tau",),
            "fedavgm": ("momentum",),
        }[self.name]
        out: dict[str, object] = {"name": self.name}
        if self.name != "none":
            out["eta"] = self.server_lr
        out.update({field: getattr(self, field) for field in used})
        return out


def _flower_strategy(settings: ServerOptSettings) -> _FlowerOpt | None:
    eta = settings.server_lr
    if settings.name == "fedadam":
        return FedAdam(
            eta=eta, beta_1=settings.beta_1, beta_2=settings.beta_2, tau=settings.tau
        )
    if settings.name == "fedyogi":
        return FedYogi(
            eta=eta, beta_1=settings.beta_1, beta_2=settings.beta_2, tau=settings.tau
        )
    if settings.name == "fedadagrad":
        return FedAdagrad(eta=eta, tau=settings.tau)
    if settings.name == "fedavgm":
        return FedAvgM(server_learning_rate=eta, server_momentum=settings.momentum)
    return None


class _DropReplyLog(logging.Filter):
    """Drop the "Received N results" record FedAvg logs for our one reply."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.thread == self.thread and record.funcName == "_check_and_log_replies"
        )


@contextmanager
def _quiet_reply_log() -> Iterator[None]:
    drop = _DropReplyLog()
    FLOWER_LOGGER.addFilter(drop)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(drop)


def _one_reply(arrays: ArrayRecord, server_round: int) -> Message:
    """The aggregate as a reply Message FedAvg's checks accept (weight 1)."""
    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=0,
        dst_node_id=0,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=0.0,
        ttl=0.0,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}
    )
    reply: Message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
    return reply


def _flower_step(
    flower: _FlowerOpt,
    server_round: int,
    current: dict[str, NDArray],
    aggregated: ArrayRecord,
) -> dict[str, NDArray]:
    """Run Flower's rule: ``current`` set on the strategy, one reply in."""
    if isinstance(flower, FedAvgM):
        flower.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    else:
        flower.current_arrays = current
    # Overflow is caught by the caller's finiteness check, not warned about.
    with _quiet_reply_log(), np.errstate(all="ignore"):
        arrays, _ = flower.aggregate_train(
            server_round, [_one_reply(aggregated, server_round)]
        )
    if arrays is None:
        raise ServerOptError(f"{type(flower).__name__} returned no arrays")
    return {k: arrays[k].numpy() for k in current}


class ServerOptimizer:
    """One server optimizer over a run's global adapter.

    The tensor names and shapes are fixed by the first step (or by
    :meth:`load_state`): a run's adapter layout does not change.
    """

    def __init__(self, settings: ServerOptSettings) -> None:
        self.settings = settings
        self._flower = _flower_strategy(settings)
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._last_round = 0

    # -- the step ---------------------------------------------------------------

    def step(
        self,
        server_round: int,
        current: Mapping[str, torch.Tensor],
        aggregated: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The new global tensors after one server step.

        Parameters
        ----------
        server_round : int
            This round (>= 1, after the last one stepped); FedAdam's bias
            correction depends on it.
        current : Mapping[str, torch.Tensor]
            The global adapter the round's clients started from.
        aggregated : Mapping[str, torch.Tensor]
            The round's aggregate, same names and shapes.

        Returns
        -------
        dict[str, torch.Tensor]
            In ``current``'s name order, dtypes and devices (``"none"``:
            ``aggregated``'s tensors themselves).

        Raises
        ------
        ServerOptError
            On a bad round, mismatched names or shapes, non-finite inputs, or a
            non-finite result or state (the state is then left unchanged).
        """
        shapes = self._check_inputs(server_round, current, aggregated)
        flower = self._flower
        if flower is None:
            self._last_round = server_round
            return {k: aggregated[k] for k in current}
        saved_shapes = self._shapes
        saved = copy.deepcopy(self._flower_state())
        fixed = saved_shapes or shapes  # the name order the state is kept in
        self._shapes = fixed
        names = list(fixed)
        try:
            new = _flower_step(
                flower,
                server_round,
                {k: _to_numpy(current[k]) for k in names},
                ArrayRecord({k: Array(_to_numpy(aggregated[k])) for k in names}),
            )
            # Checked after the cast to each tensor's dtype: a float64 step can
            # be finite and still overflow float32 (or bfloat16).
            out = {
                k: torch.from_numpy(np.ascontiguousarray(new[k])).to(
                    dtype=current[k].dtype, device=current[k].device
                )
                for k in current
            }
            bad = [
                k for k, v in self._flower_state().items() if not np.isfinite(v).all()
            ]
            bad += [k for k, v in out.items() if not bool(torch.isfinite(v).all())]
            if bad:
                raise ServerOptError(
                    f"{self.settings.name} step of round {server_round} is not "
                    f"finite in {bad[0]!r}; state left as before"
                )
        except BaseException:
            self._set_flower_state(saved)
            self._shapes = saved_shapes
            raise
        self._last_round = server_round
        return out

    def _check_inputs(
        self,
        server_round: int,
        current: Mapping[str, torch.Tensor],
        aggregated: Mapping[str, torch.Tensor],
    ) -> dict[str, tuple[int, ...]]:
        if server_round < 1 or server_round <= self._last_round:
            raise ServerOptError(
                f"server round {server_round} must be >= 1 and after the last "
                f"stepped round {self._last_round}"
            )
        if set(current) != set(aggregated) or not current:
            raise ServerOptError(
                "current and aggregated tensors must have the same, non-empty names"
            )
        shapes = {k: tuple(v.shape) for k, v in current.items()}
        for k, v in aggregated.items():
            if tuple(v.shape) != shapes[k]:
                raise ServerOptError(
                    f"tensor {k!r}: aggregated shape {tuple(v.shape)} != current "
                    f"{shapes[k]}"
                )
        if self._shapes is not None and shapes != self._shapes:
            raise ServerOptError(
                "the adapter layout changed since the optimizer's first step "
                "(names or shapes; the global rank is fixed per run)"
            )
        for side, tensors in (("current", current), ("aggregated", aggregated)):
            for k, v in tensors.items():
                if not bool(torch.isfinite(v).all()):
                    raise ServerOptError(f"{side} tensor {k!r} is not finite")
        return shapes

    # -- state ------------------------------------------------------------------

    def _flower_state(self) -> dict[str, NDArray]:
        flower = self._flower
        out: dict[str, NDArray] = {}
        if isinstance(flower, _ADAPTIVE):
            for part, arrays in (("m_t", flower.m_t), ("v_t", flower.v_t)):
                for k, v in (arrays or {}).items():
                    out[f"{part}/{k}"] = v
        elif isinstance(flower, FedAvgM) and flower.momentum_vector is not None:
            for k, v in zip(self._shapes or (), flower.momentum_vector, strict=True):
                out[f"momentum/{k}"] = v
        return out

    def _set_flower_state(self, tensors: Mapping[str, NDArray]) -> None:
        flower = self._flower
        names = list(self._shapes or ())
        if isinstance(flower, _ADAPTIVE):
            m = {k: tensors[f"m_t/{k}"] for k in names if f"m_t/{k}" in tensors}
            v = {k: tensors[f"v_t/{k}"] for k in names if f"v_t/{k}" in tensors}
            flower.m_t = m or None
            flower.v_t = v or None
        elif isinstance(flower, FedAvgM):
            keys = [f"momentum/{k}" for k in names]
            flower.momentum_vector = (
                [tensors[k] for k in keys] if keys and keys[0] in tensors else None
            )

    def _expected_parts(self) -> tuple[str, ...]:
        if isinstance(self._flower, _ADAPTIVE):
            return ("m_t", "v_t")
        if isinstance(self._flower, FedAvgM) and self._flower.server_opt:
            return ("momentum",) if self.settings.momentum > 0 else ()
        return ()

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue bit-exactly.

        Returns
        -------
        dict
            ``{"meta": {...}, "tensors": {...}}``. ``meta`` is JSON-able:
            the settings (``eta`` resolved), ``last_round`` and ``shapes``
            (name -> shape, None before the first step). ``tensors`` are CPU
            float32 copies named ``m_t/<name>``, ``v_t/<name>`` (FedAdam,
            FedYogi, FedAdagrad) or ``momentum/<name>`` (FedAvgM), empty for
            ``"none"`` and before the first step.
        """
        return {
            "meta": {
                "settings": self.settings.describe(),
                "last_round": self._last_round,
                "shapes": None
                if self._shapes is None
                else {k: list(s) for k, s in self._shapes.items()},
            },
            "tensors": {
                k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True))
                for k, v in self._flower_state().items()
            },
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state`; nothing changes unless all of it is valid.

        Raises
        ------
        ServerOptError
            If the state was saved with other settings, or its round, shapes
            or tensors (names, shapes, finiteness, ``v_t >= 0``) are wrong.
        """
        meta = state.get("meta")
        tensors = state.get("tensors")
        if not isinstance(meta, Mapping) or not isinstance(tensors, Mapping):
            raise ServerOptError("server optimizer state needs 'meta' and 'tensors'")
        if meta.get("settings") != self.settings.describe():
            raise ServerOptError(
                f"server optimizer state was saved with {meta.get('settings')}, "
                f"this run has {self.settings.describe()}"
            )
        last_round = meta.get("last_round")
        if (
            not isinstance(last_round, int)
            or isinstance(last_round, bool)
            or last_round < 0
        ):
            raise ServerOptError(
                f"server optimizer last_round {last_round!r} is invalid"
            )
        shapes = _read_shapes(meta.get("shapes"))
        want = (
            {f"{p}/{k}": s for p in self._expected_parts() for k, s in shapes.items()}
            if shapes
            else {}
        )
        if set(tensors) != set(want):
            raise ServerOptError(
                f"server optimizer tensors {sorted(tensors)[:3]}... do not match "
                f"the {self.settings.name} state of shapes {shapes}"
            )
        arrays = {k: _checked_array(k, tensors[k], want[k]) for k in want}
        self._shapes = shapes
        self._last_round = last_round
        self._set_flower_state(arrays)


def _read_shapes(raw: object) -> dict[str, tuple[int, ...]] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ServerOptError("server optimizer shapes must be a non-empty mapping")
    shapes: dict[str, tuple[int, ...]] = {}
    for k, s in raw.items():
        if not isinstance(s, list | tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s
        ):
            raise ServerOptError(f"server optimizer shape of {k!r} is invalid: {s!r}")
        shapes[str(k)] = tuple(s)
    return shapes


def _checked_array(name: str, value: object, shape: tuple[int, ...]) -> NDArray:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
        raise ServerOptError(f"server optimizer tensor {name!r} must be float32")
    if tuple(value.shape) != shape:
        raise ServerOptError(
            f"server optimizer tensor {name!r} has shape {tuple(value.shape)}, "
            f"expected {shape}"
        )
    array = value.detach().cpu().numpy().copy()
    if not np.isfinite(array).all():
        raise ServerOptError(f"server optimizer tensor {name!r} is not finite")
    if name.startswith("v_t/") and (array < 0).any():
        raise ServerOptError(f"server optimizer tensor {name!r} must be >= 0")
    return array


def _to_numpy(t: torch.Tensor) -> NDArray:
    """A float32 CPU copy (the math runs in float32, as Flower's does)."""
    return t.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
