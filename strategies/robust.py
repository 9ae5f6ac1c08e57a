"""Bounding one client's influence: clipping, capped weights, robust aggregators.

Pure kernels, tensors in and tensors out, used by every method's strategy
before anything reaches the global model. A round goes through three steps:

1. **Bound each update** (:func:`clip_bound`, :func:`clip_to_norm`). With
   ``clip = "adaptive"`` (the default) the bound is ``clip_multiple`` times the
   round's median of the clients' sizes (LoRA and SFPrompt: the L2 norm of
   each client's change to the global tensors; FedKSeed: each client's median
   ``|scalar gradient|``), capped by a fixed bound when one is configured;
   ``"fixed"`` uses the fixed bound alone. The median is a bound the honest
   majority sets: fewer than half of the clients cannot raise it, and a hostile
   update is scaled down to at most ``clip_multiple`` honest sizes. It is the
   *low* median (the lower middle value of an even count), so that in a round
   of two the larger of the two sizes never sets the bound.
2. **Cap each weight** (:func:`capped_weights`). A client's weight is its
   example count, which it reports itself: it is capped by the count the node
   reported at hello, by ``max_examples`` and by ``weight_multiple`` times the
   round's median count, so that ``num_examples = 2**62`` buys no more than
   ``weight_multiple`` honest clients' weight. ``weighting = "equal"`` ignores
   the counts.
3. **Combine** (:func:`combine`) with the configured aggregator.

Which parts are Flower's
------------------------
The robust rules are Flower's own (``flwr.serverapp.strategy``, 1.42), called
on the bounded updates as NumPy arrays in float64 (so that squared distances
of large updates do not overflow): ``trimmed_mean`` is
:func:`flwr.serverapp.strategy.fedtrimmedavg.trim_mean`, ``krum`` and
``multi_krum`` select with :func:`flwr.serverapp.strategy.multikrum.select_multikrum`,
``bulyan`` selects with the same function and averages with
:func:`flwr.serverapp.strategy.bulyan.aggregate_n_closest_weights`, and
``median`` is ``np.median`` over clients exactly as ``FedMedian.aggregate_train``
computes it inline. Flower's strategies themselves cannot be used whole: they
own the round loop and the global ``ArrayRecord`` (see
:mod:`strategies.strategy`). Pollinate's parts are the bounds above, the
capped weights and the weighted mean (:func:`strategies.aggregation.weighted_mean`).

Median, trimmed mean and Bulyan ignore the weights (as Flower's do); Krum
returns the selected update; Multi-Krum averages the selected updates with
their capped weights.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from strategies.aggregation import AggregationError, weighted_mean

__all__ = [
    "AGGREGATORS",
    "Bounds",
    "Combined",
    "capped_weights",
    "clip_bound",
    "clip_to_norm",
    "combine",
    "is_finite",
    "update_norm",
]

Aggregator = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"]
AGGREGATORS: tuple[str, ...] = (
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
)

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class Bounds:
    """How far one client can move the global model (see the module docstring).

    Attributes
    ----------
    aggregator : str
        One of :data:`AGGREGATORS`.
    trim_fraction : float
        ``trimmed_mean``: share cut at each end, in [0, 0.5).
    byzantine : int
        ``krum``, ``multi_krum``, ``bulyan``: hostile clients tolerated (f).
    krum_keep : int
        ``multi_krum``: updates averaged (0 = replies - f).
    clip : str
        ``"adaptive"``, ``"fixed"`` or ``"off"``.
    clip_multiple : float
        Adaptive bound: this multiple of the round's median size.
    fixed_bound : float or None
        The fixed bound (an update's L2 norm, or FedKSeed's ``|g|``); an upper
        cap of the adaptive bound.
    weighting : str
        ``"examples"`` (capped counts) or ``"equal"``.
    weight_multiple : float
        A count is capped at this multiple of the round's median count.
    max_examples : int or None
        A count is capped at this.
    """

    aggregator: str = "mean"
    trim_fraction: float = 0.2
    byzantine: int = 1
    krum_keep: int = 0
    clip: str = "adaptive"
    clip_multiple: float = 3.0
    fixed_bound: float | None = None
    weighting: str = "examples"
    weight_multiple: float = 3.0
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValueError(
                f"unknown aggregator {self.aggregator!r}; known: {list(AGGREGATORS)}"
            )
        if self.clip not in ("adaptive", "fixed", "off"):
            raise ValueError(f"unknown clip mode {self.clip!r}")
        if self.clip == "fixed" and self.fixed_bound is None:
            raise ValueError("clip 'fixed' needs a fixed bound")
        if self.weighting not in ("examples", "equal"):
            raise ValueError(f"unknown weighting {self.weighting!r}")

    @classmethod
    def from_config(cls, federation: Any, *, fixed_bound: float | None) -> Bounds:
        """The run's bounds from its ``[federation]`` section.

        ``federation`` is a ``server.config.FederationSection``;
        ``fixed_bound`` is the method's fixed cap.

        LoRA and SFPrompt pass ``federation.clip_norm``, FedKSeed
        ``zo.max_abs_grad``.
        """
        f = federation
        return cls(
            aggregator=f.aggregator,
            trim_fraction=f.trim_fraction,
            byzantine=f.byzantine,
            krum_keep=f.krum_keep,
            clip=f.clip,
            clip_multiple=f.clip_multiple,
            fixed_bound=fixed_bound,
            weighting=f.weighting,
            weight_multiple=f.weight_multiple,
            max_examples=f.max_examples,
        )

    def summary(self) -> str:
        """The bounds in a few words, for a strategy's summary line."""
        cap = f"{self.fixed_bound:g}" if self.fixed_bound is not None else None
        if self.clip == "off":
            clip = "clip=off"
        elif self.clip == "fixed":
            clip = f"clip<={cap}"
        else:
            clip = f"clip<={self.clip_multiple:g}xmedian" + (f",<={cap}" if cap else "")
        weights = (
            "weights=equal"
            if self.weighting == "equal"
            else f"weights<={self.weight_multiple:g}xmedian"
            + (f",<={self.max_examples}" if self.max_examples else "")
        )
        return f"aggregator={self.aggregator} {clip} {weights}"


def clip_bound(sizes: Sequence[float], bounds: Bounds) -> float | None:
    """The round's bound on one client's size, or None when nothing is clipped.

    ``sizes`` are the round's per-client sizes (update norms, or FedKSeed's
    per-client median ``|g|``), all finite.
    """
    if bounds.clip == "off" or not sizes:
        return None
    if bounds.clip == "fixed":
        return bounds.fixed_bound
    bound = bounds.clip_multiple * float(statistics.median_low(sizes))
    if bounds.fixed_bound is not None:
        bound = min(bound, bounds.fixed_bound)
    return bound


def capped_weights(
    counts: Sequence[int],
    bounds: Bounds,
    reported: Sequence[int | None] | None = None,
) -> list[float]:
    """Each client's weight: its example count, capped (module docstring).

    Parameters
    ----------
    counts : Sequence[int]
        Example counts the replies claim (> 0).
    bounds : Bounds
        The weighting policy.
    reported : Sequence[int | None], optional
        The counts the same nodes reported at hello (None: unknown).
    """
    if bounds.weighting == "equal":
        return [1.0] * len(counts)
    capped = [float(c) for c in counts]
    if reported is not None:
        capped = [
            c if r is None else min(c, float(r))
            for c, r in zip(capped, reported, strict=True)
        ]
    if bounds.max_examples is not None:
        capped = [min(c, float(bounds.max_examples)) for c in capped]
    if capped:
        limit = bounds.weight_multiple * float(statistics.median_low(capped))
        capped = [min(c, limit) for c in capped]
    return [max(c, 1.0) for c in capped]


def update_norm(update: Tensors) -> float:
    """L2 norm of all of ``update``'s tensors together, summed in float64.

    Finite for any finite float32 input (``3e38 ** 2`` fits in float64).
    """
    total = 0.0
    for t in update.values():
        total += float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2
    return math.sqrt(total)


def clip_to_norm(
    update: Tensors, bound: float | None
) -> tuple[dict[str, torch.Tensor], float]:
    """``update`` scaled down to L2 norm at most ``bound``; and the factor used.

    The factor is ``min(1, bound / norm)`` (1 with no bound); the scaling runs
    in float64 and the result is cast back, so a huge finite input gives a
    finite, bounded output.
    """
    norm = update_norm(update)
    factor = 1.0 if bound is None or norm <= bound else bound / norm
    if factor == 1.0:
        return dict(update), 1.0
    return (
        {k: (t.double() * factor).to(t.dtype) for k, t in update.items()},
        factor,
    )


def is_finite(tensors: Tensors) -> bool:
    """Whether every value of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


@dataclass
class Combined:
    """An aggregator's result and the clients it used (indices into the input)."""

    tensors: dict[str, torch.Tensor]
    used: list[int]


def _numpy64(update: Tensors, names: Sequence[str]) -> list[np.ndarray]:
    return [update[n].detach().to("cpu", torch.float64).numpy() for n in names]


def _select_krum(
    updates: Sequence[Tensors], names: Sequence[str], byzantine: int, keep: int
) -> list[int]:
    """Indices Flower's Multi-Krum selects (``keep = 1``: Krum), in its order."""
    from flwr.app import Array, ArrayRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    contents = [
        RecordDict(
            {
                "u": ArrayRecord(
                    {
                        n: Array(a)
                        for n, a in zip(names, _numpy64(u, names), strict=True)
                    }
                )
            }
        )
        for u in updates
    ]
    chosen = select_multikrum(contents, byzantine, keep)
    index = {id(c): i for i, c in enumerate(contents)}
    return [index[id(c)] for c in chosen]


def combine(
    updates: Sequence[Tensors],
    weights: Sequence[float],
    bounds: Bounds,
    *,
    device: torch.device | str = "cpu",
) -> Combined:
    """Combine bounded updates with ``bounds.aggregator`` (module docstring).

    Parameters
    ----------
    updates : Sequence[Mapping[str, torch.Tensor]]
        One mapping per client, same names, shapes and dtypes, in a fixed order.
    weights : Sequence[float]
        The clients' (capped) weights; used by ``mean`` and ``multi_krum``.
    bounds : Bounds
        Names the aggregator and its settings.
    device : torch.device or str
        Where the result lives.

    Raises
    ------
    AggregationError
        On no updates, or too few for the aggregator (Bulyan needs
        ``4 f + 3``).
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    n = len(updates)
    rule = bounds.aggregator
    if rule == "mean":
        return Combined(weighted_mean(updates, weights, device=device), list(range(n)))
    names = list(updates[0])
    dtypes = {k: t.dtype for k, t in updates[0].items()}
    for i, u in enumerate(updates):
        if list(u) != names or any(
            u[k].shape != updates[0][k].shape or u[k].dtype != dtypes[k] for k in names
        ):
            raise AggregationError(f"update {i} does not match update 0's tensors")

    def tensors(arrays: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        return {
            k: torch.from_numpy(np.ascontiguousarray(a)).to(
                device=device, dtype=dtypes[k]
            )
            for k, a in zip(names, arrays, strict=True)
        }

    if rule in ("median", "trimmed_mean"):
        from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

        out = []
        for k in names:
            stack = np.stack(
                [u[k].detach().to("cpu", torch.float64).numpy() for u in updates]
            )
            out.append(
                np.median(stack, axis=0)
                if rule == "median"
                else trim_mean(stack, bounds.trim_fraction)
            )
        return Combined(tensors(out), list(range(n)))
    f = bounds.byzantine
    if rule == "krum":
        chosen = _select_krum(updates, names, f, 1)
        return Combined({k: updates[chosen[0]][k].to(device) for k in names}, chosen)
    if rule == "multi_krum":
        keep = bounds.krum_keep or max(1, n - f)
        chosen = _select_krum(updates, names, f, min(keep, n))
        picked = [updates[i] for i in chosen]
        mean = weighted_mean(picked, [weights[i] for i in chosen], device=device)
        return Combined(mean, chosen)
    if rule == "bulyan":
        from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights

        if n < 4 * f + 3:
            raise AggregationError(
                f"bulyan with byzantine={f} needs at least {4 * f + 3} updates, got {n}"
            )
        theta = n - 2 * f
        beta = theta - 2 * f
        chosen = _select_krum(updates, names, f, theta)
        selected = [_numpy64(updates[i], names) for i in chosen]
        median = [
            np.median(np.stack(layer), axis=0) for layer in zip(*selected, strict=True)
        ]
        out = aggregate_n_closest_weights(median, selected, beta)
        return Combined(tensors(out), chosen)
    raise AggregationError(f"unknown aggregator {rule!r}")
