"""Differential privacy for LoRA: central noise on the server, local noise on
the client, the accountant in every round's stats and in the checkpoint.

Tiny tensors (one 200 x 200 "adapter" for the noise statistics) and the tiny
model for the client and the driver.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import pytest
import torch
from dp_accounting import dp_event, rdp  # type: ignore[import-untyped]
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID

import models
from client.app import build_client_app
from client.lora_handler import clip_update, privatize
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
from protocols.messages import (
    MESSAGE_SECURE_MEAN,
    SECURE_MEAN_LABEL,
    ClientClip,
    LocalPrivacy,
    SecureMean,
    encode_secure_mean,
    get_client_clip,
    get_local_privacy,
)
from protocols.run_folder import RunFolder
from server.app import build_driver
from server.config import load_config
from server.federation import RoundResult
from server.lora_driver import LoraDriver
from strategies import LocalTrainSettings, LoraAggregate, LoraFedAvg
from strategies.privacy import (
    DPSettings,
    PrivacyBudgetExhausted,
    gaussian_noise,
    noise_generator,
)
from strategies.robust import Bounds, update_norm

SPEC = LoraSpec(model="tiny-llama", rank=4, alpha=8.0)
NODES = {n: f"p{n:04d}" for n in range(1, 5)}
Adapter = dict[str, torch.Tensor]


def _dp(
    mode: str = "central",
    sigma: float = 1.0,
    clip: float = 1.0,
    target: float | None = None,
) -> DPSettings:
    return DPSettings(
        mode=mode,
        noise_multiplier=sigma,
        clip_norm=clip,
        delta=1e-3,
        target_epsilon=target,
        population=10,
    )


def _strategy(layout: TensorLayout, dp: DPSettings, seed: int | None = 5) -> LoraFedAvg:
    return LoraFedAvg(
        spec=SPEC,
        layout=layout,
        train=LocalTrainSettings(local_steps=1, batch_size=2, learning_rate=1e-3),
        dp=dp,
        noise_seed=seed,
    )


def _reply(node: int, adapter: Adapter) -> tuple[str, Message]:
    ins = Message(RecordDict(), dst_node_id=node, message_type=MESSAGE_TRAIN_LORA)
    res = LoraTrainRes(adapter=adapter, num_examples=10, train_loss=1.0)
    return NODES[node], Message(encode_lora_train_res(res), reply_to=ins)


BIG = {"w": torch.zeros(200, 200), "v": torch.zeros(50)}
LAYOUT = TensorLayout.of(BIG)


def _honest(
    current: Adapter, nodes: tuple[int, ...] = (1, 2, 3)
) -> list[tuple[str, Message]]:
    out = []
    for n in nodes:
        g = torch.Generator().manual_seed(n)
        out.append(
            _reply(
                n,
                {
                    k: v + 0.001 * torch.randn(v.shape, generator=g)
                    for k, v in current.items()
                },
            )
        )
    return out


def _round(
    strategy: LoraFedAvg, current: Adapter, server_round: int = 1
) -> LoraAggregate:
    strategy.configure(server_round, NODES, current)  # 4 sampled, 3 reply
    return strategy.aggregate(server_round, _honest(current), current)


def test_central_dp_is_deterministic_for_a_seed(flower_identity: None) -> None:
    """The same noise seed gives bit-identical adapters; another seed (or
    another round) other noise."""
    a = _round(_strategy(LAYOUT, _dp()), BIG).adapter
    b = _round(_strategy(LAYOUT, _dp()), BIG).adapter
    c = _round(_strategy(LAYOUT, _dp(), seed=6), BIG).adapter
    d = _round(_strategy(LAYOUT, _dp()), BIG, server_round=2).adapter
    assert a is not None and b is not None and c is not None and d is not None
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w"], c["w"]) and not torch.equal(a["w"], d["w"])


def test_central_noise_is_sigma_c_over_sampled(flower_identity: None) -> None:
    """Replies equal to the global tensors (zero update): the new tensors are
    pure noise of std sigma C / m with m = 4 sampled (not 3 replied):
    0.5 x 2 / 4 = 0.25, on 40,050 values (a loose 3% check), mean ~0."""
    strategy = _strategy(LAYOUT, _dp(sigma=0.5, clip=2.0))
    strategy.configure(1, NODES, BIG)
    zero = [_reply(n, BIG) for n in (1, 2, 3)]
    result = strategy.aggregate(1, zero, BIG)
    assert result.adapter is not None
    values = torch.cat([t.flatten() for t in result.adapter.values()])
    assert float(values.std()) == pytest.approx(0.25, rel=0.03)
    assert abs(float(values.mean())) < 0.01
    assert result.stats["noise_std"] == pytest.approx(0.25)
    # exactly the seeded draw of strategies.privacy, divided by m
    noise = gaussian_noise(BIG, 1.0, noise_generator(5, 1))
    assert torch.allclose(result.adapter["w"], noise["w"] / 4, atol=1e-6)


def test_central_dp_clips_to_c_and_reports_epsilon(flower_identity: None) -> None:
    """Every update is clipped to C (here below every update's norm), the
    stats name the bound, and epsilon after 2 rounds is dp-accounting's for
    sigma composed twice, at the configured delta."""
    strategy = _strategy(LAYOUT, _dp(clip=1e-3))
    first = _round(strategy, BIG)
    assert first.stats["clip_bound"] == 1e-3 and first.stats["clipped"] == 3
    second = _round(strategy, BIG, server_round=2)
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(1.0), 2)
    assert second.stats["epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-12)
    assert second.stats["delta"] == 1e-3
    assert first.stats["epsilon"] < second.stats["epsilon"]


def test_central_dp_ignores_the_adaptive_bound(flower_identity: None) -> None:
    """The adaptive bound (3 x median norm) depends on the other clients, which
    would break the sensitivity argument: central DP clips to C only. An
    update of 4 x the median norm, below C, is not clipped; the fixed bound
    federation.clip_norm, data-independent, applies when below C."""
    current = {k: v.clone() for k, v in BIG.items()}
    replies = _honest(current)
    g = torch.Generator().manual_seed(9)
    big = {k: v + 0.004 * torch.randn(v.shape, generator=g) for k, v in current.items()}
    replies.append(_reply(4, big))
    strategy = _strategy(LAYOUT, _dp(clip=10.0))
    strategy.configure(1, NODES, current)
    result = strategy.aggregate(1, replies, current)
    assert result.stats["clip_bound"] == 10.0 and result.stats["clipped"] == 0
    fixed = LoraFedAvg(
        spec=SPEC,
        layout=LAYOUT,
        train=LocalTrainSettings(local_steps=1, batch_size=2, learning_rate=1e-3),
        dp=_dp(clip=10.0),
        noise_seed=5,
        bounds=Bounds(fixed_bound=0.1),
    )
    fixed.configure(1, NODES, current)
    capped = fixed.aggregate(1, replies, current)
    assert capped.stats["clip_bound"] == 0.1 and capped.stats["clipped"] == 4


def test_budget_refuses_the_round_in_configure(flower_identity: None) -> None:
    """With target epsilon between 1 and 2 rounds' worth, configure refuses
    round 2 before any instruction goes out, as ``budget_allows`` foretold
    after round 1 (the round loop's cue to evaluate it as the last)."""
    acc1, acc2 = rdp.RdpAccountant(), rdp.RdpAccountant()
    acc1.compose(dp_event.GaussianDpEvent(1.0), 1)
    acc2.compose(dp_event.GaussianDpEvent(1.0), 2)
    target = (acc1.get_epsilon(1e-3) + acc2.get_epsilon(1e-3)) / 2
    strategy = _strategy(LAYOUT, _dp(target=target))
    assert strategy.budget_allows(len(NODES))
    _round(strategy, BIG)
    assert not strategy.budget_allows(len(NODES))
    with pytest.raises(PrivacyBudgetExhausted):
        strategy.configure(2, NODES, BIG)


def test_a_refused_round_spends_nothing(flower_identity: None) -> None:
    """A round with no usable reply releases nothing: epsilon stays 0."""
    strategy = _strategy(LAYOUT, _dp())
    strategy.configure(1, NODES, BIG)
    result = strategy.aggregate(1, [], BIG)
    assert result.adapter is None and strategy.account is not None
    assert strategy.account.rounds == 0


def test_local_mode_sends_the_settings_and_accounts_sigma_over_2(
    flower_identity: None,
) -> None:
    """Local mode: every instruction carries (C, sigma); the server adds no
    noise (an honest round is FedAvg) and accounts sigma / 2."""
    strategy = _strategy(LAYOUT, _dp("local", sigma=2.0, clip=0.5), seed=None)
    assert strategy.noise_seed is None
    messages = strategy.configure(1, NODES, BIG)
    assert all(get_local_privacy(m.content) == LocalPrivacy(0.5, 2.0) for m in messages)
    result = strategy.aggregate(1, [_reply(n, BIG) for n in (1, 2, 3)], BIG)
    assert result.adapter is not None
    assert all(torch.equal(result.adapter[k], BIG[k]) for k in BIG)
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(1.0), 1)
    assert result.stats["epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-12)


def test_privatize_clips_then_adds_sigma_c_noise() -> None:
    """A local release is start + clip(update, C) + N(0, (sigma C)^2)."""
    start = {"w": torch.ones(300, 300)}
    trained = {"w": torch.ones(300, 300) * 3}  # update norm 600
    dp = LocalPrivacy(clip_norm=2.0, noise_multiplier=0.1)
    out = privatize(trained, start, dp, noise_generator(1, 1, "local:x"))
    noise = gaussian_noise(start, 0.2, noise_generator(1, 1, "local:x"))
    expect = start["w"] + 2.0 / 300 + noise["w"]
    assert torch.allclose(out["w"], expect, atol=1e-6)
    assert float((out["w"] - start["w"]).std()) == pytest.approx(0.2, rel=0.03)


def _train(app: ClientApp, message: Message, context: Context) -> Adapter:
    reply = app(message, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    layout = TensorLayout.of(decode_lora_train_ins(message.content).adapter)
    return decode_lora_train_res(reply.content, expected=layout).adapter


def test_client_local_dp_simulated_is_reproducible_deployed_is_not(
    tmp_path: Path, flower_identity: None
) -> None:
    """A simulated node's noise comes from (run seed, round, label): the same
    instruction gives the same reply; a deployed node draws a fresh seed. Both
    replies sit within noise of the global adapter, far from what training
    without DP gives."""
    torch.set_num_threads(1)
    peft_model = models.attach_lora(
        models.load_causal_lm("tiny-llama").model,
        LoraSpec(model="tiny-llama", max_length=64),
    )
    adapter = models.adapter_tensors(peft_model)
    strategy = LoraFedAvg(
        spec=LoraSpec(model="tiny-llama", max_length=64),
        layout=models.adapter_layout(peft_model),
        train=LocalTrainSettings(local_steps=1, batch_size=2, learning_rate=1e-3),
        seed=3,
        dp=_dp("local", sigma=1.0, clip=1e-4),
    )
    message = strategy.configure(1, {5: "p0002"}, adapter)[0]
    write_jsonl(generate_tasks(6, seed=2), tmp_path / "data" / "client-0002.jsonl")
    simulated = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 2},
        state=RecordDict(),
        run_config={"run-dir": str(tmp_path)},
    )
    deployed = Context(
        run_id=1,
        node_id=5,
        node_config={"data-path": str(tmp_path / "data" / "client-0002.jsonl")},
        state=RecordDict(),
        run_config={},
    )
    app = build_client_app()
    a, b = _train(app, message, simulated), _train(app, message, simulated)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, d = _train(app, message, deployed), _train(app, message, deployed)
    assert not torch.equal(
        c["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
        d["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    )
    numel = sum(t.numel() for t in adapter.values())
    for got in (a, c):
        spread = update_norm({k: got[k] - adapter[k] for k in got}) / math.sqrt(numel)
        assert spread == pytest.approx(1e-4, rel=0.1)  # sigma C per value


def test_driver_checkpoint_keeps_noise_seed_and_epsilon(
    tmp_path: Path, flower_identity: None
) -> None:
    """A central-DP LoRA driver with no configured noise seed draws one; its
    checkpoint keeps the seed and the accountant, so a resumed driver reports
    the same epsilon and adds the same noise in the next round as the
    uninterrupted one (bit-identical adapters)."""
    torch.set_num_threads(1)
    config = load_config(
        None,
        {
            "model.name": "tiny-llama",
            "model.max_length": 64,
            "eval.max_new_tokens": 2,
            "federation.clients": 4,
            "privacy.mode": "central",
            "privacy.noise_multiplier": 0.8,
            "privacy.clip_norm": 0.01,
        },
    )
    examples = generate_tasks(2, seed=9)
    one = cast(LoraDriver, build_driver(config, examples))
    summary = one.strategy.summary()
    assert "dp=central" in summary and "aggregator=mean" in summary

    def step(driver: LoraDriver, server_round: int) -> RoundResult:
        driver.configure(server_round, NODES)
        return driver.apply(server_round, _honest(driver.adapter))

    first = step(one, 1)
    assert first.extra["epsilon"] > 0 and first.extra["delta"] == pytest.approx(1 / 40)
    folder = RunFolder(tmp_path / "run")
    one.checkpoint(folder, 1, {"metrics": first.extra})
    record = json.loads((folder.path / "checkpoint" / "state.json").read_text())
    assert record["privacy"]["noise_seed"] == one.strategy.noise_seed
    two = cast(LoraDriver, build_driver(config, examples))
    assert two.strategy.noise_seed != one.strategy.noise_seed  # fresh at build
    assert two.restore(folder) == 1
    assert two.strategy.noise_seed == one.strategy.noise_seed
    assert two.strategy.account is not None and one.strategy.account is not None
    assert two.strategy.account.epsilon == one.strategy.account.epsilon
    a, b = step(one, 2), step(two, 2)
    assert a.extra["epsilon"] == b.extra["epsilon"]
    assert all(torch.equal(one.adapter[k], two.adapter[k]) for k in one.adapter)
    # a checkpoint without privacy state cannot resume a DP run
    bare = RunFolder(tmp_path / "bare")
    bare.write_checkpoint(1, one.strategy.spec.fingerprint(), {}, one.adapter)
    from protocols.run_folder import CheckpointError

    with pytest.raises(CheckpointError, match="privacy"):
        build_driver(config, examples).restore(bare)


# --- Central DP with client-side clipping (Flower's client-side fixed clipping) ---


def _client_dp(clip: float) -> DPSettings:
    return DPSettings(
        mode="central",
        noise_multiplier=1.0,
        clip_norm=clip,
        delta=1e-3,
        target_epsilon=None,
        population=10,
        clipping="client",
    )


def _clipped_replies(current: Adapter, clip: float) -> list[tuple[str, Message]]:
    """The honest replies as clients told to clip to ``clip`` send them."""
    out = []
    for who, message in _honest(current):
        adapter = decode_lora_train_res(message.content, expected=LAYOUT).adapter
        node = next(n for n, label in NODES.items() if label == who)
        out.append(_reply(node, clip_update(adapter, current, ClientClip(clip))))
    return out


def test_client_clipping_sends_the_clip_and_matches_server_clipping(
    flower_identity: None,
) -> None:
    """Every instruction carries C (and no local DP); the clients' clipped
    replies plus the server's noise give the server-side clipping release for
    the same noise seed (the server's own clip is then a no-op), with the same
    epsilon. Updates have norm ~0.2, C = 0.05: the clip binds."""
    clip = 0.05
    client = _strategy(LAYOUT, _client_dp(clip))
    messages = client.configure(1, NODES, BIG)
    assert all(get_client_clip(m.content) == ClientClip(clip) for m in messages)
    assert all(get_local_privacy(m.content) is None for m in messages)
    ours = client.aggregate(1, _clipped_replies(BIG, clip), BIG)
    server = _strategy(LAYOUT, _dp(clip=clip))
    assert all(
        get_client_clip(m.content) is None for m in server.configure(1, NODES, BIG)
    )
    theirs = server.aggregate(1, _honest(BIG), BIG)
    assert theirs.stats["clipped"] == 3
    assert ours.adapter is not None and theirs.adapter is not None
    for k in BIG:
        assert torch.allclose(ours.adapter[k], theirs.adapter[k], rtol=0, atol=1e-7)
    assert ours.stats["epsilon"] == theirs.stats["epsilon"] > 0
    # Without the noise seed's noise the two would be far apart: sigma C / m.
    assert float((ours.adapter["w"] - BIG["w"]).std()) > 0.01


def _secure_reply(
    replies: list[tuple[str, Message]], current: Adapter, weights: tuple[int, ...]
) -> tuple[str, Message]:
    """The secure-mean reply SecAgg+ would give for ``replies`` (no quantization)."""
    flats = []
    for _, message in replies:
        adapter = decode_lora_train_res(message.content, expected=LAYOUT).adapter
        flats.append(
            torch.cat([(adapter[k] - current[k]).flatten() for k in current]).double()
        )
    total = float(sum(weights))
    mean = sum(w * f for w, f in zip(weights, flats, strict=True)) / total
    result = SecureMean(
        mean=mean.numpy(),
        total_weight=total,
        weight_step=max(weights) / 2**22,
        survivors=tuple(who for who, _ in replies),
        weights=weights,
        metrics={who: {"train-loss": 1.0} for who, _ in replies},
        dropped={NODES[4]: "left out"},
    )
    content = encode_secure_mean(result)
    return SECURE_MEAN_LABEL, Message(
        content, dst_node_id=SUPERLINK_NODE_ID, message_type=MESSAGE_SECURE_MEAN
    )


def test_a_secure_round_adds_the_central_noise_to_the_sum(
    flower_identity: None,
) -> None:
    """Under SecAgg+ the server sees the mean of the clipped updates only:
    mean x survivors + the seeded noise, over m = 4 sampled, is the
    server-side clipping release, and the round spends the same epsilon.
    Unequal weights (the mean is then no sum) refuse the round and spend
    nothing."""
    clip = 0.05
    replies = _clipped_replies(BIG, clip)
    secure = _strategy(LAYOUT, _client_dp(clip))
    secure.configure(1, NODES, BIG)
    got = secure.aggregate(1, [_secure_reply(replies, BIG, (1, 1, 1))], BIG)
    server = _strategy(LAYOUT, _dp(clip=clip))
    server.configure(1, NODES, BIG)
    want = server.aggregate(1, _honest(BIG), BIG)
    assert got.adapter is not None and want.adapter is not None
    for k in BIG:
        assert torch.allclose(got.adapter[k], want.adapter[k], rtol=0, atol=1e-7)
    assert got.stats["epsilon"] == want.stats["epsilon"] > 0
    assert got.stats["noise_std"] == pytest.approx(0.05 / 4)
    assert got.accepted == [NODES[n] for n in (1, 2, 3)]
    unequal = _strategy(LAYOUT, _client_dp(clip))
    unequal.configure(1, NODES, BIG)
    refused = unequal.aggregate(1, [_secure_reply(replies, BIG, (1, 2, 1))], BIG)
    assert (
        refused.adapter is None
        and "equal weights" in refused.rejected[SECURE_MEAN_LABEL]
    )
    assert unequal.account is not None and unequal.account.rounds == 0


def test_client_clipped_reply_has_update_norm_at_most_c(
    tmp_path: Path, flower_identity: None
) -> None:
    """The real client app told to clip to C = 1e-4 replies with
    global + clip(update, C): norm within C (and at it: one step moves the
    adapter far more, as the unclipped reply shows)."""
    torch.set_num_threads(1)
    spec = LoraSpec(model="tiny-llama", max_length=64)
    peft_model = models.attach_lora(models.load_causal_lm("tiny-llama").model, spec)
    adapter = models.adapter_tensors(peft_model)
    strategy = LoraFedAvg(
        spec=spec,
        layout=models.adapter_layout(peft_model),
        train=LocalTrainSettings(local_steps=1, batch_size=2, learning_rate=1e-3),
        seed=3,
        dp=_client_dp(1e-4),
        noise_seed=1,
    )
    message = strategy.configure(1, {5: "p0002"}, adapter)[0]
    write_jsonl(generate_tasks(6, seed=2), tmp_path / "data" / "client-0002.jsonl")
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 2},
        state=RecordDict(),
        run_config={"run-dir": str(tmp_path)},
    )
    app = build_client_app()
    clipped = _train(app, message, context)
    norm = update_norm({k: clipped[k] - adapter[k] for k in adapter})
    assert norm <= 1e-4 * (1 + 1e-5)
    assert norm == pytest.approx(1e-4, rel=1e-3)
    plain = Message(
        RecordDict({k: v for k, v in message.content.items() if k != "client-clip"}),
        dst_node_id=5,
        message_type=MESSAGE_TRAIN_LORA,
    )
    free = _train(app, plain, context)
    assert update_norm({k: free[k] - adapter[k] for k in adapter}) > 1e-3
