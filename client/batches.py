"""Reproducible local randomness: seed derivation and batch order.

Every random draw a node makes comes from a generator seeded by
:func:`derive_seed` over (run seed, round, node label, purpose), so a node's
round is reproducible and independent of other nodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

__all__ = ["derive_seed", "index_batches"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and machines)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def index_batches(
    n: int, batch_size: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """Endless index batches: a fresh permutation each pass, no ragged tail."""
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]
