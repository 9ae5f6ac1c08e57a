"""Seed-pool kernels of FedKSeed: bounded, robust and private per-seed aggregation.

Pure functions and a small statistics object, tensors in and out, no Flower
messages (the strategy, :mod:`strategies.fedkseed`, is the plumbing).

Aggregation (FedKSeed, Qin et al. 2024)
---------------------------------------
Client i reports one scalar gradient ``g`` per local step on pool seed ``j``;
``s_ij`` is the sum of its scalars on seed j (a K-vector ``s_i``). The round's
change to the global model is ``w += sum_j c_j z(s_j)`` with

    c_j = -eta * sum_i omega_i * s_ij,   omega_i = n_i / sum_k n_k,

which equals FedAvg of the clients' locally trained models (every local step
is ``w -= eta * g * z``). Sums run in float64 over clients in a fixed order;
the coefficients are then rounded to float32, the canonical wire form that
every party applies.

Bounding one client (:func:`bound_scalars`, ``strategies.robust``)
------------------------------------------------------------------
Before anything is summed, every scalar is clamped to ``[-B, B]`` with
``B = robust.clip_bound(sizes)``, a client's size being its largest ``|g|``
(``clip_multiple`` times the round's low median of those sizes, capped by
``zo.max_abs_grad``). The largest, not the median, ``|g|``: honest scalars are
roughly Gaussian, and three times a client's median ``|g|`` is about two
standard deviations, which would clamp ~4% of honest scalars and bias every
honest round; three times the typical largest honest ``|g|`` leaves honest
rounds untouched, while the median over clients keeps a minority of hostile
clients from setting the bound. And ``n_i`` is replaced by the capped weight of
:func:`strategies.robust.capped_weights`. A client with T steps then moves
``s_i`` by at most ``T * B`` in L1 norm, and its weight share is bounded.

Robust rules in seed space (:func:`seed_coefficients`)
------------------------------------------------------
* ``mean``: the formula above with the capped weights (bit-identical to the
  plain FedKSeed rule when no bound binds).
* ``median`` / ``trimmed_mean``: per seed j, over the clients ``U_j`` that
  reported j, ``c_j = -eta * (sum_{i in U_j} omega_i) * stat_{i in U_j}(s_ij)``
  with ``stat`` = ``np.median`` or Flower's
  :func:`flwr.serverapp.strategy.fedtrimmedavg.trim_mean`. When the clients
  of ``U_j`` agree this is the mean rule; when several clients share a seed,
  one outlier cannot move ``c_j``. With the paper's sizes (K = 4096 seeds,
  a few hundred steps times ~10 clients) most seeds have a single client, so
  the rule falls back to that client's (clipped) value: there, only the
  per-scalar clip bounds an attacker.
* ``krum`` / ``multi_krum`` / ``bulyan``: Flower's selection rules (through
  :func:`strategies.robust.combine`) on the K-dimensional vectors ``s_i``,
  and ``c = -eta * combined``. This is sound because the model-space update
  of client i is ``-eta * sum_j s_ij z_j`` with Gaussian directions ``z_j``
  in d >> K dimensions, which are nearly orthogonal with ``|z_j|^2 ~ d``: so
  ``|u_i - u_k|^2 ~ eta^2 d |s_i - s_k|^2``, and seed-space distances are
  model-space distances up to one common factor, which Krum's ranking ignores.

Differential privacy (:func:`central_dp_sum`, :func:`local_dp_pairs`)
---------------------------------------------------------------------
Central DP (``privacy.mode = "central"``): after the per-scalar clip every
``s_i`` is clipped to L2 norm ``C``, all clients weigh the same, and

    c = -eta * (sum_i s_i + N(0, (sigma C)^2 I_K)) / m,

``m`` being the number of clients the round *sampled* (fixed before any
reply). Sensitivity: adding or removing one client changes ``S = sum_i s_i``
by one clipped vector, at most ``C`` in L2, so ``S + noise`` is the Gaussian
mechanism with noise multiplier sigma; the division by a fixed ``m``, the
float32 rounding and the replayed model update ``w += sum_j c_j z(s_j)`` (a
fixed linear map of c, the same for every party) are post-processing. The
noise goes to **all K coordinates**, not only the seeds someone reported, so
the released support reveals nothing either; the price is that every DP round
replays K seeds (not ``steps x clients``): with DP, prefer a small
``zo.num_seeds`` or a narrow ``zo.include``. FedKSeed-Pro's importances are
updated from the released coefficients (post-processing), never from the
clients' raw scalars.

Central DP with client-side clipping (``privacy.clipping = "client"``,
Flower's client-side fixed clipping): every client merges its steps per seed
and clips that vector to ``C`` itself (:func:`clipped_pairs`); the server
still clips what it sees (a no-op on an honest reply). Under SecAgg+ it sees
only the mean of the clipped vectors with equal weights, so
``S = mean x survivors`` and the same noise (:func:`seed_noise`, same
generator) gives the same release; the sensitivity argument holds for every
honest client, whose contribution its own clip bounds.

Local DP (``privacy.mode = "local"``, on the client): the client merges its
steps per seed (one pair per distinct seed), clips that vector to L2 norm
``C`` and adds ``N(0, (sigma C)^2)`` to each pair's value. Its seed draws come
from ``(run seed, round, label)``, not from its data, so the support is
data-independent and the values are the Gaussian mechanism on a vector whose
value on any two datasets differs by at most ``2 C`` (accounted with
multiplier ``sigma / 2``, :class:`strategies.privacy.DPSettings`). Caveat: a
step whose loss is not finite is skipped, so its seed is missing from the
support; that is data-dependent, and rare.

FedKSeed-Pro: seed j's importance is the mean of ``|clip(g, -c, c)|`` over
every scalar ever reported on it, with one initial 0.0 counted;
probabilities are ``softmax(minmax(importance))``, so the most important
seed is at most e times as likely as the least.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from strategies import seed_clip
from strategies.robust import Bounds, clip_bound, combine

__all__ = [
    "ProStatistics",
    "SeedCoefficients",
    "SeedUpdate",
    "aggregate_seed_scalars",
    "bound_scalars",
    "central_dp_sum",
    "clipped_pairs",
    "clipped_seed_sums",
    "local_dp_pairs",
    "seed_coefficients",
    "seed_noise",
    "seed_sums",
    "sparse_coefficients",
]


@dataclass(frozen=True, slots=True)
class SeedUpdate:
    """One client's contribution: its per-step pairs and example count."""

    indices: torch.Tensor  # (T,) int32 pool indices
    scalars: torch.Tensor  # (T,) float32 projected gradients
    num_examples: int


@dataclass(frozen=True, slots=True)
class SeedCoefficients:
    """A robust rule's dense coefficients (float64, K) and the clients it used."""

    coefficients: torch.Tensor
    used: list[int]


def bound_scalars(
    updates: Sequence[SeedUpdate], bounds: Bounds
) -> tuple[list[SeedUpdate], float | None, int]:
    """Every scalar clamped to the round's bound (module docstring).

    Returns
    -------
    tuple[list[SeedUpdate], float | None, int]
        The clipped updates (same order), the bound (None: clip off), and how
        many clients had at least one scalar clamped. Clients without steps
        have no size and do not set the bound.
    """
    sizes = [
        float(u.scalars.double().abs().max()) for u in updates if u.scalars.numel()
    ]
    bound = clip_bound(sizes, bounds)
    if bound is None:
        return list(updates), None, 0
    out, clipped = [], 0
    for u in updates:
        g = u.scalars.double()
        if u.scalars.numel() and float(g.abs().max()) > bound:
            clipped += 1
            g = g.clamp(-bound, bound)
            u = SeedUpdate(u.indices, g.to(torch.float32), u.num_examples)
        out.append(u)
    return out, bound, clipped


def seed_sums(
    updates: Sequence[SeedUpdate], num_seeds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-client per-seed sums ``s`` (n, K) float64 and which seeds each reported.

    ``reported[i, j]`` is True when client i took at least one step on seed j
    (even if its scalars there sum to zero).
    """
    n = len(updates)
    sums = torch.zeros(n, num_seeds, dtype=torch.float64)
    reported = torch.zeros(n, num_seeds, dtype=torch.bool)
    for i, u in enumerate(updates):
        sums[i].index_add_(0, u.indices.long(), u.scalars.double())
        reported[i, u.indices.long()] = True
    return sums, reported


def _weighted_sum(sums: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum_i (w_i / sum w) s_i``, clients added in order (FedKSeed's rule)."""
    total = sum(weights)
    if not total > 0:
        raise ValueError("the updates carry no examples")
    acc = torch.zeros(sums.shape[1], dtype=torch.float64)
    for row, w in zip(sums, weights, strict=True):
        acc.add_(row, alpha=w / total)
    return acc


def _per_seed_statistic(
    sums: torch.Tensor, reported: torch.Tensor, rule: str, trim_fraction: float
) -> torch.Tensor:
    """The statistic over the reporting clients of each seed (0 where none did).

    Seeds are grouped by how many clients reported them, so every group is one
    vectorised call of ``np.median`` or Flower's ``trim_mean`` along axis 0.
    """
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    s, mask = sums.numpy(), reported.numpy()
    counts = mask.sum(axis=0)
    out = np.zeros(s.shape[1], dtype=np.float64)
    for c in np.unique(counts[counts > 0]):
        cols = np.nonzero(counts == c)[0]
        # Non-reporters become NaN, which sorts last: the first c rows are U_j.
        vals = np.sort(np.where(mask[:, cols], s[:, cols], np.nan), axis=0)[:c]
        out[cols] = (
            np.median(vals, axis=0)
            if rule == "median"
            else trim_mean(vals, trim_fraction)
        )
    return torch.from_numpy(out)


def seed_coefficients(
    sums: torch.Tensor,
    reported: torch.Tensor,
    weights: Sequence[float],
    bounds: Bounds,
    *,
    learning_rate: float,
) -> SeedCoefficients:
    """Dense float64 coefficients of ``bounds.aggregator`` (module docstring).

    Parameters
    ----------
    sums, reported : torch.Tensor
        :func:`seed_sums` of the bounded updates.
    weights : Sequence[float]
        The clients' capped weights (normalised here).
    bounds : Bounds
        Names the aggregator and its settings.
    learning_rate : float
        eta, folded in with the minus sign.

    Raises
    ------
    ValueError
        On non-positive total weight.
    strategies.aggregation.AggregationError
        If the rule needs more clients than there are (Bulyan: ``4 f + 3``).
    """
    n = sums.shape[0]
    rule = bounds.aggregator
    if rule == "mean":
        return SeedCoefficients(
            _weighted_sum(sums, weights) * -learning_rate, list(range(n))
        )
    if rule in ("median", "trimmed_mean"):
        total = sum(weights)
        if not total > 0:
            raise ValueError("the updates carry no examples")
        omega = torch.tensor([w / total for w in weights], dtype=torch.float64)
        share = (reported.double() * omega[:, None]).sum(dim=0)
        stat = _per_seed_statistic(sums, reported, rule, bounds.trim_fraction)
        return SeedCoefficients(-learning_rate * share * stat, list(range(n)))
    combined = combine([{"s": row} for row in sums], weights, bounds)
    return SeedCoefficients(
        combined.tensors["s"].double() * -learning_rate, combined.used
    )


def sparse_coefficients(
    coefficients: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 coefficients in wire form.

    Returns int32 increasing indices and float32 values of the seeds whose
    float32 coefficient is non-zero.
    """
    c32 = coefficients.to(torch.float32)
    keep = torch.nonzero(c32 != 0).flatten()
    return keep.to(torch.int32), c32[keep]


def aggregate_seed_scalars(
    updates: Sequence[SeedUpdate],
    *,
    num_seeds: int,
    learning_rate: float,
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The round's per-seed coefficients by the plain FedKSeed (mean) rule.

    Parameters
    ----------
    updates : Sequence[SeedUpdate]
        Accepted client updates, in a fixed order.
    num_seeds : int
        K; every index is in [0, K).
    learning_rate : float
        eta, folded into the coefficients with the minus sign.
    weights : Sequence[float], optional
        The clients' weights; their example counts when omitted.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``(indices, coefficients)``: strictly increasing int32 indices of the
        seeds with a non-zero coefficient, and float32 coefficients.

    Raises
    ------
    ValueError
        On no updates or a non-positive total weight.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    if weights is None:
        weights = [u.num_examples for u in updates]
    sums, _ = seed_sums(updates, num_seeds)
    return sparse_coefficients(_weighted_sum(sums, weights) * -learning_rate)


def central_dp_sum(
    sums: torch.Tensor,
    *,
    clip_norm: float,
    noise_std: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, int]:
    """``sum_i clip_C(s_i) + N(0, noise_std^2 I_K)`` (float64), and clients clipped.

    The noise is drawn as float32 ``torch.randn`` on the CPU from
    ``generator`` (the same bits on every machine), then scaled in float64.
    """
    norms = torch.linalg.vector_norm(sums, dim=1)
    factors = torch.where(norms > clip_norm, clip_norm / norms, torch.ones_like(norms))
    total = (sums * factors[:, None]).sum(dim=0)
    noise = seed_noise(sums.shape[1], noise_std=noise_std, generator=generator)
    return total + noise, int((norms > clip_norm).sum())


def seed_noise(
    num_seeds: int, *, noise_std: float, generator: torch.Generator
) -> torch.Tensor:
    """Central DP's ``N(0, noise_std^2 I_K)`` (float64) on all K seeds.

    Drawn as float32 ``torch.randn`` on the CPU from ``generator`` (the same
    bits on every machine), then scaled in float64. :func:`central_dp_sum`
    adds it to the clipped sum; a SecAgg+ round with client-side clipping
    adds it to the unmasked sum (:mod:`strategies.fedkseed`).
    """
    z = torch.randn(num_seeds, generator=generator, dtype=torch.float32)
    return z.double() * noise_std


def clipped_seed_sums(
    indices: torch.Tensor, scalars: torch.Tensor, *, clip_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's steps merged per seed, the vector clipped to L2 ``clip_norm``.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        The distinct seeds (int64, increasing) and their clipped sums
        (float64): the client's side of central DP with client-side clipping,
        and the clip of :func:`local_dp_pairs`.
    """
    seeds, values = seed_clip.clipped_seed_sums(
        indices.numpy(force=True), scalars.numpy(force=True), clip_norm
    )
    return torch.from_numpy(seeds), torch.from_numpy(values)


def clipped_pairs(
    indices: torch.Tensor, scalars: torch.Tensor, *, clip_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`clipped_seed_sums` in wire form: int32 seeds, float32 values.

    The float32 rounding can leave the norm above ``clip_norm`` by a relative
    ~1e-7; the server's own clip (when it sees the pairs) absorbs it, and
    SecAgg+'s quantization is coarser.
    """
    seeds, values = clipped_seed_sums(indices, scalars, clip_norm=clip_norm)
    return seeds.to(torch.int32), values.to(torch.float32)


def local_dp_pairs(
    indices: torch.Tensor,
    scalars: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's steps as one noisy pair per distinct seed (local DP).

    The per-seed sums (seeds in increasing order) are clipped to L2 norm
    ``clip_norm``, then ``N(0, (noise_multiplier * clip_norm)^2)`` is added to
    each (float32 ``torch.randn`` from ``generator``, scaled in float64).

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        int32 strictly increasing seed indices and float32 noisy values.
    """
    seeds, values = clipped_seed_sums(indices, scalars, clip_norm=clip_norm)
    z = torch.randn(seeds.numel(), generator=generator, dtype=torch.float32)
    noisy = values + z.double() * (noise_multiplier * clip_norm)
    return seeds.to(torch.int32), noisy.to(torch.float32)


class ProStatistics:
    """Per-seed importance for FedKSeed-Pro, in O(K) state.

    Keeps ``count_j`` (scalars seen, starting at 1 for the initial 0.0) and
    ``abs_sum_j`` (sum of clipped magnitudes) instead of the full history.
    """

    def __init__(self, num_seeds: int, clip: float) -> None:
        self.clip = clip
        self.count = torch.ones(num_seeds, dtype=torch.float64)
        self.abs_sum = torch.zeros(num_seeds, dtype=torch.float64)

    def update(self, indices: torch.Tensor, scalars: torch.Tensor) -> None:
        """Account for reported scalars (unweighted, one per local step)."""
        mags = scalars.double().clamp(-self.clip, self.clip).abs()
        self.count.index_add_(0, indices.long(), torch.ones_like(mags))
        self.abs_sum.index_add_(0, indices.long(), mags)

    def importance(self) -> torch.Tensor:
        """psi_j: mean clipped magnitude per seed (float64)."""
        return self.abs_sum / self.count

    def scaled_importance(self) -> torch.Tensor:
        """minmax(psi) in [0, 1] (float64)."""
        psi = self.importance()
        return (psi - psi.min()) / (psi.max() - psi.min() + 1e-10)

    def probabilities(self) -> torch.Tensor:
        """softmax(minmax(psi)) as float32, summing to 1 (the paper's formula)."""
        return torch.softmax(self.scaled_importance(), dim=0).to(torch.float32)

    def quantized(self) -> torch.Tensor:
        """minmax(psi) rounded to uint8 steps of 1/255: what travels (K bytes)."""
        return torch.round(self.scaled_importance() * 255.0).to(torch.uint8)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint."""
        return {"count": self.count.clone(), "abs_sum": self.abs_sum.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state`."""
        self.count = state["count"].clone().double()
        self.abs_sum = state["abs_sum"].clone().double()
