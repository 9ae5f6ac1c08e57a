"""Seed derivation for a node's local randomness (torch-free).

Every random draw a node makes comes from a generator seeded by
:func:`derive_seed` over (run seed, round, node label, purpose), so a node's
round is reproducible and independent of other nodes. This module needs only
the standard library, so an edge client without torch derives the same seeds; :func:`batches_of`
is the batch order every trainer uses, over its own generator's permutations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

__all__ = ["batches_of", "derive_seed"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and machines)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batches_of(
    n: int, batch_size: int, permutation: Callable[[int], Sequence[int]]
) -> Iterator[list[int]]:
    """Endless index batches: a fresh permutation each pass, no ragged tail.

    ``permutation(n)`` gives a pass's order (a torch or NumPy generator's).
    """
    size = min(batch_size, n)
    while True:
        order = list(permutation(n))
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]
