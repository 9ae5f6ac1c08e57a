"""Seed derivation for a node's local randomness (torch-free).

Every random draw a node makes comes from a generator seeded by
:func:`derive_seed` over (run seed, round, node label, purpose), so a node's
round is reproducible and independent of other nodes. This module needs only
the standard library, so an edge client without torch derives the same seeds.
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and machines)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
