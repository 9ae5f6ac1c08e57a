"""Kernels of strategies.robust and the accountant of strategies.privacy.

Each robust aggregator is checked against a result computed by hand on a few
scalars; the bounds (clip, weight caps) against their definitions; the
accountant against Google's ``dp-accounting`` itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
import torch
from dp_accounting import dp_event, rdp  # type: ignore[import-untyped]

from strategies.aggregation import AggregationError
from strategies.privacy import DPSettings, PrivacyAccount, PrivacyBudgetExhausted
from strategies.robust import (
    Bounds,
    capped_weights,
    clip_bound,
    clip_to_norm,
    combine,
    is_finite,
    update_norm,
)


def _updates(values: Sequence[float]) -> list[dict[str, torch.Tensor]]:
    """One update per value: tensor ``a`` holds it, ``b`` is zero (two tensors
    so that the name handling is exercised)."""
    return [
        {"a": torch.tensor([v], dtype=torch.float32), "b": torch.zeros(2, 2)}
        for v in values
    ]


def _a(result: dict[str, torch.Tensor]) -> float:
    assert torch.equal(result["b"], torch.zeros(2, 2))
    return float(result["a"][0])


def test_mean_is_the_weighted_mean() -> None:
    """mean: (1*1 + 2*3 + 6*1) / 5 = 13/5."""
    out = combine(_updates([1, 2, 6]), [1, 3, 1], Bounds())
    assert _a(out.tensors) == pytest.approx(13 / 5)
    assert out.used == [0, 1, 2]


def test_median_is_coordinatewise_and_ignores_weights() -> None:
    """median of (1, 5), (2, -1), (10, 0) per coordinate is (2, 0), whatever
    the weights."""
    ups = [
        {"w": torch.tensor([1.0, 5.0])},
        {"w": torch.tensor([2.0, -1.0])},
        {"w": torch.tensor([10.0, 0.0])},
    ]
    out = combine(ups, [100, 1, 1], Bounds(aggregator="median"))
    assert out.tensors["w"].tolist() == [2.0, 0.0]
    assert out.tensors["w"].dtype == torch.float32


def test_trimmed_mean_cuts_trim_fraction_at_each_end() -> None:
    """trim 0.2 of 5 values cuts one at each end: (1, 2, 3, 4, 100) -> 3;
    trim 0.0 keeps all: mean 22."""
    vals = [100, 2, 1, 4, 3]
    out = combine(_updates(vals), [1] * 5, Bounds(aggregator="trimmed_mean"))
    assert _a(out.tensors) == pytest.approx(3.0)
    none = combine(
        _updates(vals), [1] * 5, Bounds(aggregator="trimmed_mean", trim_fraction=0.0)
    )
    assert _a(none.tensors) == pytest.approx(22.0)


KRUM_VALUES: list[float] = [0.0, 1.0, 2.0, 10.0, 11.0]
# With f = 1, n = 5 each point scores the sum of squared distances to its
# n - f - 2 = 2 nearest others: 0 -> 1+4 = 5, 1 -> 1+1 = 2, 2 -> 1+4 = 5,
# 10 -> 1+64 = 65, 11 -> 1+81 = 82.


def test_krum_picks_the_lowest_score() -> None:
    """Krum returns the update of the lowest score: value 1 (index 1)."""
    out = combine(_updates(KRUM_VALUES), [1] * 5, Bounds(aggregator="krum"))
    assert out.used == [1]
    assert _a(out.tensors) == 1.0


def test_multi_krum_averages_the_kept_with_their_weights() -> None:
    """Multi-Krum keeping 3 keeps values 0, 1, 2 (scores 5, 2, 5) and averages
    them with their weights 1, 2, 3: (0 + 2 + 6) / 6."""
    bounds = Bounds(aggregator="multi_krum", krum_keep=3)
    out = combine(_updates(KRUM_VALUES), [1, 2, 3, 100, 100], bounds)
    assert sorted(out.used) == [0, 1, 2]
    assert _a(out.tensors) == pytest.approx(8 / 6)


def test_bulyan_selects_then_averages_the_beta_closest_to_the_median() -> None:
    """Bulyan, f = 1, n = 7: theta = 5 selected by Multi-Krum (scores with
    4 nearest: 0 -> 90, 1 -> 63, 2 -> 46, 6 -> 78, 7 -> 111, 50 and 60 far
    more), median of (0, 1, 2, 6, 7) = 2, the beta = 3 closest to it (2, 1, 0)
    average to 1."""
    vals = [50.0, 0.0, 1.0, 60.0, 2.0, 6.0, 7.0]
    out = combine(_updates(vals), [1] * 7, Bounds(aggregator="bulyan"))
    assert sorted(out.used) == [1, 2, 4, 5, 6]
    assert _a(out.tensors) == pytest.approx(1.0)
    with pytest.raises(AggregationError, match="at least 7"):
        combine(_updates(vals[:6]), [1] * 6, Bounds(aggregator="bulyan"))


def test_clip_bound_adaptive_fixed_off() -> None:
    """adaptive: 3 x the low median of (1, 2, 3, 100) = 6 (with two clients the
    smaller size sets the bound), capped by a fixed bound of 5; fixed: the
    fixed bound; off: no bound."""
    sizes = [1.0, 2.0, 3.0, 100.0]
    assert clip_bound(sizes, Bounds()) == pytest.approx(6.0)
    assert clip_bound(sizes, Bounds(fixed_bound=5.0)) == 5.0
    assert clip_bound(sizes, Bounds(clip_multiple=1.0)) == pytest.approx(2.0)
    assert clip_bound([1.0, 1e30], Bounds()) == pytest.approx(3.0)
    assert clip_bound(sizes, Bounds(clip="fixed", fixed_bound=0.5)) == 0.5
    assert clip_bound(sizes, Bounds(clip="off")) is None
    with pytest.raises(ValueError, match="fixed bound"):
        Bounds(clip="fixed")


def test_capped_weights() -> None:
    """A 2**62 claim is capped at 3 x the (low) median; a hello count and
    max_examples cap a claim; equal weighting gives ones."""
    assert capped_weights([10, 20, 2**62], Bounds()) == [10.0, 20.0, 60.0]
    assert capped_weights([10, 20, 30, 2**62], Bounds()) == [10.0, 20.0, 30.0, 60.0]
    assert capped_weights([10, 20, 30], Bounds(), [None, 5, 100]) == [10.0, 5.0, 30.0]
    # hello caps first, then the median of the capped counts (5 -> cap 15)
    assert capped_weights([10, 2**62, 2**62], Bounds(), [None, 5, 5]) == [10.0, 5, 5]
    assert capped_weights([10, 20, 30], Bounds(max_examples=15)) == [10.0, 15.0, 15.0]
    assert capped_weights([10, 20, 2**62], Bounds(weighting="equal")) == [1.0] * 3
    huge = Bounds(weight_multiple=1e30)
    assert capped_weights([10, 2**62], huge) == [10.0, float(2**62)]


def test_clip_to_norm_of_huge_values_is_finite_and_bounded() -> None:
    """1e30 and 3e38 values (finite in float32; their squares are not) are
    scaled to norm <= the bound, finite; a small update is left unchanged."""
    for value in (1e30, 3e38, -3e38):
        update = {"x": torch.full((4, 4), value), "y": torch.full((3,), value)}
        assert math.isfinite(update_norm(update))
        out, factor = clip_to_norm(update, 2.0)
        assert is_finite(out) and factor < 1
        assert update_norm(out) == pytest.approx(2.0, rel=1e-5)
        assert out["x"].dtype == torch.float32
    small = {"x": torch.tensor([0.3, 0.4])}
    out, factor = clip_to_norm(small, 2.0)
    assert factor == 1.0 and torch.equal(out["x"], small["x"])
    assert clip_to_norm(small, None)[1] == 1.0


def _settings(mode: str = "central", target: float | None = None) -> DPSettings:
    return DPSettings(
        mode=mode,
        noise_multiplier=1.1,
        clip_norm=1.0,
        delta=1e-3,
        target_epsilon=target,
        population=10,
    )


def _reference_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """dp-accounting's own RDP accountant: a plain Gaussian composed ``rounds``
    times (what NO_AMPLIFICATION means)."""
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), rounds)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("mode", ["central", "local"])
def test_accountant_matches_dp_accounting(mode: str) -> None:
    """7 central rounds at sigma 1.1 give dp-accounting's epsilon for sigma
    1.1; local mode accounts sigma / 2 (sensitivity 2C of a client's own
    release)."""
    account = PrivacyAccount(_settings(mode))
    assert account.epsilon == 0.0
    for _ in range(7):
        eps = account.spend(5)
    sigma = 1.1 if mode == "central" else 0.55
    assert eps == pytest.approx(_reference_epsilon(sigma, 7, 1e-3), rel=1e-12)
    assert account.rounds == 7


def test_account_state_round_trips_through_json() -> None:
    """A restored account reports the same epsilon and keeps counting the
    same way; a state of other settings is refused."""
    account = PrivacyAccount(_settings())
    for _ in range(3):
        account.spend(4)
    state = json.loads(json.dumps(account.state()))
    again = PrivacyAccount(_settings())
    again.load_state(state)
    assert again.epsilon == account.epsilon and again.rounds == 3
    assert again.spend(4) == account.spend(4)
    changed = DPSettings("central", 1.1, 1.0, 2e-3, None, 10)
    with pytest.raises(ValueError):
        PrivacyAccount(changed).load_state(state)


def test_check_refuses_a_round_past_the_target() -> None:
    """With a target between epsilon after 1 and after 2 rounds, round 1 may
    run, round 2 is refused (before anything is spent)."""
    eps1 = _reference_epsilon(1.1, 1, 1e-3)
    eps2 = _reference_epsilon(1.1, 2, 1e-3)
    account = PrivacyAccount(_settings(target=(eps1 + eps2) / 2))
    account.check(5)
    account.spend(5)
    with pytest.raises(PrivacyBudgetExhausted, match="target_epsilon"):
        account.check(5)
    assert account.rounds == 1


def test_an_account_recorded_with_other_noise_is_refused() -> None:
    """A central run's accountant state does not load into a local-mode
    account (sigma vs sigma/2), nor into one with another sigma."""
    from strategies.privacy import DPSettings, PrivacyAccount

    central = DPSettings("central", 1.0, 1.0, 1e-3, None, 10)
    account = PrivacyAccount(central)
    account.spend(4)
    for other in (
        DPSettings("local", 1.0, 1.0, 1e-3, None, 10),
        DPSettings("central", 2.0, 1.0, 1e-3, None, 10),
    ):
        with pytest.raises(ValueError, match="noise multiplier"):
            PrivacyAccount(other).load_state(account.state())
    same = PrivacyAccount(central)
    same.load_state(account.state())
    assert same.epsilon == account.epsilon
