"""A FedKSeed client's side of DP, in NumPy: the one rule both runtimes follow.

A node's steps are merged into one value per distinct seed (increasing,
summed in float64 in step order) and that vector is clipped to L2 norm C
(:func:`clipped_seed_sums`): what a client sends under central DP with
client-side clipping (:func:`clipped_pairs`), and, with
``N(0, (sigma C)^2)`` added to each value, under local DP
(:func:`local_dp_pairs`). This module imports only NumPy, so the edge client
(no torch) uses it directly and the torch client through the tensor wrappers
of :mod:`strategies.seed_pool`. Only the noise source differs: the torch
client draws float32 ``torch.randn`` from
:func:`strategies.privacy.noise_generator`, the edge client float32 normals
from :func:`noise_rng` (a simulated node's from ``(run seed, round,
"local:" + label)``, reproducible; a deployed node's from a fresh secret
seed).
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import numpy.typing as npt

__all__ = ["clipped_pairs", "clipped_seed_sums", "local_dp_pairs", "noise_rng"]

Int32Array = npt.NDArray[np.int32]
Float32Array = npt.NDArray[np.float32]


def clipped_seed_sums(
    indices: npt.NDArray[np.integer],
    scalars: npt.NDArray[np.floating],
    clip_norm: float,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Distinct seeds (int64, increasing) and their per-seed sums (float64) clipped to ``clip_norm``."""
    seeds, inverse = np.unique(indices.astype(np.int64), return_inverse=True)
    values = np.zeros(seeds.size, dtype=np.float64)
    np.add.at(values, inverse.reshape(-1), scalars.astype(np.float64))
    norm = float(np.linalg.norm(values))
    if norm > clip_norm:
        values *= clip_norm / norm
    return seeds, values


def clipped_pairs(
    indices: Int32Array, scalars: Float32Array, *, clip_norm: float
) -> tuple[Int32Array, Float32Array]:
    """One pair per distinct seed, the values clipped to L2 ``clip_norm`` (wire form)."""
    seeds, values = clipped_seed_sums(indices, scalars, clip_norm)
    return seeds.astype(np.int32), values.astype(np.float32)


def local_dp_pairs(
    indices: Int32Array,
    scalars: Float32Array,
    *,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[Int32Array, Float32Array]:
    """:func:`clipped_pairs` plus ``N(0, (noise_multiplier * clip_norm)^2)`` each.

    The noise is drawn as float32 standard normals from ``rng`` and scaled in
    float64, as the torch client does with its own generator.
    """
    seeds, values = clipped_seed_sums(indices, scalars, clip_norm)
    z = rng.standard_normal(seeds.size, dtype=np.float32)
    noisy = values + z.astype(np.float64) * (noise_multiplier * clip_norm)
    return seeds.astype(np.int32), noisy.astype(np.float32)


def noise_rng(seed: int | None, server_round: int, stream: str) -> np.random.Generator:
    """The generator of one round's local noise.

    From ``(seed, round, stream)`` (a simulated node: repeatable), or from a
    fresh secret seed when ``seed`` is None (a deployed node).
    """
    if seed is None:
        seed = secrets.randbits(63)
    digest = hashlib.sha256(f"{stream}:{seed}:{server_round}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little") >> 1)
