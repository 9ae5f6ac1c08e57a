"""FedProx on the client: the proximal term in train_lora and ``proximal-mu`` on the wire.

mu = 0 must leave training bit-identical to a config that never mentions mu;
a large mu must hold the adapter nearer the global one; the term's gradient
must be mu * (w - w0); old messages (no key) must decode as mu = 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from flwr.app import ConfigRecord

import models
from client.lora_trainer import proximal_term, train_lora
from corpora import generate_tasks
from protocols import (
    LocalTrainConfig,
    LoraSpec,
    LoraTrainIns,
    ProtocolError,
    decode_lora_train_ins,
    encode_lora_train_ins,
)

SPEC = LoraSpec(model="tiny-llama", max_length=64)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: tiny matmuls gain nothing from more threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _config(steps: int = 6, **extra: float) -> LocalTrainConfig:
    return LocalTrainConfig(
        server_round=1,
        local_steps=steps,
        batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.0,
        seed=0,
        **extra,  # type: ignore[arg-type]
    )


def _train(config: LocalTrainConfig) -> tuple[dict[str, torch.Tensor], dict, float]:
    """Train a fresh tiny-llama adapter; (start, end, mean loss)."""
    loaded = models.load_causal_lm("tiny-llama")
    model = models.attach_lora(loaded.model, SPEC)
    tok = loaded.tokenizer
    data = [
        models.tokenize_example(e, tok, SPEC.max_length) for e in generate_tasks(16, 0)
    ]
    start = {k: v.clone() for k, v in models.adapter_tensors(model).items()}
    stats = train_lora(
        model, data, config, pad_id=int(tok.pad_token_id), label="p0", device=CPU
    )
    return start, models.adapter_tensors(model), stats.mean_loss


def _drift(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((end[k] - start[k]).pow(2).sum()) for k in start))


def test_mu_zero_is_bit_identical_to_no_mu() -> None:
    """An explicit mu = 0 trains exactly like a config without mu; a small
    positive mu does not (the term is live)."""
    _, plain, plain_loss = _train(_config())
    _, zero, zero_loss = _train(_config(proximal_mu=0.0))
    _, prox, _ = _train(_config(proximal_mu=1.0))
    assert plain_loss == zero_loss
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert any(not torch.equal(plain[k], prox[k]) for k in plain)


def test_large_mu_keeps_adapter_closer_to_start() -> None:
    """With mu = 1e3 the adapter moves strictly less than with mu = 0; the
    reported loss is the task loss either way (same order of magnitude, not
    inflated by the proximal term)."""
    start0, end0, loss0 = _train(_config(steps=8))
    start1, end1, loss1 = _train(_config(steps=8, proximal_mu=1e3))
    assert all(torch.equal(start0[k], start1[k]) for k in start0)
    free, held = _drift(start0, end0), _drift(start1, end1)
    assert held < free, (held, free)
    assert math.isfinite(loss1) and abs(loss1 - loss0) < 0.5 * loss0


def test_proximal_gradient_matches_hand_computation() -> None:
    """(mu/2)||w - w0||^2 at w = ([1, 2], [[3]]), w0 = ([0.5, 2.5], [[1]]),
    mu = 0.4: value 0.2 * (0.25 + 0.25 + 4) = 0.9, gradient mu * (w - w0)."""
    w = [
        torch.tensor([1.0, 2.0], requires_grad=True),
        torch.tensor([[3.0]], requires_grad=True),
    ]
    w0 = [torch.tensor([0.5, 2.5]), torch.tensor([[1.0]])]
    value = proximal_term(w, w0, 0.4)
    value.backward()
    assert torch.isclose(value, torch.tensor(0.9))
    assert torch.allclose(w[0].grad, torch.tensor([0.2, -0.2]))
    assert torch.allclose(w[1].grad, torch.tensor([[0.8]]))


def test_proximal_mu_wire_round_trip() -> None:
    """Written under Flower's key only when non-zero; absent decodes as 0."""
    plain = _config().to_config_record()
    assert "proximal-mu" not in plain
    assert LocalTrainConfig.from_config_record(plain).proximal_mu == 0.0
    with_mu = _config(proximal_mu=0.01)
    record = with_mu.to_config_record()
    assert record["proximal-mu"] == 0.01
    assert LocalTrainConfig.from_config_record(record) == with_mu
    adapter = {"a": torch.zeros(2, 2)}
    ins = LoraTrainIns(spec=SPEC, config=with_mu, adapter=adapter)
    assert decode_lora_train_ins(encode_lora_train_ins(ins)).config == with_mu


@pytest.mark.parametrize("mu", [-0.1, math.nan, math.inf])
def test_bad_mu_is_rejected(mu: float) -> None:
    with pytest.raises(ProtocolError, match="proximal"):
        _config(proximal_mu=mu)
    record = ConfigRecord(dict(_config().to_config_record(), **{"proximal-mu": mu}))
    with pytest.raises(ProtocolError, match="proximal"):
        LocalTrainConfig.from_config_record(record)
