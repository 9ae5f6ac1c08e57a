"""Reproducible local randomness: seed derivation and batch order.

Every random draw a node makes comes from a generator seeded by
:func:`derive_seed` over (run seed, round, node label, purpose), so a node's
round is reproducible and independent of other nodes. ``derive_seed`` lives in
the torch-free :mod:`client.seeding` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from client.seeding import batches_of, derive_seed

__all__ = ["derive_seed", "index_batches"]


def index_batches(
    n: int, batch_size: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """Endless index batches: a fresh permutation each pass, no ragged tail."""
    return batches_of(
        n, batch_size, lambda m: torch.randperm(m, generator=generator).tolist()
    )
