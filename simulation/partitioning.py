"""Splitting a dataset's examples across simulated federated clients.

This module owns the mapping from example groups (task, category or label of
each example) to per-client index lists, for three schemes:

``iid``
    A seeded random permutation cut into near-equal parts.
``dirichlet``
    Label/task skew: for every group, the share of each client is drawn from
    ``Dirichlet(alpha)`` (smaller ``alpha`` = more skew). Same draws as
    :class:`flwr_datasets.partitioner.DirichletPartitioner` for the same seed
    (it resamples until every client has ``min_partition_size`` examples);
    where flwr would give up after 11 draws, the best draw is topped up by
    moving random examples from the largest clients instead of failing.
``task``
    Whole groups per client: the sorted distinct groups are dealt round-robin
    to the clients, so with as many clients as groups each client owns one.

Every scheme assigns each example to exactly one partition, returns sorted
index lists and is deterministic given ``seed``. :func:`describe` summarises
partitions as per-group counts for reports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "task")
_DIRICHLET_DRAWS = 11


class PartitionError(ValueError):
    """Raised when examples cannot be partitioned as requested."""


def _validate(
    n_examples: int,
    num_partitions: int,
    scheme: str,
    alpha: float,
    min_partition_size: int,
) -> None:
    """Check the arguments of :func:`partition`, naming the bad one."""
    if scheme not in SCHEMES:
        raise PartitionError(f"scheme={scheme!r} is not one of {SCHEMES}")
    is_int = isinstance(num_partitions, int) and not isinstance(num_partitions, bool)
    if not is_int or num_partitions < 1:
        raise PartitionError(
            f"num_partitions={num_partitions!r} must be an integer >= 1"
        )
    if not alpha > 0:
        raise PartitionError(f"alpha={alpha!r} must be > 0")
    if isinstance(min_partition_size, bool) or not isinstance(min_partition_size, int):
        raise PartitionError(
            f"min_partition_size={min_partition_size!r} must be an integer"
        )
    if min_partition_size < 0:
        raise PartitionError(f"min_partition_size={min_partition_size} must be >= 0")
    if num_partitions > n_examples:
        raise PartitionError(
            f"num_partitions={num_partitions} is more than the number of examples ({n_examples})"
        )
    if num_partitions * min_partition_size > n_examples:
        raise PartitionError(
            f"min_partition_size={min_partition_size} x num_partitions={num_partitions} "
            f"exceeds the number of examples ({n_examples})"
        )


def _iid(n_examples: int, num_partitions: int, seed: int) -> list[list[int]]:
    """Seeded random near-equal split of ``range(n_examples)``."""
    order = np.random.default_rng(seed).permutation(n_examples)
    return [
        sorted(int(i) for i in part) for part in np.array_split(order, num_partitions)
    ]


def _task(groups: Sequence[str], num_partitions: int) -> list[list[int]]:
    """Deal the sorted distinct groups round-robin to the partitions."""
    distinct = sorted(set(groups))
    if num_partitions > len(distinct):
        raise PartitionError(
            f"scheme='task' needs num_partitions <= number of groups, got "
            f"num_partitions={num_partitions} and {len(distinct)} groups"
        )
    owner = {
        group: position % num_partitions for position, group in enumerate(distinct)
    }
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for index, group in enumerate(groups):
        parts[owner[group]].append(index)
    return parts


def _dirichlet_draw(
    labels: np.ndarray,
    classes: list[str],
    num_partitions: int,
    alpha: float,
    rng: np.random.Generator,
) -> list[list[int]]:
    """One Dirichlet draw: split each class's indices by sampled proportions."""
    concentration = np.repeat(float(alpha), num_partitions)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for label in classes:
        members = np.nonzero(labels == label)[0]
        cuts = (np.cumsum(rng.dirichlet(concentration)) * len(members)).astype(int)[:-1]
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.extend(int(index) for index in chunk)
    return parts


def _top_up(
    parts: list[list[int]], min_partition_size: int, rng: np.random.Generator
) -> None:
    """Move random examples from the largest partitions into undersized ones."""
    for part in parts:
        while len(part) < min_partition_size:
            donor = max(parts, key=len)
            part.append(donor.pop(int(rng.integers(len(donor)))))


def _dirichlet(
    groups: Sequence[str],
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int,
) -> list[list[int]]:
    """Dirichlet label-skew split, resampled until partitions are large enough.

    Reproduces :class:`flwr_datasets.partitioner.DirichletPartitioner`
    (``self_balancing=False``, ``shuffle=False``, same ``seed``): the same
    draws from ``numpy.random.default_rng(seed)``, up to 11 of them. Where
    flwr would give up, the draw with the largest smallest partition is kept
    and topped up with examples moved at random from the largest partitions.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(groups, dtype=object)
    classes = sorted(set(groups))
    best = _dirichlet_draw(labels, classes, num_partitions, alpha, rng)
    for _ in range(_DIRICHLET_DRAWS - 1):
        if min(map(len, best)) >= min_partition_size:
            return [sorted(p) for p in best]
        parts = _dirichlet_draw(labels, classes, num_partitions, alpha, rng)
        if min(map(len, parts)) > min(map(len, best)):
            best = parts
    _top_up(best, min_partition_size, rng)
    return [sorted(p) for p in best]


def partition(
    groups: Sequence[str],
    num_partitions: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 1,
) -> list[list[int]]:
    """Assign example indices to federated partitions.

    Parameters
    ----------
    groups : sequence of str
        The group (task / category / label) of each example; example ``i``
        has group ``groups[i]``.
    num_partitions : int
        Number of partitions (clients), at least 1 and at most
        ``len(groups)``.
    scheme : str
        ``"iid"``, ``"dirichlet"`` or ``"task"`` (see the module docstring).
    alpha : float, default 0.5
        Dirichlet concentration, > 0; only used by ``"dirichlet"``.
    seed : int, default 0
        Seed of every random draw (unused by ``"task"``, which is fully
        determined by the groups).
    min_partition_size : int, default 1
        Smallest allowed partition size.

    Returns
    -------
    list of list of int
        For each partition, its sorted example indices. Every index in
        ``range(len(groups))`` appears in exactly one partition.

    Raises
    ------
    PartitionError
        If an argument is invalid (the message names it), or ``"task"`` gets
        more partitions than groups or gives a partition smaller than
        ``min_partition_size``.
    """
    _validate(len(groups), num_partitions, scheme, alpha, min_partition_size)
    if scheme == "iid":
        parts = _iid(len(groups), num_partitions, seed)
    elif scheme == "task":
        parts = _task(groups, num_partitions)
    else:
        parts = _dirichlet(groups, num_partitions, alpha, seed, min_partition_size)
    smallest = min(len(part) for part in parts)
    if smallest < min_partition_size:
        raise PartitionError(
            f"scheme={scheme!r} gave a partition of {smallest} examples, below "
            f"min_partition_size={min_partition_size}"
        )
    return parts


def describe(
    partitions: Sequence[Sequence[int]], groups: Sequence[str]
) -> list[dict[str, int]]:
    """Count the examples of each group in each partition.

    Parameters
    ----------
    partitions : sequence of sequence of int
        Example indices per partition, as returned by :func:`partition`.
    groups : sequence of str
        The group of each example.

    Returns
    -------
    list of dict of str to int
        Per partition, ``{group: count}`` with keys in sorted order and only
        groups that occur in that partition.

    Raises
    ------
    PartitionError
        If an index is outside ``range(len(groups))``.
    """
    summary = []
    for number, part in enumerate(partitions):
        bad = [index for index in part if not 0 <= index < len(groups)]
        if bad:
            raise PartitionError(
                f"partition {number} has index {bad[0]} outside range(0, {len(groups)})"
            )
        counts = Counter(groups[index] for index in part)
        summary.append({group: counts[group] for group in sorted(counts)})
    return summary
