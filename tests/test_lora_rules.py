"""Tests for strategies.lora_rules: the pure LoRA aggregation kernels.

Checked: the rank/scaling convention (pad and truncate keep dW), FedEx-LoRA's
exactness (and the gap plain FedAvg leaves), FFA-LoRA's exactness and its
frozen-A check, HetLoRA and FlexLoRA against hand-computed numbers, FlexLoRA's
best-rank-r redistribution, per-client ranks on distribution, determinism and
the refusals with messages that name the tensor.
"""

from __future__ import annotations

import math

import pytest
import torch

from strategies.lora_factors import (
    LoraRuleError,
    client_adapter,
    effective_delta,
    fold_residual,
    pad_to,
    pair_factors,
    truncate_to,
)
from strategies.lora_rules import RULES, aggregate

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"
SHAPES = {Q: (8, 6), V: (5, 6)}  # prefix -> (out, in)
ALPHA = 16.0


def _adapter(
    g: torch.Generator, rank: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for prefix, (o, i) in SHAPES.items():
        out[f"{prefix}.lora_A.weight"] = torch.randn(rank, i, generator=g).to(dtype)
        out[f"{prefix}.lora_B.weight"] = torch.randn(o, rank, generator=g).to(dtype)
    return out


def _clients(ranks: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [_adapter(g, r) for r in ranks]


def _mean_delta(
    adapters: list[dict[str, torch.Tensor]], ranks: list[int], weights: list[float]
) -> dict[str, torch.Tensor]:
    """Reference: sum_i w_i (alpha/r_i) B_i A_i in float64, w normalised."""
    total = sum(weights)
    out = {p: torch.zeros(s, dtype=torch.float64) for p, s in SHAPES.items()}
    for ad, r, w in zip(adapters, ranks, weights, strict=True):
        for p in SHAPES:
            a = ad[f"{p}.lora_A.weight"].double()
            b = ad[f"{p}.lora_B.weight"].double()
            out[p] += (w / total) * (ALPHA / r) * (b @ a)
    return out


def _best_rank(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


# -- rank convention ----------------------------------------------------------------


def test_pad_keeps_delta_and_truncate_of_pad_is_identity() -> None:
    """Padding a rank-2 pair to 8 must keep (alpha/r) B A with the new r and
    leave zeros beyond rank 2; truncating back must restore the pair."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g)
    a8, b8 = pad_to(a, b, 2, 8)
    assert a8.shape == (8, 6) and b8.shape == (8, 8)
    assert torch.count_nonzero(a8[2:]) == 0 and torch.count_nonzero(b8[:, 2:]) == 0
    torch.testing.assert_close((ALPHA / 8) * b8 @ a8, (ALPHA / 2) * b @ a)
    a2, b2 = truncate_to(a8, b8, 8, 2)
    assert torch.equal(a2, a)
    torch.testing.assert_close(b2, b)


def test_truncate_keeps_kept_components_and_round_trips() -> None:
    """A rank-3 client handed the truncation of a rank-8 global adapter and
    sending it back unchanged must contribute exactly the global's first
    three components: (alpha/8) B[:, :3] A[:3]."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(8, 6, generator=g), torch.randn(8, 8, generator=g)
    kept = (ALPHA / 8) * b[:, :3] @ a[:3]
    a3, b3 = truncate_to(a, b, 8, 3)
    assert a3.shape == (3, 6) and b3.shape == (8, 3)
    torch.testing.assert_close((ALPHA / 3) * b3 @ a3, kept)
    a8, b8 = pad_to(a3, b3, 3, 8)
    torch.testing.assert_close((ALPHA / 8) * b8 @ a8, kept)


def test_effective_delta_is_peft_scaling() -> None:
    """effective_delta must be (alpha / r) * B @ A per module prefix."""
    ad = _clients([4])[0]
    delta = effective_delta(ad, 4, ALPHA)
    assert list(delta) == [Q, V]
    want = (ALPHA / 4) * ad[f"{Q}.lora_B.weight"] @ ad[f"{Q}.lora_A.weight"]
    torch.testing.assert_close(delta[Q], want)


# -- exact (FedEx-LoRA) and fedavg -----------------------------------------------------


def test_exact_equals_weighted_mean_of_products_and_fedavg_does_not() -> None:
    """base + residual + (alpha/r) B A must equal base + sum_i w_i dW_i; plain
    FedAvg's mean(B) mean(A) must miss it by a visible margin."""
    ranks, weights = [4, 4, 4], [1.0, 2.0, 3.5]
    adapters = _clients(ranks, seed=3)
    g = torch.Generator().manual_seed(4)
    base = {p: torch.randn(s, generator=g) for p, s in SHAPES.items()}
    want = _mean_delta(adapters, ranks, weights)
    ex = aggregate("exact", adapters, ranks, weights, alpha=ALPHA, global_rank=4)
    fa = aggregate("fedavg", adapters, ranks, weights, alpha=ALPHA, global_rank=4)
    assert set(ex.residual) == {Q, V} and fa.residual == {}
    for name in ex.adapter:  # the factors are FedAvg's
        assert torch.equal(ex.adapter[name], fa.adapter[name])
    got = effective_delta(ex.adapter, 4, ALPHA)
    naive = effective_delta(fa.adapter, 4, ALPHA)
    for p in SHAPES:
        merged = fold_residual(base[p], ex.residual[p]) + got[p]
        assert torch.allclose(merged, base[p] + want[p].float(), atol=1e-5, rtol=1e-5)
        assert (naive[p] - want[p].float()).abs().max() > 0.1


def test_exact_bf16_residual_is_taken_against_the_cast_factors() -> None:
    """With bf16 adapters, the residual must absorb the rounding of the
    returned bf16 means, so the identity still holds to float32 tolerance."""
    g = torch.Generator().manual_seed(5)
    adapters = [_adapter(g, 2, torch.bfloat16) for _ in range(3)]
    ranks, weights = [2, 2, 2], [1.0, 1.0, 1.0]
    res = aggregate("exact", adapters, ranks, weights, alpha=ALPHA, global_rank=2)
    assert res.adapter[f"{Q}.lora_A.weight"].dtype == torch.bfloat16
    assert res.residual[Q].dtype == torch.float32
    got = effective_delta(res.adapter, 2, ALPHA)
    want = _mean_delta(adapters, ranks, weights)
    for p in SHAPES:
        torch.testing.assert_close(
            res.residual[p] + got[p], want[p].float(), atol=1e-4, rtol=1e-5
        )


def test_fold_residual_layouts() -> None:
    """fold_residual adds (out, in) residuals, transposes for fan_in_fan_out
    weights and refuses a shape that does not fit."""
    base, r = torch.ones(3, 2), torch.arange(6.0).reshape(3, 2)
    assert torch.equal(fold_residual(base, r), base + r)
    assert torch.equal(fold_residual(base.T, r, fan_in_fan_out=True), (base + r).T)
    with pytest.raises(LoraRuleError, match="does not fit"):
        fold_residual(torch.ones(2, 3), r)


# -- ffa -------------------------------------------------------------------------------


def _ffa_round() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(6)
    current = _adapter(g, 4)
    adapters = []
    for _ in range(3):
        ad = dict(current)
        for p, (o, _i) in SHAPES.items():
            ad[f"{p}.lora_B.weight"] = torch.randn(o, 4, generator=g)
        adapters.append(ad)
    return current, adapters


def test_ffa_is_exact_with_a_shared_frozen_a() -> None:
    """FFA keeps the global A and averages B, so its dW must equal the
    weighted mean of the clients' products."""
    current, adapters = _ffa_round()
    weights = [3.0, 1.0, 2.0]
    res = aggregate(
        "ffa", adapters, [4] * 3, weights, alpha=ALPHA, global_rank=4, current=current
    )
    assert torch.equal(res.adapter[f"{V}.lora_A.weight"], current[f"{V}.lora_A.weight"])
    got = effective_delta(res.adapter, 4, ALPHA)
    want = _mean_delta(adapters, [4] * 3, weights)
    for p in SHAPES:
        assert torch.allclose(got[p], want[p].float(), atol=1e-5, rtol=1e-5)


def test_ffa_refuses_a_client_that_changed_a() -> None:
    """A client whose A differs from the global A by one ulp-sized nudge must
    be refused, naming the client index and the module."""
    current, adapters = _ffa_round()
    name = f"{V}.lora_A.weight"
    adapters[1][name] = adapters[1][name].clone()
    adapters[1][name][0, 0] += 1e-6
    with pytest.raises(LoraRuleError, match=f"client 1 .*'{V}'"):
        aggregate(
            "ffa", adapters, [4] * 3, [1, 1, 1], alpha=ALPHA, global_rank=4,
            current=current,
        )  # fmt: skip
    with pytest.raises(LoraRuleError, match="needs the current global adapter"):
        aggregate("ffa", adapters, [4] * 3, [1, 1, 1], alpha=ALPHA, global_rank=4)


# -- hetlora ----------------------------------------------------------------------------


def _het_round() -> list[dict[str, torch.Tensor]]:
    m = "m.q_proj"
    return [
        {
            f"{m}.lora_A.weight": torch.tensor([[1.0, 2.0]]),
            f"{m}.lora_B.weight": torch.tensor([[1.0], [3.0]]),
        },
        {
            f"{m}.lora_A.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
            f"{m}.lora_B.weight": torch.tensor([[2.0, 0.0], [0.0, 4.0]]),
        },
    ]


def test_hetlora_hand_computed() -> None:
    """alpha 4, ranks {1, 2}, weights 1:3. Client 0 padded: A [[1,2],[0,0]],
    B [[1],[3]] * 2/1 -> [[2,0],[6,0]]. Means: A = .25 A0' + .75 I =
    [[1, .5], [0, .75]]; B = .25 [[2,0],[6,0]] + .75 [[2,0],[0,4]] =
    [[2, 0], [1.5, 3]]."""
    res = aggregate("hetlora", _het_round(), [1, 2], [1, 3], alpha=4.0, global_rank=2)
    assert torch.equal(
        res.adapter["m.q_proj.lora_A.weight"], torch.tensor([[1.0, 0.5], [0.0, 0.75]])
    )
    assert torch.equal(
        res.adapter["m.q_proj.lora_B.weight"], torch.tensor([[2.0, 0.0], [1.5, 3.0]])
    )
    assert res.residual == {}


def test_hetlora_sparsity_weighted_hand_computed() -> None:
    """Norms of dW: ||4 [[1,2],[3,6]]||_F = 20 sqrt(2), ||2 [[2,0],[0,4]]||_F =
    4 sqrt(5); weights become 1 * 20 sqrt 2 : 3 * 4 sqrt 5, renormalised."""
    n0, n1 = 20 * math.sqrt(2), 3 * 4 * math.sqrt(5)
    w0, w1 = n0 / (n0 + n1), n1 / (n0 + n1)
    want_a = torch.tensor([[w0 + w1, 2 * w0], [0.0, w1]])
    want_b = torch.tensor([[2 * w0 + 2 * w1, 0.0], [6 * w0, 4 * w1]])
    res = aggregate(
        "hetlora", _het_round(), [1, 2], [1, 3], alpha=4.0, global_rank=2,
        sparsity_weighted=True,
    )  # fmt: skip
    torch.testing.assert_close(res.adapter["m.q_proj.lora_A.weight"], want_a)
    torch.testing.assert_close(res.adapter["m.q_proj.lora_B.weight"], want_b)


# -- flexlora ---------------------------------------------------------------------------


def test_flexlora_hand_computed_and_truncation() -> None:
    """alpha 1, two rank-1 clients, equal weights: dW = .5 [[2,0],[0,0],[0,0]]
    + .5 [[0,0],[0,-1],[0,0]] = [[1,0],[0,-.5],[0,0]], so S = (1, .5) and,
    with c = 1/2, sqrt(S/c) = (sqrt 2, 1). Sign rule (largest U entry > 0):
    B = [[sqrt2,0],[0,1],[0,0]], A = [[sqrt2,0],[0,-1]]. Truncated to rank 1:
    A = [[sqrt2, 0]], B = [[sqrt2/2],[0],[0]], dW = [[1,0],[0,0],[0,0]]."""
    m = "m.v_proj"
    adapters = [
        {f"{m}.lora_A.weight": torch.tensor([[1.0, 0.0]]),
         f"{m}.lora_B.weight": torch.tensor([[2.0], [0.0], [0.0]])},
        {f"{m}.lora_A.weight": torch.tensor([[0.0, 1.0]]),
         f"{m}.lora_B.weight": torch.tensor([[0.0], [-1.0], [0.0]])},
    ]  # fmt: skip
    res = aggregate("flexlora", adapters, [1, 1], [1, 1], alpha=1.0, global_rank=2)
    r2 = math.sqrt(2)
    torch.testing.assert_close(
        res.adapter[f"{m}.lora_A.weight"], torch.tensor([[r2, 0.0], [0.0, -1.0]])
    )
    torch.testing.assert_close(
        res.adapter[f"{m}.lora_B.weight"],
        torch.tensor([[r2, 0.0], [0.0, 1.0], [0.0, 0.0]]),
    )
    one = client_adapter(res.adapter, 2, 1)
    torch.testing.assert_close(one[f"{m}.lora_A.weight"], torch.tensor([[r2, 0.0]]))
    torch.testing.assert_close(
        one[f"{m}.lora_B.weight"], torch.tensor([[r2 / 2], [0.0], [0.0]])
    )
    torch.testing.assert_close(
        effective_delta(one, 1, 1.0)[m], torch.tensor([[1.0, 0], [0, 0], [0, 0]])
    )


@pytest.mark.parametrize("global_rank", [8, 4])
def test_flexlora_truncations_are_best_rank_approximations(global_rank: int) -> None:
    """Ranks {2, 4, 8} (capped at the global rank) on (8x6)/(5x6) modules: the
    global adapter must be the best rank-r_max approximation of the weighted
    mean dW (exactly dW when r_max >= 6), and each client's truncation the
    best rank-r_i one, as torch.linalg.svd truncation says."""
    ranks = [min(r, global_rank) for r in (2, 4, 8)]
    weights = [1.0, 2.0, 3.0]
    adapters = _clients(ranks, seed=7)
    mean = _mean_delta(adapters, ranks, weights)
    res = aggregate(
        "flexlora", adapters, ranks, weights, alpha=ALPHA, global_rank=global_rank
    )
    got = effective_delta(res.adapter, global_rank, ALPHA)
    for p in SHAPES:
        best = _best_rank(mean[p], global_rank).float()
        assert torch.allclose(got[p], best, atol=1e-4, rtol=1e-4)
        # Sign rule: each nonzero B column has its largest-magnitude entry > 0.
        b = res.adapter[f"{p}.lora_B.weight"]
        for j in range(min(global_rank, *SHAPES[p])):
            assert b[b[:, j].abs().argmax(), j] > 0
    for r in ranks:
        mine = client_adapter(res.adapter, global_rank, r)
        delta = effective_delta(mine, r, ALPHA)
        for p in SHAPES:
            best = _best_rank(mean[p], r).float()
            assert torch.allclose(delta[p], best, atol=1e-4, rtol=1e-4)


# -- distribution, determinism, order ---------------------------------------------------


@pytest.mark.parametrize("rule", ["hetlora", "flexlora"])
def test_each_client_receives_its_own_rank(rule: str) -> None:
    """Mixed ranks {2, 4, 8}: the global adapter is rank 8 and each client's
    distribution has A (r_i, in) and B (out, r_i) under the same names."""
    ranks = [2, 4, 8]
    res = aggregate(rule, _clients(ranks), ranks, [1, 1, 1], alpha=ALPHA, global_rank=8)
    assert res.adapter[f"{Q}.lora_A.weight"].shape == (8, 6)
    for r in ranks:
        mine = client_adapter(res.adapter, 8, r)
        assert list(mine) == list(res.adapter)
        for p, (o, i) in SHAPES.items():
            assert mine[f"{p}.lora_A.weight"].shape == (r, i)
            assert mine[f"{p}.lora_B.weight"].shape == (o, r)


@pytest.mark.parametrize("rule", RULES)
def test_rules_are_deterministic_and_keep_names(rule: str) -> None:
    """The same inputs twice must give bit-identical outputs in client 0's
    name order (here B before A), and leave the inputs untouched."""
    homogeneous = rule in ("fedavg", "exact", "ffa")
    ranks = [4, 4, 4] if homogeneous else [2, 4, 8]
    r_max = max(ranks)
    if rule == "ffa":
        current, adapters = _ffa_round()
    else:
        current, adapters = None, _clients(ranks, seed=8)
    adapters = [dict(reversed(list(ad.items()))) for ad in adapters]
    before = [{k: v.clone() for k, v in ad.items()} for ad in adapters]
    runs = [
        aggregate(
            rule,
            adapters,
            ranks,
            [2, 1, 5],
            alpha=ALPHA,
            global_rank=r_max,
            current=current,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert list(runs[0].adapter) == list(adapters[0])
    for name in runs[0].adapter:
        assert torch.equal(runs[0].adapter[name], runs[1].adapter[name])
    for p in runs[0].residual:
        assert torch.equal(runs[0].residual[p], runs[1].residual[p])
    for ad, old in zip(adapters, before, strict=True):
        assert all(torch.equal(ad[k], old[k]) for k in ad)


# -- refusals ---------------------------------------------------------------------------


def test_pair_factors_refusals_name_the_tensor() -> None:
    """Missing partner, wrong ndim, rank/shape mismatch, NaN and stray names
    must each raise LoraRuleError naming the offending tensor."""
    ad = _clients([4])[0]
    a_name, b_name = f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"
    cases = {
        "missing": ({k: v for k, v in ad.items() if k != b_name}, b_name),
        "ndim": ({**ad, a_name: ad[a_name][None]}, a_name),
        "rank": ({**ad, b_name: ad[b_name][:, :2]}, b_name),
        "nan": ({**ad, b_name: ad[b_name].clone().fill_(math.nan)}, b_name),
        "stray": ({**ad, f"{Q}.bias": torch.zeros(8)}, f"{Q}.bias"),
    }
    for why, (bad, name) in cases.items():
        with pytest.raises(LoraRuleError, match=name.replace(".", r"\.")) as info:
            pair_factors(bad, 4, who="client 3")
        assert "client 3" in str(info.value), why
        assert "\n" not in str(info.value), why


def test_aggregate_refusals() -> None:
    """A rank that does not match the tensors, mixed ranks under the
    equal-rank rules (pointing to hetlora/flexlora), a rank above the global
    rank, mismatched module shapes, bad weights and unknown rules are refused."""
    adapters = _clients([4, 2])
    for rule in ("fedavg", "exact", "ffa"):
        with pytest.raises(LoraRuleError, match="hetlora' or 'flexlora"):
            aggregate(
                rule, adapters, [4, 2], [1, 1], alpha=ALPHA, global_rank=4,
                current=adapters[0],
            )  # fmt: skip
    with pytest.raises(LoraRuleError, match=r"client 1 .*lora_A\.weight"):
        aggregate("hetlora", adapters, [4, 4], [1, 1], alpha=ALPHA, global_rank=4)
    with pytest.raises(LoraRuleError, match="client 0 rank 4 > global_rank 2"):
        aggregate("flexlora", adapters, [4, 2], [1, 1], alpha=ALPHA, global_rank=2)
    other = dict(adapters[1])
    other[f"{V}.lora_B.weight"] = torch.zeros(7, 2)
    with pytest.raises(LoraRuleError, match=f"client 1 tensor '{V}"):
        aggregate(
            "hetlora", [adapters[0], other], [4, 2], [1, 1], alpha=ALPHA, global_rank=4
        )
    for weights in ([1.0], [0.0, 0.0], [1.0, -1.0], [math.nan, 1.0]):
        with pytest.raises(LoraRuleError, match="weights"):
            aggregate("hetlora", adapters, [4, 2], weights, alpha=ALPHA, global_rank=4)
    with pytest.raises(LoraRuleError, match="unknown LoRA rule"):
        aggregate("flora", adapters, [4, 2], [1, 1], alpha=ALPHA, global_rank=4)
    with pytest.raises(LoraRuleError, match="above r_max"):
        pad_to(torch.zeros(4, 6), torch.zeros(8, 4), 4, 2)


def test_float64_inputs_stay_float64() -> None:
    """float64 adapters must be aggregated (and SVD'd) in float64: FlexLoRA's
    product then matches the float64 reference to 1e-10."""
    g = torch.Generator().manual_seed(9)
    ranks = [2, 4]
    adapters = [_adapter(g, r, torch.float64) for r in ranks]
    res = aggregate("flexlora", adapters, ranks, [1, 1], alpha=ALPHA, global_rank=8)
    assert res.adapter[f"{Q}.lora_B.weight"].dtype == torch.float64
    got = effective_delta(res.adapter, 8, ALPHA)
    want = _mean_delta(adapters, ranks, [1, 1])
    for p in SHAPES:
        assert torch.allclose(got[p], want[p], atol=1e-10, rtol=1e-10)
