"""Choosing which nodes train in a round, reproducibly.

Flower's node ids are random per run, so nodes are ordered by a stable label
(the partition a simulated node holds, or a deployed node's name) and drawn
with a generator seeded by (run seed, round). The same seed then picks the
same clients in every run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["SamplingError", "sample_nodes"]


class SamplingError(ValueError):
    """Not enough nodes to satisfy the sampling settings."""


def sample_nodes(
    node_labels: Mapping[int, str],
    *,
    fraction: float,
    min_nodes: int,
    seed: int,
    server_round: int,
) -> list[int]:
    """Pick ``max(min_nodes, ceil(fraction * N))`` nodes, ordered by label.

    Parameters
    ----------
    node_labels : Mapping[int, str]
        Node id to a label that is stable across runs (unique per node).
    fraction : float
        Share of the nodes to pick, in (0, 1].
    min_nodes : int
        Fewest nodes a round may use (>= 1).
    seed, server_round : int
        Seed the draw; the same pair gives the same nodes.

    Returns
    -------
    list[int]
        Chosen node ids, sorted by label.

    Raises
    ------
    SamplingError
        If fewer than ``min_nodes`` nodes are available or arguments are bad.
    """
    if not 0.0 < fraction <= 1.0:
        raise SamplingError(f"fraction must be in (0, 1], got {fraction}")
    if min_nodes < 1:
        raise SamplingError(f"min_nodes must be >= 1, got {min_nodes}")
    ordered = sorted(node_labels, key=lambda n: (node_labels[n], n))
    if len(ordered) < min_nodes:
        raise SamplingError(
            f"{len(ordered)} nodes available, the round needs at least {min_nodes}"
        )
    # round() first: 0.55 * 100 is 55.000000000000007 in binary floating point
    wanted = math.ceil(round(fraction * len(ordered), 9))
    count = min(len(ordered), max(min_nodes, wanted))
    rng = np.random.default_rng([seed, server_round])
    picked = rng.choice(len(ordered), size=count, replace=False)
    return [ordered[i] for i in sorted(picked)]
