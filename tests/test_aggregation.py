"""Tests for strategies.aggregation (weighted_mean) and strategies.sampling.

weighted_mean is FedAvg's kernel: it is checked against a float64 NumPy
reference, a hand-computed case, bf16 behaviour, bitwise determinism and its
input validation. sample_nodes decides who trains each round: it must be
reproducible from (seed, round), vary across rounds, pick the documented
count and depend only on the stable labels, not on Flower's random node ids.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strategies import AggregationError, SamplingError, sample_nodes, weighted_mean


def _updates(k: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "a": torch.randn(5, 7, generator=g).to(dtype),
            "b": (torch.randn(11, generator=g) * 10).to(dtype),
            "s": torch.randn((), generator=g).to(dtype),
        }
        for _ in range(k)
    ]


# -- weighted_mean ---------------------------------------------------------------


def test_matches_numpy_float64_reference() -> None:
    """The mean of float32 inputs must equal NumPy's float64 weighted average
    to float32 accuracy, in float32, with the first update's name order."""
    updates = _updates(5)
    weights = [3.0, 1.0, 7.0, 0.0, 2.5]
    out = weighted_mean(updates, weights)
    assert list(out) == ["a", "b", "s"]
    for name in out:
        ref = np.average(
            np.stack([u[name].double().numpy() for u in updates]),
            axis=0,
            weights=weights,
        )
        assert out[name].dtype == torch.float32
        assert out[name].shape == updates[0][name].shape
        np.testing.assert_allclose(
            out[name].double().numpy(), ref, rtol=1e-6, atol=1e-6
        )


def test_hand_computed_example() -> None:
    """[1, 2] with weight 1 and [3, 6] with weight 3: (1*[1,2] + 3*[3,6]) / 4
    = [2.5, 5.0]."""
    out = weighted_mean(
        [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}], [1, 3]
    )
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]), atol=1e-6, rtol=0)


def test_equal_weights_is_plain_mean_and_scale_invariant() -> None:
    """Weights are normalised: [2, 2] equals [1, 1] equals the plain mean, and a
    single update is returned as is."""
    updates = _updates(2)
    m1 = weighted_mean(updates, [1, 1])
    m2 = weighted_mean(updates, [2, 2])
    for name in m1:
        assert torch.allclose(
            m1[name], (updates[0][name] + updates[1][name]) / 2, atol=1e-6
        )
        assert torch.allclose(m1[name], m2[name], atol=1e-7)
    single = weighted_mean(updates[:1], [5])
    for name in single:
        assert torch.equal(single[name], updates[0][name])


def test_zero_weight_update_ignored() -> None:
    """An update with weight 0 must not influence the mean at all."""
    updates = _updates(3)
    with_zero = weighted_mean(updates, [1.0, 0.0, 2.0])
    without = weighted_mean([updates[0], updates[2]], [1.0, 2.0])
    for name in with_zero:
        assert torch.allclose(with_zero[name], without[name], atol=1e-6)


def test_bfloat16_stays_bfloat16_and_matches_rounded_fp32_mean() -> None:
    """bf16 adapters must come back as bf16 and equal the float32 mean of the
    same (exactly upcast) values rounded once to bf16: accumulating in bf16
    would lose precision with every client. The result must also be within one
    bf16 rounding of the float64 reference."""
    updates = _updates(4, torch.bfloat16, seed=5)
    weights = [2.0, 5.0, 1.0, 4.0]
    out = weighted_mean(updates, weights)
    fp32_mean = weighted_mean(
        [{k: v.float() for k, v in u.items()} for u in updates], weights
    )
    for name in out:
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], fp32_mean[name].to(torch.bfloat16)), name
        ref = np.average(
            np.stack([u[name].double().numpy() for u in updates]),
            axis=0,
            weights=weights,
        )
        np.testing.assert_allclose(
            out[name].double().numpy(), ref, rtol=2**-8, atol=1e-6
        )


def test_bfloat16_many_clients_no_bf16_accumulation() -> None:
    """The weighted mean of 64 bf16 clients (values in [0.5, 1.5), weights 1..64)
    must stay within one bf16 ulp of the exact mean. A kernel that accumulated
    in bf16 rounds after every client and drifts by several ulps (0.0156 on
    this input, 19 of 33 elements wrong)."""
    g = torch.Generator().manual_seed(11)
    updates = [
        {"w": (torch.rand(33, generator=g) + 0.5).to(torch.bfloat16)} for _ in range(64)
    ]
    weights = [float(i + 1) for i in range(64)]
    out = weighted_mean(updates, weights)["w"]
    ref = np.average(
        np.stack([u["w"].double().numpy() for u in updates]), axis=0, weights=weights
    )
    ref_bf16 = torch.from_numpy(ref).float().to(torch.bfloat16)
    # at most one bf16 ulp (2**-7 on [1, 2), 2**-8 on [0.5, 1)) from the exact mean
    assert float((out.double() - ref_bf16.double()).abs().max()) <= 2**-7
    assert int((out != ref_bf16).sum()) <= 3


def test_float16_stays_float16() -> None:
    """float16 inputs also keep their dtype."""
    out = weighted_mean(_updates(2, torch.float16), [1, 1])
    assert all(t.dtype == torch.float16 for t in out.values())


def test_deterministic() -> None:
    """Same inputs twice must give bit-identical outputs (reproducible runs)."""
    updates = _updates(6)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    a = weighted_mean(updates, weights)
    b = weighted_mean(updates, weights)
    for name in a:
        assert torch.equal(a[name], b[name])


def test_inputs_not_mutated() -> None:
    """The kernel must not write into the caller's tensors."""
    updates = _updates(3)
    copies = [{k: v.clone() for k, v in u.items()} for u in updates]
    weighted_mean(updates, [1, 2, 3])
    for u, c in zip(updates, copies, strict=True):
        for name in u:
            assert torch.equal(u[name], c[name])


@pytest.mark.parametrize(
    ("n_updates", "weights", "needle"),
    [
        (0, [], "no updates"),
        (2, [1.0], "2 updates but 1 weights"),
        (2, [1.0, -1.0], "weights"),
        (2, [1.0, float("nan")], "weights"),
        (2, [1.0, float("inf")], "weights"),
        (2, [0.0, 0.0], "weights"),
    ],
)
def test_bad_arguments(n_updates: int, weights: list, needle: str) -> None:
    """Empty input, mismatched lengths and negative/NaN/Inf/zero-sum weights
    must raise AggregationError instead of producing NaN or garbage."""
    with pytest.raises(AggregationError, match=needle):
        weighted_mean(_updates(n_updates), weights)


def test_shape_mismatch_names_tensor() -> None:
    """A client update with a wrong shape must be refused naming the tensor."""
    updates = _updates(2)
    updates[1]["b"] = torch.zeros(12)
    with pytest.raises(AggregationError, match="'b'"):
        weighted_mean(updates, [1, 1])


def test_dtype_mismatch_names_tensor() -> None:
    """Mixing dtypes for one tensor must be refused naming it."""
    updates = _updates(2)
    updates[1]["a"] = updates[1]["a"].to(torch.bfloat16)
    with pytest.raises(AggregationError, match="'a'"):
        weighted_mean(updates, [1, 1])


def test_differing_names_rejected() -> None:
    """Updates with an extra or a missing tensor name must be refused."""
    updates = _updates(2)
    updates[1]["extra"] = torch.zeros(1)
    with pytest.raises(AggregationError):
        weighted_mean(updates, [1, 1])
    updates = _updates(2)
    del updates[1]["s"]
    with pytest.raises(AggregationError, match="'s'"):
        weighted_mean(updates, [1, 1])


# -- sample_nodes -------------------------------------------------------------------


def _nodes(n: int, offset: int = 1000) -> dict[int, str]:
    return {offset + 37 * i: f"p{i:04d}" for i in range(n)}


def test_sampling_deterministic_for_seed_and_round() -> None:
    """The same (seed, round) must pick the same nodes in the same order."""
    nodes = _nodes(20)
    a = sample_nodes(nodes, fraction=0.5, min_nodes=1, seed=3, server_round=4)
    b = sample_nodes(nodes, fraction=0.5, min_nodes=1, seed=3, server_round=4)
    assert a == b
    assert len(set(a)) == len(a) and set(a) <= set(nodes)


def test_sampling_differs_across_rounds_and_seeds() -> None:
    """Half of 20 nodes drawn in rounds 1..10 must not always be the same set
    (otherwise half the federation never trains), and another seed changes
    the draw."""
    nodes = _nodes(20)
    draws = [
        frozenset(
            sample_nodes(nodes, fraction=0.5, min_nodes=1, seed=0, server_round=r)
        )
        for r in range(1, 11)
    ]
    assert len(set(draws)) > 1
    assert set().union(*draws) != set(draws[0])
    other_seed = [
        frozenset(
            sample_nodes(nodes, fraction=0.5, min_nodes=1, seed=1, server_round=r)
        )
        for r in range(1, 11)
    ]
    assert other_seed != draws


def test_sampling_result_sorted_by_label() -> None:
    """Chosen nodes are returned ordered by label (the summation order)."""
    nodes = _nodes(20)
    picked = sample_nodes(nodes, fraction=0.5, min_nodes=1, seed=2, server_round=1)
    labels = [nodes[n] for n in picked]
    assert labels == sorted(labels)


@pytest.mark.parametrize(
    ("n", "fraction", "min_nodes", "want"),
    [
        (20, 0.5, 1, 10),
        (10, 0.25, 1, 3),
        (10, 0.1, 4, 4),
        (7, 1.0, 1, 7),
        (5, 0.01, 1, 1),
        (3, 0.5, 3, 3),
    ],
)
def test_sampling_count(n: int, fraction: float, min_nodes: int, want: int) -> None:
    """Count is max(min_nodes, ceil(fraction * N)) (hand-computed per case)."""
    picked = sample_nodes(
        _nodes(n), fraction=fraction, min_nodes=min_nodes, seed=0, server_round=1
    )
    assert len(picked) == want
    assert want == max(min_nodes, math.ceil(fraction * n))


@pytest.mark.parametrize(("n", "fraction", "want"), [(100, 0.55, 55), (50, 0.14, 7)])
def test_sampling_count_no_float_overshoot(n: int, fraction: float, want: int) -> None:
    """A share written as a decimal must give that share: 55% of 100 nodes is 55
    nodes, not 56 (0.55 * 100 == 55.00000000000001 in floating point, and a
    bare ceil() then samples an extra node)."""
    picked = sample_nodes(
        _nodes(n), fraction=fraction, min_nodes=1, seed=0, server_round=1
    )
    assert len(picked) == want


def test_sampling_independent_of_insertion_order() -> None:
    """The draw depends on labels, not on the order the nodes were registered."""
    nodes = _nodes(20)
    reversed_nodes = dict(reversed(list(nodes.items())))
    for r in range(1, 5):
        a = sample_nodes(nodes, fraction=0.3, min_nodes=1, seed=9, server_round=r)
        b = sample_nodes(
            reversed_nodes, fraction=0.3, min_nodes=1, seed=9, server_round=r
        )
        assert a == b


def test_sampling_independent_of_node_ids() -> None:
    """Flower node ids are random per run; relabelled ids with the same labels
    must select the same labels, so runs are reproducible across restarts."""
    labels = [f"p{i:04d}" for i in range(20)]
    run1 = {1000 + i: lab for i, lab in enumerate(labels)}
    run2 = {987654321 - 13 * i: lab for i, lab in enumerate(labels)}
    for r in range(1, 6):
        a = sample_nodes(run1, fraction=0.4, min_nodes=2, seed=5, server_round=r)
        b = sample_nodes(run2, fraction=0.4, min_nodes=2, seed=5, server_round=r)
        assert [run1[n] for n in a] == [run2[n] for n in b]


@pytest.mark.parametrize(
    ("n", "fraction", "min_nodes"),
    [(2, 1.0, 3), (0, 1.0, 1), (5, 0.0, 1), (5, 1.5, 1), (5, 0.5, 0)],
)
def test_sampling_errors(n: int, fraction: float, min_nodes: int) -> None:
    """Too few nodes for min_nodes, or a fraction / min_nodes out of range,
    must raise SamplingError rather than silently train fewer nodes."""
    with pytest.raises(SamplingError):
        sample_nodes(
            _nodes(n), fraction=fraction, min_nodes=min_nodes, seed=0, server_round=1
        )
