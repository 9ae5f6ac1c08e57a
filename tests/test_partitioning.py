"""Tests for simulation.partitioning: iid, dirichlet and task partitions."""

from __future__ import annotations

import pytest

from simulation.partitioning import PartitionError, describe, partition

SCHEMES = ("iid", "dirichlet", "task")


def _groups() -> list[str]:
    """Six groups of unequal size (60..110 examples), interleaved."""
    sizes = {
        "add": 60,
        "count": 70,
        "last": 80,
        "reverse": 90,
        "sort": 100,
        "upper": 110,
    }
    pool = [group for group, size in sizes.items() for _ in range(size)]
    return pool[::2] + pool[1::2]


def _max_share(partitions: list[list[int]], groups: list[str]) -> float:
    """Mean over partitions of the largest single-group fraction."""
    shares = [max(c.values()) / sum(c.values()) for c in describe(partitions, groups)]
    return sum(shares) / len(shares)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_disjoint_complete_sorted(scheme: str) -> None:
    """Every index must land in exactly one partition, lists sorted; a scheme
    that drops or duplicates examples would fail."""
    groups = _groups()
    parts = partition(groups, 6, scheme, alpha=0.3, seed=5)
    assert len(parts) == 6
    flat = [index for part in parts for index in part]
    assert sorted(flat) == list(range(len(groups)))
    assert all(part == sorted(part) and part for part in parts)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_deterministic(scheme: str) -> None:
    """The same seed must give the same partitions (no global RNG)."""
    groups = _groups()
    assert partition(groups, 4, scheme, seed=9) == partition(groups, 4, scheme, seed=9)


@pytest.mark.parametrize("scheme", ("iid", "dirichlet"))
def test_seed_changes_random_schemes(scheme: str) -> None:
    """Another seed must give another split, or the seed is being ignored."""
    groups = _groups()
    assert partition(groups, 4, scheme, seed=1) != partition(groups, 4, scheme, seed=2)


def test_iid_sizes_even() -> None:
    """iid partitions must differ in size by at most one example."""
    sizes = [len(p) for p in partition(_groups(), 7, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_more_skewed_than_iid() -> None:
    """Small alpha must concentrate each client on few groups, unlike iid; a
    Dirichlet that ignored alpha would show iid-like group shares."""
    groups = _groups()
    iid = [_max_share(partition(groups, 6, "iid", seed=s), groups) for s in range(3)]
    skew = [
        _max_share(partition(groups, 6, "dirichlet", alpha=0.1, seed=s), groups)
        for s in range(3)
    ]
    assert sum(skew) / 3 > sum(iid) / 3 + 0.3


@pytest.mark.filterwarnings("ignore:The specified min_partition_size:UserWarning")
def test_dirichlet_matches_flwr_datasets() -> None:
    """Where flwr's DirichletPartitioner succeeds, our split must equal its split
    for the same seed; a different sampling order would break the equality."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    groups = _groups()
    # (0, 0.1, 10, 5) needs a second draw, checking the resampling sequence too.
    for seed, alpha, clients, min_size in (
        (0, 0.5, 5, 1),
        (3, 0.1, 5, 1),
        (0, 0.1, 10, 5),
    ):
        flwr = DirichletPartitioner(
            num_partitions=clients,
            partition_by="group",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=False,
            seed=seed,
        )
        flwr.dataset = Dataset.from_dict(
            {"group": groups, "index": list(range(len(groups)))}
        )
        expected = [sorted(flwr.load_partition(i)["index"]) for i in range(clients)]
        got = partition(
            groups,
            clients,
            "dirichlet",
            alpha=alpha,
            seed=seed,
            min_partition_size=min_size,
        )
        assert got == expected


def test_dirichlet_tops_up_small_partitions() -> None:
    """With alpha so small that 11 draws all leave a client short (flwr raises
    here), every partition must still reach min_partition_size, with each
    example assigned exactly once and the split still more skewed than iid."""
    groups = _groups()
    for seed in range(3):
        parts = partition(
            groups, 20, "dirichlet", alpha=0.01, seed=seed, min_partition_size=20
        )
        assert min(len(p) for p in parts) >= 20
        assert sorted(i for p in parts for i in p) == list(range(len(groups)))
        iid_share = _max_share(partition(groups, 20, "iid", seed=seed), groups)
        assert _max_share(parts, groups) > iid_share + 0.15


def test_task_one_group_per_client() -> None:
    """With as many partitions as groups each client must own exactly one whole group."""
    groups = _groups()
    summary = describe(partition(groups, 6, "task"), groups)
    assert [list(counts) for counts in summary] == [
        ["add"],
        ["count"],
        ["last"],
        ["reverse"],
        ["sort"],
        ["upper"],
    ]
    assert [sum(c.values()) for c in summary] == [60, 70, 80, 90, 100, 110]


def test_task_round_robin_when_fewer_partitions() -> None:
    """Fewer partitions than groups deals sorted groups round-robin."""
    groups = _groups()
    summary = describe(partition(groups, 4, "task"), groups)
    expected = [["add", "sort"], ["count", "upper"], ["last"], ["reverse"]]
    assert [sorted(c) for c in summary] == expected


def test_describe_counts_and_bad_index() -> None:
    """describe must count groups per partition and reject out-of-range indices."""
    groups = ["a", "b", "a"]
    assert describe([[0, 2], [1]], groups) == [{"a": 2}, {"b": 1}]
    with pytest.raises(PartitionError, match="index 3"):
        describe([[3]], groups)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_partitions": 2, "scheme": "random"}, "scheme='random'"),
        ({"num_partitions": 0, "scheme": "iid"}, "num_partitions=0"),
        ({"num_partitions": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha=0.0"),
        ({"num_partitions": 2, "scheme": "iid", "min_partition_size": -1}, "size=-1"),
        ({"num_partitions": 600, "scheme": "iid"}, "num_partitions=600.*510"),
        ({"num_partitions": 7, "scheme": "task"}, "num_partitions=7 and 6 groups"),
        ({"num_partitions": 6, "scheme": "task", "min_partition_size": 70}, "size=70"),
        (
            {"num_partitions": 10, "scheme": "iid", "min_partition_size": 52},
            "size=52 x num",
        ),
    ],
)
def test_partition_errors_name_argument(
    kwargs: dict[str, object], message: str
) -> None:
    """Bad arguments must raise PartitionError naming the argument and value."""
    with pytest.raises(PartitionError, match=message):
        partition(_groups(), **kwargs)  # type: ignore[arg-type]
