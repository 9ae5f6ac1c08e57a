"""One hostile LoRA client against the default (bounded) aggregation.

Issue 10's failures: an adapter scaled by 1e6 froze the model, one scaled by
1e30 made the central evaluation NaN and poisoned the checkpoint, and a claim
of ``num_examples = 2**62`` gave the attacker all the weight.

The stated bound. Under the defaults (aggregator ``mean``, each update
clipped to 3 x the round's (low) median update norm, each weight capped at
3 x the round's (low) median count) with honest updates ``d_h`` and an attacker update
clipped to ``d_a`` (``|d_a| <= B``), the new global adapter differs from the
honest-only aggregate ``H`` by

    ``s (d_a - (H - current))``, so ``|new - H| <= s (B + |H - current|)``,

where ``s`` is the attacker's share of the capped weights. With one attacker
among four, ``B = 3 x median <= 3 max |d_h|`` and ``|H - current| <= max
|d_h|``, so the attacker moves the model by at most ``s x 4 max |d_h|``:
four honest update norms scaled by its capped weight share.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import cast

import pytest
import torch
from flwr.app import Context, Message, RecordDict

import models
from client.app import build_client_app
from corpora import generate_tasks, write_jsonl
from protocols import (
    MESSAGE_TRAIN_LORA,
    LoraSpec,
    LoraTrainRes,
    TensorLayout,
    decode_lora_train_ins,
    decode_lora_train_res,
    encode_lora_train_res,
)
from protocols.run_folder import RunFolder
from server.app import build_driver
from server.config import load_config
from server.federation import FederationError
from server.lora_driver import LoraDriver
from strategies import LocalTrainSettings, LoraFedAvg
from strategies.robust import Bounds, update_norm

SPEC = LoraSpec(model="tiny-llama", rank=4, alpha=8.0)
LABELS = {n: f"p{n:04d}" for n in range(1, 7)}
HONEST_COUNTS = (10, 20, 30)
FLOAT32_MAX = torch.finfo(torch.float32).max
Adapter = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def layout() -> TensorLayout:
    peft_model = models.attach_lora(models.load_causal_lm("tiny-llama").model, SPEC)
    return models.adapter_layout(peft_model)


def _strategy(layout: TensorLayout, bounds: Bounds | None = None) -> LoraFedAvg:
    return LoraFedAvg(
        spec=SPEC,
        layout=layout,
        train=LocalTrainSettings(local_steps=1, batch_size=2, learning_rate=1e-3),
        bounds=bounds,
    )


def _randn(layout: TensorLayout, seed: int, scale: float = 1.0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return {e.name: torch.randn(e.shape, generator=g) * scale for e in layout.entries}


def _plus(a: Adapter, b: Adapter, scale: float = 1.0) -> Adapter:
    return {k: (a[k].double() + scale * b[k].double()).float() for k in a}


def _reply(node: int, adapter: Adapter, n: int) -> tuple[str, Message]:
    ins = Message(RecordDict(), dst_node_id=node, message_type=MESSAGE_TRAIN_LORA)
    content = encode_lora_train_res(
        LoraTrainRes(adapter=adapter, num_examples=n, train_loss=1.0)
    )
    return LABELS[node], Message(content, reply_to=ins)


def _distance(a: Adapter, b: Adapter) -> float:
    return update_norm({k: a[k].double() - b[k].double() for k in a})


def _honest(
    layout: TensorLayout, current: Adapter
) -> tuple[list[tuple[str, Message]], float]:
    """Three honest replies (small updates) and their largest update norm."""
    deltas = [_randn(layout, 10 + i, 0.01) for i in range(3)]
    replies = [
        _reply(i + 1, _plus(current, d), n)
        for i, (d, n) in enumerate(zip(deltas, HONEST_COUNTS, strict=True))
    ]
    return replies, max(update_norm(d) for d in deltas)


ATTACKS = {
    # name: (scale of the attacker's update, the count it claims)
    "scaled-1e6": (1e6, 20),
    "scaled-1e30": (1e30, 20),
    "claims-2**62": (50.0, 2**62),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_one_attacker_moves_the_adapter_at_most_the_stated_distance(
    layout: TensorLayout, flower_identity: None, attack: str
) -> None:
    """Under the defaults the new adapter is within s x 4 max|d_h| of the
    honest-only aggregate (module docstring; s = the attacker's capped weight
    share); with clipping off and uncapped weights the same attack moves it
    more than 10 times that far, so the test fails without the defence."""
    scale, claim = ATTACKS[attack]
    current = _randn(layout, 42)
    honest, honest_norm = _honest(layout, current)
    attacker = _reply(4, _plus(current, _randn(layout, 99, 0.01), scale), claim)
    strategy = _strategy(layout)
    clean = strategy.aggregate(1, honest, current).adapter
    result = strategy.aggregate(1, [*honest, attacker], current)
    assert clean is not None and result.adapter is not None
    assert result.accepted == ["p0001", "p0002", "p0003", "p0004"]
    # capped weights: 3 x the low median of the four counts
    cap = 3 * statistics.median_low([*HONEST_COUNTS, claim])
    share = min(claim, cap) / (sum(HONEST_COUNTS) + min(claim, cap))
    stated = share * 4 * honest_norm
    distance = _distance(result.adapter, clean)
    assert distance <= stated * (1 + 1e-4), (distance, stated)
    assert result.stats["clipped"] == 1
    assert result.stats["weights_capped"] == (1 if claim > cap else 0)
    assert result.stats["clip_bound"] <= 3 * honest_norm
    assert result.stats["aggregator_used"] == result.accepted
    assert all(torch.isfinite(t).all() for t in result.adapter.values())

    undefended = _strategy(layout, Bounds(clip="off", weight_multiple=1e30))
    open_result = undefended.aggregate(1, [*honest, attacker], current)
    assert open_result.adapter is not None
    assert _distance(open_result.adapter, clean) > 10 * stated
    assert open_result.stats["clip_bound"] is None


def test_honest_round_equals_plain_fedavg(
    layout: TensorLayout, flower_identity: None
) -> None:
    """With no clip binding, the bounded round is today's FedAvg: the
    example-weighted mean of the adapters, up to float error."""
    current = _randn(layout, 42)
    honest, _ = _honest(layout, current)
    result = _strategy(layout).aggregate(1, honest, current)
    assert result.stats["clipped"] == 0 and result.stats["weights_capped"] == 0
    total = sum(HONEST_COUNTS)
    for name in current:
        want: torch.Tensor = sum(  # type: ignore[assignment]
            decode_lora_train_res(m.content, expected=layout).adapter[name].double()
            * (n / total)
            for (_, m), n in zip(honest, HONEST_COUNTS, strict=True)
        )
        assert torch.allclose(result.adapter[name].double(), want, atol=1e-6, rtol=0)


def test_an_update_that_overflows_float32_is_rejected(
    layout: TensorLayout, flower_identity: None
) -> None:
    """A reply of +3e38 where the global adapter holds -3e38 is finite, but its
    update (6e38) is not in float32: it is dropped with that reason and the
    rest aggregated."""
    current = _randn(layout, 42)
    first = layout.entries[0].name
    current[first][0, 0] = -3e38
    honest, _ = _honest(layout, current)
    evil = _plus(current, _randn(layout, 99, 0.01))
    evil[first][0, 0] = 3e38
    result = _strategy(layout).aggregate(1, [*honest, _reply(4, evil, 10)], current)
    assert result.rejected == {"p0004": "its update overflows float32"}
    assert result.accepted == ["p0001", "p0002", "p0003"]
    assert result.adapter is not None
    assert torch.equal(result.adapter[first][0, 0], current[first][0, 0])


def test_a_non_finite_aggregate_refuses_the_whole_round(
    layout: TensorLayout, flower_identity: None
) -> None:
    """With clipping off, six replies at float32's largest value have finite
    updates whose mean rounds past it (inf): the round is refused whole,
    every reply listed with the reason, and no new adapter is given (the
    driver keeps its state). Six hostile of six set the adaptive bound
    themselves; only a fixed bound (federation.clip_norm) keeps that round."""
    current = _randn(layout, 42)
    huge = {k: torch.full_like(v, FLOAT32_MAX) for k, v in current.items()}
    replies = [_reply(n, huge, 10) for n in LABELS]
    strategy = _strategy(layout, Bounds(clip="off"))
    result = strategy.aggregate(1, replies, current)
    assert result.adapter is None and result.accepted == []
    assert result.rejected == dict.fromkeys(
        LABELS.values(), "the aggregate is not finite"
    )
    assert _strategy(layout).aggregate(1, replies, current).adapter is None
    fixed = _strategy(layout, Bounds(clip="fixed", fixed_bound=1.0))
    kept = fixed.aggregate(1, replies, current)
    assert kept.adapter is not None and kept.stats["clipped"] == 6
    assert _distance(kept.adapter, current) == pytest.approx(1.0, rel=1e-4)


# -- end to end: the LoRA driver, real clients, the run folder --------------


def _contexts(tmp_path: Path) -> dict[int, Context]:
    examples = generate_tasks(36, seed=1)
    contexts = {}
    for node in (1, 2, 3):
        path = tmp_path / f"node{node}.jsonl"
        write_jsonl(examples[node * 12 - 12 : node * 12], path)
        contexts[node] = Context(
            run_id=7,
            node_id=node,
            node_config={"data-path": str(path), "label": LABELS[node]},
            state=RecordDict(),
            run_config={},
        )
    return contexts


def test_a_1e30_adapter_leaves_evaluation_and_checkpoint_finite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flower_identity: None
) -> None:
    """Three real clients train; a fourth replies an adapter whose update is
    1e30 x an honest one. The driver's new adapter is finite and near the
    honest ones, central evaluation is finite, the round's bounds are in its
    metrics, the checkpoint is finite and a fresh driver resumes from it
    bit-identically; a refused round leaves adapter and checkpoint as they
    were. (Before issue 10: eval NaN, checkpoint poisoned, resume failed.)"""
    monkeypatch.setenv("POLLINATE_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    config = load_config(
        None,
        {
            "model.name": "tiny-llama",
            "model.max_length": 64,
            "train.local_steps": 2,
            "train.batch_size": 2,
            "eval.max_new_tokens": 2,
            "federation.clients": 4,
        },
    )
    eval_examples = generate_tasks(4, seed=9)
    driver = cast(LoraDriver, build_driver(config, eval_examples))
    start = {k: v.clone() for k, v in driver.adapter.items()}
    app = build_client_app()
    contexts = _contexts(tmp_path)
    messages = driver.configure(1, {n: LABELS[n] for n in (1, 2, 3, 4)})
    replies = [
        (LABELS[m.metadata.dst_node_id], app(m, contexts[m.metadata.dst_node_id]))
        for m in messages
        if m.metadata.dst_node_id in contexts
    ]
    layout = driver.strategy.fedavg.layout
    honest = decode_lora_train_res(replies[0][1].content, expected=layout).adapter
    sent = decode_lora_train_ins(messages[0].content).adapter
    poisoned = _plus(sent, {k: honest[k] - sent[k] for k in sent}, 1e30)
    replies.append(_reply(4, poisoned, 12))
    result = driver.apply(1, replies)
    assert result.clients == 4 and result.rejected == 0
    assert result.extra["clipped"] == 1 and result.extra["clip_bound"] > 0
    moved = _distance(driver.adapter, start)
    assert math.isfinite(moved) and moved <= 4 * result.extra["clip_bound"]
    ev = driver.evaluate()
    assert ev.loss is not None and math.isfinite(ev.loss)

    folder = RunFolder(tmp_path / "run")
    driver.checkpoint(folder, 1, {})
    again = cast(LoraDriver, build_driver(config, eval_examples))
    assert again.restore(folder) == 1
    assert all(torch.equal(again.adapter[k], driver.adapter[k]) for k in start)

    # With the clip off, a refused round stops the run and keeps the state
    # and the checkpoint (the round loop writes none for it).
    driver.strategy.fedavg.bounds = Bounds(clip="off")
    huge = {k: torch.full_like(v, FLOAT32_MAX) for k, v in start.items()}
    with pytest.raises(FederationError, match="the aggregate is not finite"):
        driver.apply(2, [_reply(n, huge, 10) for n in LABELS])
    assert all(torch.equal(again.adapter[k], driver.adapter[k]) for k in start)
    assert build_driver(config, eval_examples).restore(folder) == 1


# -- SFPrompt: the same bound on prompts and tail ----------------------------


def test_sfprompt_prompts_and_tail_get_the_same_bound(flower_identity: None) -> None:
    """A device whose prompts-and-tail update is 1e30 x an honest one and
    claims 2**62 examples moves SFPrompt's global tensors by at most its
    capped share x 4 honest update norms, as for LoRA."""
    from protocols import SplitSpec
    from protocols.split_messages import SplitTrainRes, encode_split_train_res
    from strategies import SFPromptFedAvg, SplitRoundSettings

    current = {"prompts": torch.randn(4, 8), "tail.norm": torch.ones(8)}
    layout = TensorLayout.of(current)
    strategy = SFPromptFedAvg(
        spec=SplitSpec("tiny-llama", 4, 1, 2, 8),
        layout=layout,
        settings=SplitRoundSettings(1, 0, 2, 1e-3, 0.5),
        trunk_address="127.0.0.1:1",
    )
    assert "clip<=3xmedian" in strategy.summary()

    def reply(node: int, tensors: Adapter, n: int) -> tuple[str, Message]:
        ins = Message(RecordDict(), dst_node_id=node, message_type="train.sfprompt")
        res = SplitTrainRes(tensors, n, 1.0, 1.0, n, 0, 0)
        return LABELS[node], Message(encode_split_train_res(res), reply_to=ins)

    deltas = [
        {
            k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
            for k, v in current.items()
        }
        for i in range(4)
    ]
    honest = [reply(i + 1, _plus(current, deltas[i]), 10) for i in range(3)]
    evil = reply(4, _plus(current, deltas[3], 1e30), 2**62)
    clean = strategy.aggregate(1, honest, current).tensors
    result = strategy.aggregate(1, [*honest, evil], current)
    assert clean is not None and result.tensors is not None
    share = 30 / (30 + 30)  # capped at 3 x median_low(10, 10, 10, 2**62) = 30
    honest_norm = max(update_norm(d) for d in deltas[:3])
    assert _distance(result.tensors, clean) <= share * 4 * honest_norm * (1 + 1e-4)
    assert result.stats["clipped"] == 1 and result.stats["weights_capped"] == 1
