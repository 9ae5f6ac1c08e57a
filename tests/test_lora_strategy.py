"""Tests for strategies.lora.LoraFedAvg with the tiny 2-layer Llama.

The strategy is the server's trust boundary: it must average exactly the
good replies (example-weighted, in a fixed order so results are bitwise
reproducible), drop every bad reply with a reason naming the problem, never
crash on a malformed reply, never mutate the caller's tensors, and build
instructions that clients decode to the same spec and adapter.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from flwr.app import Array, Error, Message, RecordDict

import models
from protocols import (
    MESSAGE_TRAIN_LORA,
    LoraSpec,
    LoraTrainRes,
    TensorLayout,
    decode_lora_train_ins,
    encode_lora_train_res,
)
from protocols.codecs import MANIFEST_KEY, MANIFEST_STYPE
from strategies import LocalTrainSettings, LoraFedAvg, NodeBook

SPEC = LoraSpec(model="tiny-llama", rank=4, alpha=8.0)
LABELS = {11: "p0000", 22: "p0001", 33: "p0002", 44: "p0003", 55: "p0004"}


@pytest.fixture(scope="module")
def tiny() -> tuple[dict[str, torch.Tensor], TensorLayout]:
    """The tiny model's initial adapter and its wire layout."""
    loaded = models.load_causal_lm("tiny-llama")
    peft_model = models.attach_lora(loaded.model, SPEC)
    return models.adapter_tensors(peft_model), models.adapter_layout(peft_model)


def _strategy(layout: TensorLayout, **kwargs: object) -> LoraFedAvg:
    strategy = LoraFedAvg(
        spec=SPEC,
        layout=layout,
        train=LocalTrainSettings(local_steps=3, batch_size=4, learning_rate=1e-3),
        seed=7,
        **kwargs,  # type: ignore[arg-type]
    )
    return strategy


def _lab(replies: list[Message]) -> list[tuple[str, Message]]:
    """Label replies as the round loop does (unknown nodes by their id)."""
    book = NodeBook(LABELS)
    return [(book.label(r.metadata.src_node_id), r) for r in replies]


def _random_adapter(layout: TensorLayout, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {e.name: torch.randn(e.shape, generator=g) for e in layout.entries}


def _ins(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=MESSAGE_TRAIN_LORA)


def _reply(node: int, adapter: dict[str, torch.Tensor], n: int, loss: float) -> Message:
    content = encode_lora_train_res(
        LoraTrainRes(adapter=adapter, num_examples=n, train_loss=loss)
    )
    return Message(content, reply_to=_ins(node))


def _hand_mean(adapters: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        name: sum(a[name].double() * w for a, w in zip(adapters, weights, strict=True))
        / total
        for name in adapters[0]
    }


def _good(
    layout: TensorLayout,
) -> tuple[list[Message], list[dict], list[int], list[float]]:
    adapters = [_random_adapter(layout, s) for s in (1, 2, 3)]
    counts = [10, 30, 5]
    losses = [2.0, 1.0, 4.0]
    replies = [
        _reply(node, a, n, loss)
        for node, a, n, loss in zip((11, 22, 33), adapters, counts, losses, strict=True)
    ]
    return replies, adapters, counts, losses


def test_aggregate_is_example_weighted_mean(tiny, flower_identity) -> None:
    """Three good replies with 10/30/5 examples must average to the
    example-weighted mean (computed by hand in float64) and report the
    example-weighted train loss (2*10 + 1*30 + 4*5) / 45."""
    _, layout = tiny
    replies, adapters, counts, _ = _good(layout)
    result = _strategy(layout).aggregate(1, _lab(replies))
    ref = _hand_mean(adapters, counts)
    assert result.adapter is not None
    assert list(result.adapter) == list(layout.names)
    for name, want in ref.items():
        got = result.adapter[name]
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got.double(), want, atol=1e-6, rtol=0), name
    assert result.train_loss == pytest.approx((2 * 10 + 1 * 30 + 4 * 5) / 45)
    assert result.num_examples == 45
    assert result.accepted == ["p0000", "p0001", "p0002"]
    assert result.rejected == {}


def test_aggregate_order_independent_bitwise(tiny, flower_identity) -> None:
    """Replies arrive in any order; the result must be bit-identical whatever the
    order, so reruns with the same seed reproduce the same adapter."""
    _, layout = tiny
    replies, _, _, _ = _good(layout)
    strategy = _strategy(layout)
    base = strategy.aggregate(1, _lab(replies))
    rng = random.Random(0)
    for _ in range(4):
        shuffled = list(replies)
        rng.shuffle(shuffled)
        other = strategy.aggregate(1, _lab(shuffled))
        assert other.accepted == base.accepted
        assert other.train_loss == base.train_loss
        for name in base.adapter:
            assert torch.equal(other.adapter[name], base.adapter[name])


def test_bad_replies_rejected_with_reasons(tiny, flower_identity) -> None:
    """A wrong-shape tensor, a NaN tensor and a client error reply must each be
    dropped with a reason naming the tensor / 'NaN' / the client's reason, and
    the result must equal the mean of the good replies only."""
    _, layout = tiny
    replies, adapters, counts, _ = _good(layout)
    first = layout.entries[0].name
    wrong_shape = _random_adapter(layout, 9)
    wrong_shape[first] = torch.zeros(
        wrong_shape[first].shape[0] + 1, wrong_shape[first].shape[1]
    )
    with_nan = _random_adapter(layout, 10)
    second = layout.entries[1].name
    with_nan[second][0, 0] = float("nan")
    bad = [
        _reply(44, wrong_shape, 1000, 0.1),
        _reply(55, with_nan, 1000, 0.1),
        Message(Error(code=1, reason="boom"), reply_to=_ins(66)),
    ]
    mixed = [replies[0], bad[0], replies[1], bad[1], bad[2], replies[2]]
    result = _strategy(layout).aggregate(2, _lab(mixed))
    assert set(result.rejected) == {"p0003", "p0004", "node-66"}
    assert first in result.rejected["p0003"]
    assert "NaN" in result.rejected["p0004"] and second in result.rejected["p0004"]
    assert "boom" in result.rejected["node-66"]
    assert result.accepted == ["p0000", "p0001", "p0002"]
    assert result.num_examples == 45
    ref = _hand_mean(adapters, counts)
    for name, want in ref.items():
        assert torch.allclose(result.adapter[name].double(), want, atol=1e-6, rtol=0), (
            name
        )


def test_all_bad_gives_no_adapter(tiny, flower_identity) -> None:
    """When no reply is usable the adapter must be None (the caller keeps the
    old one) and every reply must be listed as rejected."""
    _, layout = tiny
    nan_adapter = _random_adapter(layout, 4)
    nan_adapter[layout.entries[0].name].fill_(float("nan"))
    replies = [
        Message(Error(code=3, reason="out of memory"), reply_to=_ins(11)),
        _reply(22, nan_adapter, 5, 1.0),
    ]
    result = _strategy(layout).aggregate(3, _lab(replies))
    assert result.adapter is None
    assert result.accepted == []
    assert set(result.rejected) == {"p0000", "p0001"}
    assert _strategy(layout).aggregate(3, []).adapter is None


def test_zero_examples_and_oversized_rejected(tiny, flower_identity) -> None:
    """A reply claiming 0 examples, or over the payload limit, is dropped."""
    _, layout = tiny
    replies, adapters, _, _ = _good(layout)
    zero = _reply(44, adapters[0], 0, 1.0)
    result = _strategy(layout).aggregate(1, _lab([*replies, zero]))
    assert "num-examples" in result.rejected["p0003"]
    small = _strategy(layout, max_payload_bytes=64).aggregate(1, _lab(replies))
    assert small.adapter is None and len(small.rejected) == 3


def test_malformed_manifest_reply_rejected_not_crash(tiny, flower_identity) -> None:
    """A reply whose manifest lists 'tensors' as a number must be dropped like any
    other malformed reply; raising out of aggregate() would let one client
    abort the whole round for everyone."""
    _, layout = tiny
    replies, adapters, counts, _ = _good(layout)
    evil = _reply(44, adapters[0], 10, 1.0)
    blob = json.dumps({"version": 1, "tensors": 5}).encode()
    evil.content["adapter"][MANIFEST_KEY] = Array(
        dtype="uint8", shape=(len(blob),), stype=MANIFEST_STYPE, data=blob
    )
    result = _strategy(layout).aggregate(1, _lab([*replies, evil]))
    assert "p0003" in result.rejected
    assert result.accepted == ["p0000", "p0001", "p0002"]


def test_strategy_never_mutates_inputs(tiny, flower_identity) -> None:
    """configure() and aggregate() must leave the caller's global adapter and the
    decoded reply tensors untouched, and the result must not alias them."""
    _, layout = tiny
    global_adapter = _random_adapter(layout, 42)
    keep = {k: v.clone() for k, v in global_adapter.items()}
    strategy = _strategy(layout)
    strategy.configure(1, {11: "p0000", 22: "p0001"}, global_adapter)
    replies, adapters, _, _ = _good(layout)
    kept_replies = [{k: v.clone() for k, v in a.items()} for a in adapters]
    result = strategy.aggregate(1, _lab(replies))
    for name in keep:
        assert torch.equal(global_adapter[name], keep[name])
    for a, k in zip(adapters, kept_replies, strict=True):
        for name in a:
            assert torch.equal(a[name], k[name])
    result.adapter[layout.entries[0].name].add_(1.0)
    assert torch.equal(
        global_adapter[layout.entries[0].name], keep[layout.entries[0].name]
    )


def test_configure_builds_instructions(tiny, flower_identity) -> None:
    """configure() must address train.lora messages to the sampled known nodes
    with content that decodes to the strategy's spec, the round's settings and
    the exact global adapter."""
    _, layout = tiny
    strategy = _strategy(layout)
    global_adapter = _random_adapter(layout, 5)
    messages = strategy.configure(4, LABELS, global_adapter)
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(LABELS)
    for m in messages:
        assert m.metadata.message_type == MESSAGE_TRAIN_LORA
        ins = decode_lora_train_ins(m.content)
        assert ins.spec == SPEC
        assert ins.config.server_round == 4 and ins.config.seed == 7
        assert ins.config.local_steps == 3 and ins.config.batch_size == 4
        assert ins.config.learning_rate == 1e-3
        assert list(ins.adapter) == list(global_adapter)
        for name, t in global_adapter.items():
            assert torch.equal(ins.adapter[name], t)
        layout.check(TensorLayout.of(ins.adapter))


def test_configure_samples_fraction_reproducibly(tiny, flower_identity) -> None:
    """With fraction 0.4 of 5 known nodes, the round loop's node book picks 2
    distinct known nodes, reproducibly for the round, and the strategy
    instructs exactly those."""
    adapter, layout = tiny
    book = NodeBook(LABELS, fraction=0.4, seed=7)
    a = _strategy(layout).configure(1, book.sample(1), adapter)
    b = _strategy(layout).configure(1, book.sample(1), adapter)
    ids_a = [m.metadata.dst_node_id for m in a]
    assert len(ids_a) == 2 and set(ids_a) <= set(LABELS)
    assert ids_a == [m.metadata.dst_node_id for m in b]
