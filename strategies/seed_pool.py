"""Seed-pool kernels of FedKSeed: per-seed aggregation and Pro probabilities.

Pure functions and a small statistics object, tensors in and out, no Flower.

Aggregation (FedKSeed, Qin et al. 2024): client i reports one scalar
gradient ``g`` per local step on pool seed ``j``. The round's change to the
global model is ``w += sum_j c_j z(s_j)`` with

    c_j = -eta * sum_i omega_i * sum_{steps of i on j} g,   omega_i = n_i / sum_k n_k,

which equals FedAvg of the clients' locally trained models (every local step
is ``w -= eta * g * z``). Sums run in float64 over clients in a fixed order;
the coefficients are then rounded to float32, the canonical wire form that
every party applies.

FedKSeed-Pro: seed j's importance is the mean of ``|clip(g, -c, c)|`` over
every scalar ever reported on it, with one initial 0.0 counted;
probabilities are ``softmax(minmax(importance))``, so the most important
seed is at most e times as likely as the least.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ProStatistics", "SeedUpdate", "aggregate_seed_scalars"]


@dataclass(frozen=True, slots=True)
class SeedUpdate:
    """One client's contribution: its per-step pairs and example count."""

    indices: torch.Tensor  # (T,) int32 pool indices
    scalars: torch.Tensor  # (T,) float32 projected gradients
    num_examples: int


def aggregate_seed_scalars(
    updates: Sequence[SeedUpdate], *, num_seeds: int, learning_rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The round's per-seed coefficients (see the module docstring).

    Parameters
    ----------
    updates : Sequence[SeedUpdate]
        Accepted client updates, in a fixed order.
    num_seeds : int
        K; every index is in [0, K).
    learning_rate : float
        eta, folded into the coefficients with the minus sign.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``(indices, coefficients)``: strictly increasing int32 indices of the
        seeds with a non-zero coefficient, and float32 coefficients.

    Raises
    ------
    ValueError
        On no updates or a non-positive total example count.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("the updates carry no examples")
    acc = torch.zeros(num_seeds, dtype=torch.float64)
    for u in updates:
        per_seed = torch.zeros(num_seeds, dtype=torch.float64)
        per_seed.index_add_(0, u.indices.long(), u.scalars.double())
        acc.add_(per_seed, alpha=u.num_examples / total)
    coefficients = (acc * -learning_rate).to(torch.float32)
    keep = torch.nonzero(coefficients != 0).flatten()
    return keep.to(torch.int32), coefficients[keep]


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
