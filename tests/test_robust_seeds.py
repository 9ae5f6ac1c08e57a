"""FedKSeed's robust and private aggregation in seed space.

Hand-computed per-seed median and trimmed mean, Krum on the clients' K-vectors,
the plain rule's bit-exactness when no bound binds, central DP (seeded noise
on all K coefficients, its scale, the account across a resume) and the local
DP transform a client applies to its pairs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict

from protocols import ZOSpec
from protocols.zo_messages import (
    ZoTrainRes,
    decode_zo_train_ins,
    encode_zo_train_res,
)
from strategies.fedkseed import FedKSeed, ZoGlobal
from strategies.privacy import DPSettings, PrivacyAccount
from strategies.robust import Bounds
from strategies.seed_pool import (
    SeedUpdate,
    central_dp_sum,
    local_dp_pairs,
    seed_coefficients,
    seed_sums,
)
from tests.conftest import fake_zo_spec

CURRENT = ZoGlobal(0, "h0")
pytestmark = pytest.mark.usefixtures("flower_identity")  # Messages need a run id


def _spec(k: int, lr: float = 0.1) -> ZOSpec:
    return fake_zo_spec(k, lr)


def _u(idx: list[int], g: list[float], n: int = 1) -> SeedUpdate:
    return SeedUpdate(
        torch.tensor(idx, dtype=torch.int32), torch.tensor(g, dtype=torch.float32), n
    )


def _reply(idx: list[int], g: list[float], n: int) -> Message:
    res = ZoTrainRes(
        np.array(idx, dtype=np.int32),
        np.array(g, dtype=np.float32),
        n,
        1.0,
        CURRENT.round,
        CURRENT.hash,
    )
    ask = Message(RecordDict(), dst_node_id=1, message_type="train.zo")
    return Message(encode_zo_train_res(res), reply_to=ask)


def _coefficients(
    bounds: Bounds, updates: list[SeedUpdate], weights: list[float], k: int = 6
) -> list[float]:
    sums, reported = seed_sums(updates, k)
    out = seed_coefficients(sums, reported, weights, bounds, learning_rate=0.1)
    return out.coefficients.tolist()


# Four clients on K = 6 seeds; per-seed sums s_ij and weights 1, 1, 2, 4 (/8).
#   seed 0: A 1                     seed 1: A 4 (2+2), B 6, C 100
#   seed 2: D 0 (3-3, reported)     seed 3: A 5, B -1, C 2
#   seed 4: C 7                     seed 5: nobody
OVERLAP = [
    _u([0, 1, 1, 3], [1.0, 2.0, 2.0, 5.0]),
    _u([1, 3], [6.0, -1.0]),
    _u([1, 3, 4], [100.0, 2.0, 7.0]),
    _u([2, 2], [3.0, -3.0]),
]
WEIGHTS = [1.0, 1.0, 2.0, 4.0]


def test_per_seed_median_by_hand() -> None:
    """c_j = -eta * (sum of omega over the seed's reporters) * median of their
    sums: seed 1's outlier (100) is ignored; single-client seeds keep their
    value; a seed nobody reported stays 0.

    Breaks if the statistic runs over all clients (zeros of non-reporters
    would count), if the reporters' weight share is wrong, or if a seed whose
    scalars cancel is treated as unreported.
    """
    got = _coefficients(Bounds(aggregator="median"), OVERLAP, WEIGHTS)
    want = [
        -0.1 * (1 / 8) * 1.0,
        -0.1 * (4 / 8) * 6.0,  # median(4, 6, 100)
        0.0,
        -0.1 * (4 / 8) * 2.0,  # median(5, -1, 2)
        -0.1 * (2 / 8) * 7.0,
        0.0,
    ]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    mean = _coefficients(Bounds(), OVERLAP, WEIGHTS)
    assert mean[1] == pytest.approx(-0.1 * (4 + 6 + 200) / 8)  # the outlier's pull


def test_per_seed_trimmed_mean_by_hand() -> None:
    """Flower's trim_mean per seed over its reporters: with 5 reporters and a
    cut of 0.2 one value goes at each end; with 2 reporters nothing is cut.

    Breaks if the cut is computed over all clients rather than the seed's
    reporters, or if the trimmed values are not the extremes.
    """
    updates = [
        _u([0, 1], [1.0, 10.0]),
        _u([0, 1], [2.0, 20.0]),
        _u([0], [3.0]),
        _u([0], [4.0]),
        _u([0, 2], [1000.0, -5.0]),
    ]
    got = _coefficients(
        Bounds(aggregator="trimmed_mean", trim_fraction=0.2), updates, [1.0] * 5
    )
    want = [
        -0.1 * 1.0 * 3.0,  # mean(2, 3, 4): 1 and 1000 cut
        -0.1 * (2 / 5) * 15.0,
        -0.1 * (1 / 5) * -5.0,
        0.0,
        0.0,
        0.0,
    ]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_robust_rules_equal_the_mean_when_reporters_agree() -> None:
    """Where every reporter of a seed has the same sum, median and trimmed
    mean give the weighted mean's coefficient (different weights included)."""
    updates = [_u([0, 2], [2.0, 1.0]), _u([0], [2.0]), _u([0, 2, 4], [2.0, 1.0, 3.0])]
    weights = [3.0, 1.0, 2.0]
    mean = _coefficients(Bounds(), updates, weights)
    for rule in ("median", "trimmed_mean"):
        got = _coefficients(Bounds(aggregator=rule), updates, weights)
        assert got == pytest.approx(mean, rel=1e-12, abs=1e-15), rule


def test_krum_in_seed_space_picks_the_most_central_client() -> None:
    """Four honest vectors along one direction at scales 1.0, 1.1, 0.9, 1.05
    and one far away: Krum (f = 1) scores each by its two nearest neighbours
    and picks the 1.05 client (score 2 x 0.05^2 x |v|^2, the smallest), and
    the coefficients are exactly -eta times its sums.

    Breaks if Krum sees anything but the seed-space vectors, or if the
    selection or the returned index is wrong.
    """
    base = [1.0, -1.0, 0.5]
    updates = [_u([0, 1, 2], [a * b for b in base]) for a in (1.0, 1.1, 0.9, 1.05)]
    updates.append(_u([0, 1, 2, 5], [50.0, 50.0, 50.0, 50.0]))
    sums, reported = seed_sums(updates, 6)
    out = seed_coefficients(
        sums,
        reported,
        [1.0] * 5,
        Bounds(aggregator="krum", byzantine=1),
        learning_rate=0.1,
    )
    assert out.used == [3]
    assert torch.equal(out.coefficients, sums[3] * -0.1)


def test_mean_is_bit_identical_to_plain_fedkseed_when_no_bound_binds() -> None:
    """An honest round (|g| in [1, 2], counts within 3x the median) through
    the strategy gives exactly the coefficients of the original FedKSeed
    formula, bit for bit, and reports that nothing was clipped or capped.

    Breaks if the default bounds change an honest round, or the summation
    order or weight arithmetic drift from the plain rule.
    """
    k, gen = 64, torch.Generator().manual_seed(3)
    strategy = FedKSeed(spec=_spec(k, lr=3e-3), local_steps=20, batch_size=1)
    rows = []
    for n in (40, 55, 70):
        idx = torch.randint(k, (20,), generator=gen, dtype=torch.int32)
        sign = torch.randint(2, (20,), generator=gen) * 2 - 1
        g = sign * (1.0 + torch.rand(20, generator=gen))
        rows.append((idx.tolist(), g.tolist(), n))
    replies = [(f"n{i}", _reply(*row)) for i, row in enumerate(rows)]
    result = strategy.aggregate(1, replies, CURRENT)
    assert result.delta is not None
    assert result.stats["clipped"] == 0 and result.stats["weights_capped"] == 0

    # The formula of strategies.seed_pool before bounds existed.
    total = sum(n for *_, n in rows)
    acc = torch.zeros(k, dtype=torch.float64)
    for idx, g, n in rows:
        per_seed = torch.zeros(k, dtype=torch.float64)
        per_seed.index_add_(
            0, torch.tensor(idx).long(), torch.tensor(g, dtype=torch.float32).double()
        )
        acc.add_(per_seed, alpha=n / total)
    old = (acc * -3e-3).to(torch.float32)
    keep = torch.nonzero(old != 0).flatten()
    assert np.array_equal(result.delta.indices, keep.to(torch.int32).numpy())
    assert np.array_equal(result.delta.coefficients, old[keep].numpy())
    assert result.delta.coefficients.dtype == np.float32


def _dp(mode: str = "central", sigma: float = 1.0, clip: float = 2.0) -> DPSettings:
    return DPSettings(
        mode=mode,
        noise_multiplier=sigma,
        clip_norm=clip,
        delta=1e-3,
        target_epsilon=None,
        population=100,
    )


def _dp_round(
    strategy: FedKSeed,
    server_round: int,
    rows: list[tuple[list[int], list[float], int]],
) -> torch.Tensor:
    """Configure ``len(rows) + 1`` nodes (one never replies), aggregate; the
    dense float32 coefficients."""
    nodes = {i + 1: f"n{i}" for i in range(len(rows) + 1)}
    strategy.configure(server_round, nodes, CURRENT)
    replies = [(f"n{i}", _reply(*row)) for i, row in enumerate(rows)]
    result = strategy.aggregate(server_round, replies, CURRENT)
    assert result.delta is not None
    dense = torch.zeros(strategy.spec.num_seeds)
    dense[torch.from_numpy(result.delta.indices).long()] = torch.from_numpy(
        result.delta.coefficients
    )
    return dense


ROWS = [([0, 3, 3], [1.0, 2.0, 2.0], 10), ([1, 3], [-1.5, 1.0], 30)]


def test_central_dp_noise_is_seeded_and_covers_every_seed() -> None:
    """Same noise seed, same replies: the same coefficients bit for bit;
    another noise seed: different ones; every one of the K coefficients is
    non-zero (the support reveals nothing)."""
    k = 32
    a = _dp_round(
        FedKSeed(
            spec=_spec(k), local_steps=3, batch_size=1, privacy=_dp(), noise_seed=5
        ),
        1,
        ROWS,
    )
    b = _dp_round(
        FedKSeed(
            spec=_spec(k), local_steps=3, batch_size=1, privacy=_dp(), noise_seed=5
        ),
        1,
        ROWS,
    )
    c = _dp_round(
        FedKSeed(
            spec=_spec(k), local_steps=3, batch_size=1, privacy=_dp(), noise_seed=6
        ),
        1,
        ROWS,
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert bool((a != 0).all()) and bool((c != 0).all())


def test_central_dp_noise_has_the_calibrated_scale() -> None:
    """On an all-zero update the coefficients are pure noise:
    -eta * N(0, (sigma C)^2) / m with m the nodes *sampled* (3, of which 2
    replied), so their std is eta * sigma * C / 3 (within 10% over K = 4096).

    Breaks if the noise is divided by the replies instead of the sampled
    count, or scaled by anything but sigma * C.
    """
    k, sigma, clip = 4096, 1.5, 2.0
    strategy = FedKSeed(
        spec=_spec(k),
        local_steps=3,
        batch_size=1,
        privacy=_dp(sigma=sigma, clip=clip),
        noise_seed=1,
    )
    zeros = [([0, 1], [0.0, 0.0], 5), ([2], [0.0], 5)]
    dense = _dp_round(strategy, 1, zeros)
    want = 0.1 * sigma * clip / 3
    assert float(dense.double().std()) == pytest.approx(want, rel=0.1)
    assert abs(float(dense.double().mean())) < 4 * want / k**0.5


def test_central_dp_clips_each_client_to_c() -> None:
    """Without noise the DP sum is the sum of the clients' vectors, each
    scaled to L2 norm at most C (one counted as clipped)."""
    sums, _ = seed_sums([_u([0, 1], [3.0, 4.0]), _u([2], [0.5])], 4)
    gen = torch.Generator().manual_seed(0)
    total, clipped = central_dp_sum(sums, clip_norm=1.0, noise_std=0.0, generator=gen)
    assert clipped == 1
    assert total.tolist() == pytest.approx([0.6, 0.8, 0.5, 0.0])


def test_dp_resume_gives_the_same_epsilon_and_the_same_noise() -> None:
    """Two rounds, checkpoint (through JSON), a fresh strategy loads it: the
    same epsilon as the library's for two rounds, and round 3 releases the
    same coefficients as the uninterrupted run (same secret noise seed).

    Breaks if the account or the noise seed is not in the state.
    """
    k = 16

    def fresh() -> FedKSeed:
        return FedKSeed(spec=_spec(k), local_steps=3, batch_size=1, privacy=_dp())

    run = fresh()
    for r in (1, 2):
        _dp_round(run, r, ROWS)
    eps = run.account.epsilon if run.account else None
    reference = PrivacyAccount(_dp())
    reference.spend(3)
    assert eps == pytest.approx(reference.spend(3), rel=1e-12)
    resumed = fresh()
    assert resumed.noise_seed != run.noise_seed
    resumed.load_state(json.loads(json.dumps(run.state())))
    assert resumed.account is not None and resumed.account.epsilon == eps
    assert [d.coefficients.tolist() for d in resumed.history] == [
        d.coefficients.tolist() for d in run.history
    ]
    assert torch.equal(_dp_round(resumed, 3, ROWS), _dp_round(run, 3, ROWS))
    assert resumed.account.epsilon == run.account.epsilon > eps


def test_local_dp_pairs_merge_clip_and_noise() -> None:
    """Steps merge to one pair per seed (sorted), the vector is clipped to C,
    and noise of std sigma*C is added, drawn from the given generator.

    Breaks if merging, ordering, clipping or the noise scale is wrong.
    """
    idx = torch.tensor([3, 1, 3, 0], dtype=torch.int32)
    g = torch.tensor([3.0, 4.0, 1.0, 0.0])
    # per seed: 0 -> 0, 1 -> 4, 3 -> 4; norm 4 sqrt 2 > C = 2
    seeds, vals = local_dp_pairs(
        idx, g, clip_norm=2.0, noise_multiplier=0.0, generator=torch.Generator()
    )
    assert seeds.dtype == torch.int32 and seeds.tolist() == [0, 1, 3]
    s = 2.0 / 2**0.5
    assert vals.tolist() == pytest.approx([0.0, s, s])

    gen, same = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    _, noisy = local_dp_pairs(
        idx, g, clip_norm=2.0, noise_multiplier=0.5, generator=gen
    )
    expect = torch.tensor([0.0, s, s]) + torch.randn(3, generator=same) * 1.0
    assert torch.allclose(noisy, expect, atol=1e-6)

    many = torch.arange(20000, dtype=torch.int32)
    _, pure = local_dp_pairs(
        many,
        torch.zeros(20000),
        clip_norm=2.0,
        noise_multiplier=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    assert float(pure.std()) == pytest.approx(1.0, rel=0.05)


def test_local_dp_travels_in_the_instruction_and_is_accounted() -> None:
    """With privacy.mode local every train.zo instruction carries (C, sigma),
    and the server accounts epsilon with multiplier sigma / 2."""
    strategy = FedKSeed(
        spec=_spec(8), local_steps=3, batch_size=1, privacy=_dp("local", 1.0, 2.0)
    )
    (message,) = strategy.configure(1, {1: "n0"}, CURRENT)
    ins = decode_zo_train_ins(message.content)
    assert ins.local_privacy is not None
    assert (ins.local_privacy.clip_norm, ins.local_privacy.noise_multiplier) == (
        2.0,
        1.0,
    )
    result = strategy.aggregate(1, [("n0", _reply([0, 5], [0.3, -0.2], 4))], CURRENT)
    reference = PrivacyAccount(_dp("local", 1.0, 2.0))
    assert result.stats["epsilon"] == pytest.approx(reference.spend(1), rel=1e-12)


def test_central_dp_ignores_the_adaptive_scalar_bound() -> None:
    """Under central DP the per-scalar clamp is data-independent: with the
    default adaptive clip (which would clamp the 40.0 below to 3 x the low
    median of the clients' largest |g|, 3 x 1.0), the release equals one made
    with the clip off, and the row records no adaptive bound.

    Breaks if the adaptive bound is applied: one client's scalars would then
    change how the others are clamped, and the sum's sensitivity would no
    longer be C.
    """
    rows = [([0, 1], [1.0, 40.0], 5), ([2], [1.0], 5), ([3], [0.5], 5)]

    def release(bounds: Bounds) -> tuple[torch.Tensor, dict[str, object]]:
        strategy = FedKSeed(
            spec=_spec(16),
            local_steps=2,
            batch_size=1,
            privacy=_dp(clip=100.0),
            noise_seed=3,
            bounds=bounds,
        )
        nodes = {i + 1: f"n{i}" for i in range(len(rows))}
        strategy.configure(1, nodes, CURRENT)
        replies = [(f"n{i}", _reply(*row)) for i, row in enumerate(rows)]
        result = strategy.aggregate(1, replies, CURRENT)
        assert result.delta is not None
        return result.delta.coefficients, result.stats

    adaptive, stats = release(Bounds())
    off, _ = release(Bounds(clip="off"))
    assert np.array_equal(adaptive, off)
    assert stats["clip_bound"] is None and stats["clipped"] == 0
