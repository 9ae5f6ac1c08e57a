"""LoraFedAvg with the LoRA family's rules and per-node ranks (issue 12).

Strategy level, with real encoded messages and tiny adapter shapes: each
node gets an adapter of its own rank (and the FedEx-LoRA residual), replies
are decoded at the node's rank, bounded in padded canonical space, then
combined by ``exact``, ``ffa``, ``hetlora`` or ``flexlora``; plain ``fedavg``
stays bit-identical to :class:`strategies.fedavg.TensorFedAvg`'s round.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict

from protocols import (
    MESSAGE_TRAIN_LORA,
    LoraSpec,
    LoraTrainIns,
    LoraTrainRes,
    ProtocolError,
    TensorLayout,
    decode_lora_train_ins,
    decode_lora_train_res,
    encode_lora_train_ins,
    encode_lora_train_res,
)
from protocols.errors import PayloadTooLargeError
from protocols.messages import (
    MESSAGE_SECURE_MEAN,
    SECURE_MEAN_LABEL,
    LocalTrainConfig,
    SecureMean,
    encode_secure_mean,
)
from server.config import ConfigError, load_config
from strategies import LocalTrainSettings, LoraFedAvg
from strategies.fedavg import TensorFedAvg
from strategies.lora_factors import client_adapter, effective_delta, pad_to
from strategies.lora_family import layout_at
from strategies.lora_rules import aggregate
from strategies.privacy import DPSettings
from strategies.robust import Bounds, update_norm

PREFIXES = (
    "base_model.model.model.layers.0.self_attn.q_proj",
    "base_model.model.model.layers.0.self_attn.v_proj",
)
SHAPES = {PREFIXES[0]: (6, 5), PREFIXES[1]: (3, 5)}  # (out, in)
ALPHA = 16.0
NODES = {11: "p0000", 22: "p0001", 33: "p0002", 44: "p0003"}
COUNTS = {"p0000": 10, "p0001": 30, "p0002": 5, "p0003": 20}


def _names(prefix: str) -> tuple[str, str]:
    return prefix + ".lora_A.weight", prefix + ".lora_B.weight"


def _adapter(rank: int, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in PREFIXES:
        o, i = SHAPES[p]
        a, b = _names(p)
        out[a] = torch.randn((rank, i), generator=g) * scale
        out[b] = torch.randn((o, rank), generator=g) * scale
    return out


def _spec(rank: int = 8, ranks: tuple[int, ...] = (), rule: str = "fedavg") -> LoraSpec:
    return LoraSpec(
        model="tiny-llama", rank=rank, alpha=ALPHA, client_ranks=ranks, aggregation=rule
    )


def _strategy(spec: LoraSpec, ranks: dict[str, int], **kw: object) -> LoraFedAvg:
    s = LoraFedAvg(
        spec=spec,
        layout=TensorLayout.of(_adapter(spec.rank, 0)),
        train=LocalTrainSettings(local_steps=1, batch_size=2, learning_rate=1e-3),
        **kw,  # type: ignore[arg-type]
    )
    s.hello_ranks.update(ranks)
    return s


def _reply(label: str, adapter: dict[str, torch.Tensor]) -> tuple[str, Message]:
    node = next(n for n, lab in NODES.items() if lab == label)
    ins = Message(RecordDict(), dst_node_id=node, message_type=MESSAGE_TRAIN_LORA)
    res = LoraTrainRes(adapter=adapter, num_examples=COUNTS[label], train_loss=1.0)
    return label, Message(encode_lora_train_res(res), reply_to=ins)


def _trained(
    current: dict[str, torch.Tensor], r_max: int, rank: int, seed: int, size: float
) -> dict[str, torch.Tensor]:
    """A client's reply: its start adapter plus a random update of ``size``."""
    start = client_adapter(current, r_max, rank)
    step = _adapter(rank, seed, size)
    return {k: start[k] + step[k] for k in start}


# --- configure and the instruction's residual --------------------------------------


def test_configure_sends_each_node_its_rank_and_the_residual(flower_identity) -> None:
    """Each node's instruction holds the truncation of the global adapter at its
    rank (shapes and values) and names that rank; the residual goes to every
    node when given and is absent from the wire otherwise."""
    spec = _spec(8, (2, 4, 8), "hetlora")
    ranks = {"p0000": 2, "p0001": 4, "p0002": 8}
    current = _adapter(8, 1)
    s = _strategy(spec, ranks)
    nodes = {n: NODES[n] for n in (11, 22, 33)}
    messages = s.configure(1, nodes, current)
    assert [m.metadata.dst_node_id for m in messages] == [11, 22, 33]
    for m in messages:
        label = NODES[m.metadata.dst_node_id]
        ins = decode_lora_train_ins(m.content)
        r = ranks[label]
        assert ins.client_rank == r and ins.residual == {}
        assert "lora-residual" not in m.content
        want = client_adapter(current, 8, r)
        for name, t in ins.adapter.items():
            assert t.shape[0 if ".lora_A." in name else 1] == r, name
            assert torch.equal(t, want[name]), name
    # The global rank: the global adapter itself, bit for bit.
    top = decode_lora_train_ins(messages[2].content).adapter
    assert all(torch.equal(top[k], current[k]) for k in current)

    exact = _strategy(_spec(4, (), "exact"), {})
    residual = {p: torch.randn(SHAPES[p]) for p in PREFIXES}
    got = decode_lora_train_ins(
        exact.configure(1, nodes, _adapter(4, 2), residual)[0].content
    )
    assert list(got.residual) == list(PREFIXES)
    assert all(torch.equal(got.residual[p], residual[p]) for p in PREFIXES)


def _ins(spec: LoraSpec, residual: dict[str, torch.Tensor]) -> LoraTrainIns:
    config = LocalTrainConfig(
        server_round=1,
        local_steps=1,
        batch_size=1,
        learning_rate=0.1,
        weight_decay=0.0,
        seed=0,
    )
    return LoraTrainIns(spec, config, _adapter(spec.rank, 3), residual=residual)


@pytest.mark.parametrize(
    ("rule", "residual", "named"),
    [
        ("hetlora", {PREFIXES[0]: torch.zeros(6, 5)}, "only sent under"),
        ("exact", {"layers.9.q_proj": torch.zeros(6, 5)}, "'layers.9.q_proj'"),
        ("exact", {PREFIXES[1]: torch.zeros(5, 3)}, "not torch.float32 [3, 5]"),
        ("exact", {PREFIXES[0]: torch.zeros(6, 5, dtype=torch.float64)}, "float64"),
        ("exact", {PREFIXES[0]: torch.full((6, 5), math.inf)}, "NaN or Inf"),
    ],
)
def test_bad_residual_is_refused_naming_the_tensor(rule, residual, named) -> None:
    """A residual outside 'exact', of an unknown module, of the wrong shape or
    dtype, or not finite, is refused with one line naming it."""
    spec = _spec(4, (4,) if rule == "hetlora" else (), rule)
    with pytest.raises(ProtocolError) as err:
        _ins(spec, residual)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_residual_on_the_wire_is_validated_and_size_bounded() -> None:
    """Decoding checks what construction checks, and the residual's size."""
    spec = _spec(1, (), "exact")  # rank 1: the adapter is 76 bytes, the residual 180
    residual = {p: torch.ones(SHAPES[p]) for p in PREFIXES}
    content = encode_lora_train_ins(_ins(spec, residual))
    got = decode_lora_train_ins(content, max_bytes=180).residual
    assert all(torch.equal(got[p], residual[p]) for p in PREFIXES)
    with pytest.raises(PayloadTooLargeError, match="limit of 179 bytes"):
        decode_lora_train_ins(content, max_bytes=179)
    good = _ins(_spec(4, (), "exact"), {PREFIXES[0]: torch.ones(6, 5)})
    bad = encode_lora_train_ins(_ins(_spec(4, (), "exact"), {}))
    bad["lora-residual"] = encode_lora_train_ins(good)["lora-residual"]
    bad["spec"] = _spec(4, (4,), "hetlora").to_config_record()
    with pytest.raises(ProtocolError, match="only sent under"):
        decode_lora_train_ins(bad)


# --- the rules ----------------------------------------------------------------------


def test_exact_global_update_is_the_weighted_mean_of_products(flower_identity) -> None:
    """FedEx-LoRA: base + previous residual + this round's residual + (alpha/r)
    B A equals base + previous residual + the example-weighted mean of the
    clients' (alpha/r) B_i A_i, for random adapters."""
    spec = _spec(4, (), "exact")
    current = _adapter(4, 1)
    labels = ["p0000", "p0001", "p0002"]
    replies = [_adapter(4, 10 + i) for i in range(3)]
    s = _strategy(spec, {}, bounds=Bounds(clip="off"))
    r = s.aggregate(
        1, [_reply(lab, a) for lab, a in zip(labels, replies, strict=True)], current
    )
    assert r.adapter is not None and r.residual is not None
    assert r.accepted == labels and r.stats["aggregation"] == "exact"
    base = {p: torch.randn(SHAPES[p], dtype=torch.float64) for p in PREFIXES}
    prev = {p: torch.randn(SHAPES[p], dtype=torch.float64) for p in PREFIXES}
    total = sum(COUNTS[lab] for lab in labels)
    mean = {
        p: sum(
            effective_delta(a, 4, ALPHA)[p].double() * COUNTS[lab] / total
            for lab, a in zip(labels, replies, strict=True)
        )
        for p in PREFIXES
    }
    new = effective_delta(r.adapter, 4, ALPHA)
    for p in PREFIXES:
        assert r.residual[p].dtype == torch.float32 and r.residual[p].shape == SHAPES[p]
        got = base[p] + prev[p] + r.residual[p].double() + new[p].double()
        want = base[p] + prev[p] + mean[p]
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), p
        assert r.residual[p].abs().max() > 1e-3  # not trivially exact


def test_ffa_keeps_a_and_drops_a_reply_that_changed_it(flower_identity) -> None:
    """FFA-LoRA: A is bit-identical to the global A; B is the weighted mean;
    a reply whose A moved is dropped with a reason, the others used."""
    spec = _spec(4, (), "ffa")
    current = _adapter(4, 1)
    bs = [_adapter(4, 20 + i) for i in range(3)]
    replies = [
        {k: current[k].clone() if ".lora_A." in k else b[k] for k in current}
        for b in bs
    ]
    replies[2][_names(PREFIXES[1])[0]] += 1e-3  # p0002 trained its A
    labels = ["p0000", "p0001", "p0002"]
    s = _strategy(spec, {}, bounds=Bounds(clip="off"))
    r = s.aggregate(
        1, [_reply(lab, a) for lab, a in zip(labels, replies, strict=True)], current
    )
    assert r.adapter is not None and r.residual is None
    assert r.accepted == ["p0000", "p0001"]
    assert "frozen A" in r.rejected["p0002"] and PREFIXES[1] in r.rejected["p0002"]
    total = COUNTS["p0000"] + COUNTS["p0001"]
    for k in current:
        if ".lora_A." in k:
            assert torch.equal(r.adapter[k], current[k]), k
        else:
            want = (
                replies[0][k] * COUNTS["p0000"] + replies[1][k] * COUNTS["p0001"]
            ) / total
            assert torch.allclose(r.adapter[k], want, atol=1e-5), k


def test_ffa_with_central_dp_noises_b_only(flower_identity) -> None:
    """Central DP under FFA: the noise goes on B; A stays the global A."""
    spec = _spec(4, (), "ffa")
    current = _adapter(4, 1)
    replies = [
        {
            k: current[k].clone() if ".lora_A." in k else current[k] + 0.01
            for k in current
        }
        for _ in range(2)
    ]
    dp = DPSettings("central", 1.0, 1.0, 1e-3, None, 4)
    s = _strategy(spec, {}, dp=dp, noise_seed=5)
    r = s.aggregate(
        1,
        [_reply(lab, a) for lab, a in zip(["p0000", "p0001"], replies, strict=True)],
        current,
    )
    assert r.adapter is not None and r.stats["noise_std"] > 0
    for k in current:
        same = torch.equal(r.adapter[k], current[k])
        assert same if ".lora_A." in k else not same, k


def test_ffa_under_secagg_keeps_a_and_noises_b_only(flower_identity) -> None:
    """SecAgg+ under FFA: the mean's A part (non-zero here, as from a client
    that trained A) is ignored and, with central DP, no noise lands on A;
    B moves by the mean plus noise."""
    spec = _spec(4, (), "ffa")
    current = _adapter(4, 1)
    n = sum(t.numel() for t in current.values())
    secure = SecureMean(
        mean=np.full(n, 0.01),
        total_weight=2.0,
        weight_step=1e-6,
        survivors=("p0000", "p0001"),
        weights=(1, 1),
        metrics={},
    )
    reply = Message(
        encode_secure_mean(secure),
        reply_to=Message(RecordDict(), dst_node_id=0, message_type=MESSAGE_SECURE_MEAN),
    )
    dp = DPSettings("central", 1.0, 1.0, 1e-3, None, 4, clipping="client")
    for kw in ({}, {"dp": dp, "noise_seed": 3}):
        r = _strategy(spec, {}, **kw).aggregate(
            1, [(SECURE_MEAN_LABEL, reply)], current
        )
        assert r.adapter is not None, r.rejected
        for k in current:
            if ".lora_A." in k:
                assert torch.equal(r.adapter[k], current[k]), k
            elif not kw:
                assert torch.allclose(r.adapter[k], current[k] + 0.01), k
            else:
                assert not torch.allclose(r.adapter[k], current[k] + 0.01), k


RANKS = {"p0000": 2, "p0001": 4, "p0002": 8}


@pytest.mark.parametrize("rule", ["hetlora", "flexlora"])
def test_mixed_ranks_equal_the_kernel_on_the_clipped_inputs(
    rule, flower_identity
) -> None:
    """Ranks {2, 4, 8}: the strategy's adapter equals lora_rules.aggregate of
    the clipped client adapters (start + f (trained - start), f from the padded
    canonical update's norm and the fixed bound) with the example weights;
    at least one client is clipped, and the stats name the rule and ranks."""
    spec = _spec(8, (2, 4, 8), rule)
    current = _adapter(8, 1)
    labels = list(RANKS)
    sizes = [0.1, 0.5, 2.0]
    replies = [
        _trained(current, 8, RANKS[lab], 30 + i, sizes[i])
        for i, lab in enumerate(labels)
    ]
    bound = 3.0
    s = _strategy(spec, RANKS, bounds=Bounds(clip="fixed", fixed_bound=bound))
    r = s.aggregate(
        1, [_reply(lab, a) for lab, a in zip(labels, replies, strict=True)], current
    )
    assert r.adapter is not None and r.accepted == labels
    clipped = []
    for lab, reply in zip(labels, replies, strict=True):
        rank = RANKS[lab]
        start = client_adapter(current, 8, rank)
        delta = {k: reply[k] - start[k] for k in reply}
        padded = {}
        for p in PREFIXES:
            a, b = _names(p)
            padded[a], padded[b] = pad_to(delta[a], delta[b], rank, 8)
        f = min(1.0, bound / update_norm(padded))
        clipped.append({k: start[k] + f * delta[k] for k in reply})
    assert r.stats["clipped"] >= 1 and r.stats["clip_bound"] == bound
    want = aggregate(
        rule,
        clipped,
        [RANKS[lab] for lab in labels],
        [COUNTS[lab] for lab in labels],
        alpha=ALPHA,
        global_rank=8,
    ).adapter
    for k in want:
        assert r.adapter[k].shape == want[k].shape
        assert torch.allclose(r.adapter[k], want[k], atol=1e-5, rtol=1e-5), k
    assert r.stats["aggregation"] == rule and r.stats["ranks"] == RANKS


def test_hostile_update_is_clipped_before_the_rank_aware_step(flower_identity) -> None:
    """A rank-2 client with a 1e4-times update: unclipped it drags HetLoRA's
    global adapter by thousands; with the adaptive bound its influence is
    within a few honest update sizes, and it is counted as clipped."""
    spec = _spec(8, (2, 4, 8), "hetlora")
    ranks = {**RANKS, "p0003": 2}
    current = _adapter(8, 1)
    labels = list(ranks)
    replies = [
        _trained(current, 8, ranks[lab], 40 + i, 1e4 if lab == "p0003" else 0.1)
        for i, lab in enumerate(labels)
    ]

    def moved(bounds: Bounds, n: int) -> tuple[float, dict]:
        s = _strategy(spec, ranks, bounds=bounds)
        msgs = [_reply(lab, a) for lab, a in zip(labels[:n], replies[:n], strict=True)]
        r = s.aggregate(1, msgs, current)
        assert r.adapter is not None
        return update_norm({k: r.adapter[k] - current[k] for k in current}), r.stats

    honest, _ = moved(Bounds(), 3)
    unbounded, _ = moved(Bounds(clip="off"), 4)
    bounded, stats = moved(Bounds(), 4)
    assert unbounded > 1000 * honest
    assert bounded < 3 * honest + 1.0 and stats["clipped"] == 1


def test_reply_of_the_wrong_rank_for_its_node_is_dropped(flower_identity) -> None:
    """p0000 trains rank 2 but sends a rank-4 adapter: dropped with a one-line
    reason naming the tensor; the others are aggregated."""
    spec = _spec(8, (2, 4, 8), "hetlora")
    current = _adapter(8, 1)
    replies = {
        "p0000": _trained(current, 8, 4, 50, 0.1),
        "p0001": _trained(current, 8, 4, 51, 0.1),
        "p0002": _trained(current, 8, 8, 52, 0.1),
    }
    r = _strategy(spec, RANKS).aggregate(
        1, [_reply(lab, a) for lab, a in replies.items()], current
    )
    assert r.accepted == ["p0001", "p0002"]
    reason = r.rejected["p0000"]
    assert "lora_A.weight" in reason and "shape" in reason and "\n" not in reason


def test_non_finite_result_refuses_the_round_whole(flower_identity) -> None:
    """Exact products that overflow float32: nothing is applied, every client
    is listed as rejected, no residual is returned."""
    spec = _spec(4, (), "exact")
    current = _adapter(4, 1)
    replies = [_adapter(4, 60 + i, 1e20) for i in range(2)]
    r = _strategy(spec, {}, bounds=Bounds(clip="off")).aggregate(
        1,
        [_reply(lab, a) for lab, a in zip(["p0000", "p0001"], replies, strict=True)],
        current,
    )
    assert r.adapter is None and r.residual is None and r.accepted == []
    assert set(r.rejected) == {"p0000", "p0001"}
    assert all("not finite" in why for why in r.rejected.values())


def test_same_rank_fedavg_is_bit_identical_to_tensor_fedavg(flower_identity) -> None:
    """Plain fedavg with every node at the global rank (hello_ranks filled)
    gives exactly TensorFedAvg's round: same adapter bits, same stats, no
    aggregation or ranks columns."""
    spec = _spec(4)
    current = _adapter(4, 1)
    labels = ["p0000", "p0001", "p0002", "p0003"]
    replies = [_trained(current, 4, 4, 70 + i, 0.1 * (i + 1)) for i in range(4)]
    replies[3] = {k: t * 50 for k, t in replies[3].items()}  # clipped
    msgs = [_reply(lab, a) for lab, a in zip(labels, replies, strict=True)]
    layout = TensorLayout.of(current)
    expected = TensorFedAvg(layout).round(
        1,
        msgs,
        decode_lora_train_res,
        lambda res: res.adapter,
        current=current,
        reported={},
    )
    s = _strategy(spec, dict.fromkeys(labels, 4))
    r = s.aggregate(1, msgs, current)
    assert expected.mean is not None and r.adapter is not None
    assert all(torch.equal(r.adapter[k], expected.mean[k]) for k in current)
    assert r.stats == expected.stats and r.stats["clipped"] == 1
    assert r.residual is None


def test_layout_at_changes_only_the_rank_axis() -> None:
    layout = TensorLayout.of(_adapter(8, 0))
    assert layout_at(layout, 2) == TensorLayout.of(_adapter(2, 0))


# --- config composition -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            {"lora.aggregation": "exact", "federation.aggregator": "median"},
            "needs federation.aggregator 'mean', not 'median'",
        ),
        (
            {"lora.aggregation": "flexlora", "privacy.mode": "central"},
            "central DP releases only a noisy sum",
        ),
        (
            {"lora.aggregation": "exact", "privacy.mode": "central"},
            "central DP releases only a noisy sum",
        ),
        ({"lora.aggregation": "hetlora", "privacy.secagg": True}, "privacy.secagg"),
        ({"lora.aggregation": "exact", "privacy.secagg": True}, "privacy.secagg"),
        (
            {"lora.aggregation": "flexlora", "server_opt.name": "fedadam"},
            "re-factorised",
        ),
        ({"lora.aggregation": "exact", "server_opt.name": "fedavgm"}, "re-factorised"),
    ],
)
def test_rules_that_do_not_compose_are_refused(overrides, named) -> None:
    """Each refusal is one line naming the rule and why."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert named in str(err.value) and "lora.aggregation" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"lora.aggregation": "hetlora", "privacy.mode": "central"},
        {"lora.aggregation": "ffa", "privacy.mode": "central"},
        {"lora.aggregation": "ffa", "privacy.secagg": True},
        {"lora.aggregation": "exact", "privacy.mode": "local"},
        {"lora.aggregation": "flexlora", "privacy.mode": "local"},
        {"lora.aggregation": "hetlora", "federation.aggregator": "median"},
        {"lora.aggregation": "hetlora", "server_opt.name": "fedadam"},
        {"lora.aggregation": "ffa", "server_opt.name": "fedyogi"},
    ],
)
def test_rules_that_compose_are_accepted(overrides) -> None:
    assert (
        load_config(None, overrides).lora.aggregation == overrides["lora.aggregation"]
    )


def test_sparsity_weighted_hetlora_is_the_kernels_weighting(flower_identity) -> None:
    """lora.sparsity_weighted reaches the rule: the strategy's adapter equals the
    kernel's sparsity-weighted result and differs from the plain padding mean."""
    spec = _spec(8, (2, 4, 8), "hetlora")
    current = _adapter(8, 1)
    labels = list(RANKS)
    replies = [
        _trained(current, 8, RANKS[lab], 40 + i, 0.1 * (1 + 3 * i))
        for i, lab in enumerate(labels)
    ]
    msgs = [_reply(lab, a) for lab, a in zip(labels, replies, strict=True)]
    plain = _strategy(spec, RANKS, bounds=Bounds(clip="off"))
    weighted = _strategy(spec, RANKS, bounds=Bounds(clip="off"), sparsity_weighted=True)
    got = weighted.aggregate(1, msgs, current)
    base = plain.aggregate(1, msgs, current)
    assert got.adapter is not None and base.adapter is not None
    want = aggregate(
        "hetlora",
        replies,
        [RANKS[lab] for lab in labels],
        [COUNTS[lab] for lab in labels],
        alpha=ALPHA,
        global_rank=8,
        sparsity_weighted=True,
    ).adapter
    for k in want:
        assert torch.allclose(got.adapter[k], want[k], atol=1e-6, rtol=1e-5), k
    assert any(
        not torch.allclose(got.adapter[k], base.adapter[k], atol=1e-4) for k in want
    )
    assert "sparsity-weighted" in weighted.summary()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"lora.sparsity_weighted": True}, "needs lora.aggregation 'hetlora'"),
        (
            {
                "lora.aggregation": "hetlora",
                "lora.sparsity_weighted": True,
                "federation.aggregator": "median",
            },
            "lora.sparsity_weighted needs federation.aggregator 'mean'",
        ),
        (
            {
                "lora.aggregation": "hetlora",
                "lora.sparsity_weighted": True,
                "privacy.mode": "central",
            },
            "sensitivity",
        ),
    ],
)
def test_sparsity_weighting_refusals(overrides, named) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert named in str(err.value) and "\n" not in str(err.value)
