"""FedKSeed kernels: per-seed aggregation and FedKSeed-Pro probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strategies.seed_pool import ProStatistics, SeedUpdate, aggregate_seed_scalars


def _u(idx: list[int], g: list[float], n: int) -> SeedUpdate:
    return SeedUpdate(
        torch.tensor(idx, dtype=torch.int32), torch.tensor(g, dtype=torch.float32), n
    )


def test_aggregation_matches_the_fedkseed_rule_by_hand() -> None:
    """c_j = -eta * sum_i (n_i / n) * sum of i's scalars on j; zero seeds dropped.

    Breaks if weights, the sign, the learning rate or repeated seeds are mishandled.
    """
    a = _u([0, 2, 2], [1.0, 2.0, 3.0], 1)  # seed 2 twice: 5.0
    b = _u([2, 3], [-1.0, 4.0], 3)
    idx, coef = aggregate_seed_scalars([a, b], num_seeds=5, learning_rate=0.1)
    assert idx.tolist() == [0, 2, 3]
    want = [-0.1 * 0.25 * 1.0, -0.1 * (0.25 * 5.0 + 0.75 * -1.0), -0.1 * 0.75 * 4.0]
    assert idx.dtype == torch.int32 and coef.dtype == torch.float32
    assert coef.tolist() == pytest.approx(want, rel=1e-6)


def test_aggregation_equals_fedavg_of_local_sgd_on_a_linear_model() -> None:
    """The seed-compressed update equals averaging the clients' local models.

    Each client does w -= eta * g * z_j locally; FedAvg of those models must
    equal w0 + sum_j c_j z_j (the paper's losslessness claim).
    """
    gen = torch.Generator().manual_seed(0)
    k, d, eta = 6, 11, 0.05
    z = torch.randn(k, d, generator=gen, dtype=torch.float64)
    w0 = torch.randn(d, generator=gen, dtype=torch.float64)
    clients = [_u([1, 4, 1], [0.5, -2.0, 1.5], 2), _u([0, 4], [3.0, 1.0], 6)]
    local = []
    for c in clients:
        w = w0.clone()
        for j, g in zip(c.indices.tolist(), c.scalars.tolist(), strict=True):
            w -= eta * g * z[j]
        local.append(w)
    fedavg = (2 * local[0] + 6 * local[1]) / 8
    idx, coef = aggregate_seed_scalars(clients, num_seeds=k, learning_rate=eta)
    rebuilt = w0 + (coef.double()[:, None] * z[idx.long()]).sum(0)
    assert torch.allclose(rebuilt, fedavg, atol=1e-7)


def test_aggregation_refuses_empty_input() -> None:
    """No updates (or no examples) is an error, not a silent zero update."""
    with pytest.raises(ValueError, match="no updates"):
        aggregate_seed_scalars([], num_seeds=3, learning_rate=0.1)
    with pytest.raises(ValueError, match="no examples"):
        aggregate_seed_scalars([_u([0], [1.0], 0)], num_seeds=3, learning_rate=0.1)


def test_pro_probabilities_start_uniform_and_follow_the_paper_formula() -> None:
    """Round 1 is uniform; then softmax(minmax(mean |clip(H_j)|)) with H_j = [0, ...].

    Breaks if the initial 0.0 is not counted, clipping is skipped, or the
    normalisation differs from the paper's.
    """
    stats = ProStatistics(4, clip=10.0)
    p0 = stats.probabilities()
    assert torch.allclose(p0, torch.full((4,), 0.25))
    stats.update(
        torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([4.0, -2.0, 100.0])
    )
    psi = [4.0 / 2, (2.0 + 10.0) / 3, 0.0, 0.0]  # clip 100 -> 10; initial 0 counted
    lo, hi = min(psi), max(psi)
    scaled = [(v - lo) / (hi - lo + 1e-10) for v in psi]
    want = [math.exp(s) / sum(math.exp(t) for t in scaled) for s in scaled]
    p = stats.probabilities()
    assert p.tolist() == pytest.approx(want, rel=1e-6)
    assert float(p.max() / p.min()) <= math.e + 1e-6
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)


def test_pro_state_round_trips() -> None:
    """Checkpointed statistics restore to the same probabilities."""
    stats = ProStatistics(3, clip=5.0)
    stats.update(torch.tensor([2], dtype=torch.int32), torch.tensor([3.0]))
    again = ProStatistics(3, clip=5.0)
    again.load_state(stats.state())
    assert torch.equal(again.probabilities(), stats.probabilities())


def test_quantised_importance_keeps_the_distribution_within_a_percent() -> None:
    """The uint8 importances on the wire give probabilities within 0.5% of the
    exact ones (softmax of values in [0, 1], quantised to 1/255)."""
    from protocols.zo_messages import ZoTrainIns

    stats = ProStatistics(50, clip=1000.0)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(50, (400,), generator=gen, dtype=torch.int32)
    stats.update(idx, torch.randn(400, generator=gen) * 5)
    q = stats.quantized()
    assert q.dtype == torch.uint8 and int(q.max()) == 255 and int(q.min()) == 0
    ins = ZoTrainIns.__new__(ZoTrainIns)
    object.__setattr__(ins, "importance", q.numpy())
    p = ins.probabilities()
    assert p is not None and p.dtype == np.float64
    assert torch.allclose(torch.from_numpy(p).float(), stats.probabilities(), rtol=5e-3)
