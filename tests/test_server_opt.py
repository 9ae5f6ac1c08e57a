"""Server optimizers (strategies.server_opt) against hand-written NumPy formulas.

Each rule is written out here in float64 from the papers as Flower 1.42 states
them (FedAdam's bias-corrected rate uses ``server_round + 1``), so a wrong
moment, a missing bias correction or a sign error fails. Resume must be
bit-exact through a JSON + safetensors round trip of :meth:`state`, and a
refused step must leave the state untouched.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.common.logger import FLOWER_LOGGER
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from strategies.server_opt import (
    SERVER_OPTIMIZERS,
    ServerOptError,
    ServerOptimizer,
    ServerOptSettings,
)

SHAPES = {"layer.lora_A.weight": (2, 5), "layer.lora_B.weight": (6, 2)}
Arrays = dict[str, np.ndarray]


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * scale for k, s in SHAPES.items()}


def _rounds(n: int) -> list[dict[str, torch.Tensor]]:
    """Per-round client deltas; the aggregate is current + delta."""
    return [_tensors(100 + r, scale=0.05) for r in range(n)]


def _run(
    opt: ServerOptimizer,
    start: dict[str, torch.Tensor],
    deltas: list[dict[str, torch.Tensor]],
    first_round: int = 1,
) -> list[dict[str, torch.Tensor]]:
    cur, out = start, []
    for i, delta in enumerate(deltas):
        agg = {k: cur[k] + delta[k] for k in cur}
        cur = opt.step(first_round + i, cur, agg)
        out.append(cur)
    return out


def _np64(t: dict[str, torch.Tensor]) -> Arrays:
    return {k: v.double().numpy() for k, v in t.items()}


def _hand(
    rule: Callable[[int, Arrays, Arrays, dict[str, Arrays]], Arrays],
    start: dict[str, torch.Tensor],
    deltas: list[dict[str, torch.Tensor]],
    got: list[dict[str, torch.Tensor]],
) -> None:
    """Apply ``rule`` round by round from the same current the optimizer saw."""
    state: dict[str, Arrays] = {}
    cur = start
    for t, (delta, out) in enumerate(zip(deltas, got, strict=True), start=1):
        x = _np64(cur)
        agg = _np64({k: cur[k] + delta[k] for k in cur})
        want = rule(t, x, agg, state)
        for k in want:
            np.testing.assert_allclose(
                out[k].double().numpy(), want[k], rtol=1e-5, atol=1e-7, err_msg=k
            )
        cur = out


def test_fedadam_equals_hand_computation() -> None:
    """m, v, and Flower's eta_norm = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))."""
    eta, b1, b2, tau = 0.03, 0.9, 0.99, 1e-3

    def rule(t: int, x: Arrays, agg: Arrays, s: dict[str, Arrays]) -> Arrays:
        out = {}
        eta_norm = eta * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        for k in x:
            d = agg[k] - x[k]
            m = b1 * s.get("m", {}).get(k, 0.0) + (1 - b1) * d
            v = b2 * s.get("v", {}).get(k, 0.0) + (1 - b2) * d**2
            s.setdefault("m", {})[k], s.setdefault("v", {})[k] = m, v
            out[k] = x[k] + eta_norm * m / (np.sqrt(v) + tau)
        return out

    start, deltas = _tensors(0), _rounds(2)
    opt = ServerOptimizer(ServerOptSettings("fedadam", eta=eta, tau=tau))
    got = _run(opt, start, deltas)
    _hand(rule, start, deltas, got)
    # The step is not the aggregate: the optimizer really moved elsewhere.
    agg1 = {k: start[k] + deltas[0][k] for k in start}
    assert not torch.allclose(
        got[0]["layer.lora_A.weight"], agg1["layer.lora_A.weight"]
    )


def test_fedyogi_equals_hand_computation() -> None:
    """v <- v - (1 - b2) d^2 sign(v - d^2); no bias correction."""
    eta, b1, b2, tau = 0.02, 0.9, 0.99, 1e-3

    def rule(t: int, x: Arrays, agg: Arrays, s: dict[str, Arrays]) -> Arrays:
        out = {}
        for k in x:
            d = agg[k] - x[k]
            m = b1 * s.get("m", {}).get(k, 0.0) + (1 - b1) * d
            v0 = s.get("v", {}).get(k, np.zeros_like(d))
            v = v0 - (1 - b2) * d**2 * np.sign(v0 - d**2)
            s.setdefault("m", {})[k], s.setdefault("v", {})[k] = m, v
            out[k] = x[k] + eta * m / (np.sqrt(v) + tau)
        return out

    start, deltas = _tensors(1), _rounds(2)
    got = _run(ServerOptimizer(ServerOptSettings("fedyogi", eta=eta)), start, deltas)
    _hand(rule, start, deltas, got)


def test_fedadagrad_equals_hand_computation() -> None:
    """No momentum (beta_1 = 0 in Flower); v accumulates d^2."""
    eta, tau = 0.05, 1e-3

    def rule(t: int, x: Arrays, agg: Arrays, s: dict[str, Arrays]) -> Arrays:
        out = {}
        for k in x:
            d = agg[k] - x[k]
            v = s.get("v", {}).get(k, 0.0) + d**2
            s.setdefault("v", {})[k] = v
            out[k] = x[k] + eta * d / (np.sqrt(v) + tau)
        return out

    start, deltas = _tensors(2), _rounds(2)
    got = _run(ServerOptimizer(ServerOptSettings("fedadagrad", eta=eta)), start, deltas)
    _hand(rule, start, deltas, got)


def test_fedavgm_equals_hand_computation() -> None:
    """buf = pg (round 1), then momentum * buf + pg; x - eta * buf (pg = x - agg)."""
    eta, mom = 0.7, 0.9

    def rule(t: int, x: Arrays, agg: Arrays, s: dict[str, Arrays]) -> Arrays:
        out = {}
        for k in x:
            pg = x[k] - agg[k]
            buf = pg if t == 1 else mom * s["buf"][k] + pg
            s.setdefault("buf", {})[k] = buf
            out[k] = x[k] - eta * buf
        return out

    start, deltas = _tensors(3), _rounds(3)
    opt = ServerOptimizer(ServerOptSettings("fedavgm", eta=eta, momentum=mom))
    _hand(rule, start, deltas, _run(opt, start, deltas))


def test_none_returns_aggregated_unchanged() -> None:
    opt = ServerOptimizer(ServerOptSettings())
    cur, agg = _tensors(4), _tensors(5)
    out = opt.step(1, cur, agg)
    assert all(out[k] is agg[k] for k in agg)
    assert opt.state()["tensors"] == {}


def test_dtype_and_order_follow_current() -> None:
    """bf16 globals come back bf16, in current's name order; no Flower INFO log."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    FLOWER_LOGGER.addHandler(handler)
    try:
        cur = {k: v.to(torch.bfloat16) for k, v in reversed(_tensors(6).items())}
        agg = {k: v + 0.1 for k, v in cur.items()}
        out = ServerOptimizer(ServerOptSettings("fedadam")).step(1, cur, agg)
    finally:
        FLOWER_LOGGER.removeHandler(handler)
    assert list(out) == list(cur)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    assert not [r for r in records if "results" in r.getMessage()]


def _through_checkpoint(state: dict[str, object]) -> dict[str, object]:
    """What a checkpoint keeps: meta as JSON, tensors as safetensors."""
    tensors = state["tensors"]
    assert isinstance(tensors, dict)
    return {
        "meta": json.loads(json.dumps(state["meta"])),
        "tensors": st_load(st_save(tensors)) if tensors else {},
    }


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_resume_is_bit_exact(name: str) -> None:
    """Rounds 1..4 straight == rounds 1..2, state -> new optimizer -> rounds 3..4."""
    settings = ServerOptSettings(name)
    start, deltas = _tensors(7), _rounds(4)
    straight = _run(ServerOptimizer(settings), start, deltas)
    first = ServerOptimizer(settings)
    half = _run(first, start, deltas[:2])
    resumed = ServerOptimizer(settings)
    resumed.load_state(_through_checkpoint(first.state()))
    rest = _run(resumed, half[-1], deltas[2:], first_round=3)
    for k in start:
        assert torch.equal(straight[-1][k], rest[-1][k]), (name, k)
    # A fresh optimizer (no state) would not continue the same way.
    if name != "none":
        fresh = _run(ServerOptimizer(settings), half[-1], deltas[2:], first_round=3)
        assert any(not torch.equal(fresh[-1][k], rest[-1][k]) for k in start)


def test_non_finite_step_leaves_state_unchanged() -> None:
    """v overflowing to inf is refused; the next valid round matches an optimizer
    that never saw the bad round."""
    settings = ServerOptSettings("fedadam")
    start, deltas = _tensors(8), _rounds(2)
    opt, ref = ServerOptimizer(settings), ServerOptimizer(settings)
    cur = _run(opt, start, deltas[:1])[-1]
    _run(ref, start, deltas[:1])
    before = opt.state()
    huge = {k: v + 3e38 for k, v in cur.items()}
    with pytest.raises(ServerOptError, match="not finite"):
        opt.step(2, cur, huge)
    after = opt.state()
    assert after["meta"] == before["meta"]
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    out = _run(opt, cur, deltas[1:], first_round=2)[-1]
    want = _run(ref, cur, deltas[1:], first_round=2)[-1]
    assert all(torch.equal(out[k], want[k]) for k in out)


def test_step_that_overflows_its_dtype_is_refused() -> None:
    """A step finite in float64 but past float32's range is refused, state kept."""
    settings = ServerOptSettings("fedadam", eta=1e300)
    opt = ServerOptimizer(settings)
    cur = _tensors(10)
    before = opt.state()
    with pytest.raises(ServerOptError, match="not finite"):
        opt.step(1, cur, {k: v + 0.01 for k, v in cur.items()})
    after = opt.state()
    assert after["meta"] == before["meta"]
    assert after["tensors"].keys() == before["tensors"].keys()


def test_step_refusals() -> None:
    opt = ServerOptimizer(ServerOptSettings("fedyogi"))
    cur = _tensors(9)
    agg = {k: v + 0.01 for k, v in cur.items()}
    bad = dict(agg, **{"layer.lora_A.weight": torch.full((2, 5), math.nan)})
    with pytest.raises(ServerOptError, match="aggregated tensor .* not finite"):
        opt.step(1, cur, bad)
    with pytest.raises(ServerOptError, match="shape"):
        opt.step(1, cur, dict(agg, **{"layer.lora_A.weight": torch.zeros(3, 5)}))
    with pytest.raises(ServerOptError, match="same, non-empty names"):
        opt.step(1, cur, {"layer.lora_A.weight": agg["layer.lora_A.weight"]})
    with pytest.raises(ServerOptError, match="round 0"):
        opt.step(0, cur, agg)
    opt.step(1, cur, agg)
    with pytest.raises(ServerOptError, match="after the last"):
        opt.step(1, cur, agg)
    rank4 = {
        "layer.lora_A.weight": torch.zeros(4, 5),
        "layer.lora_B.weight": torch.zeros(6, 4),
    }
    with pytest.raises(ServerOptError, match="layout changed"):
        opt.step(2, rank4, rank4)


def _saved_fedadam() -> dict[str, object]:
    opt = ServerOptimizer(ServerOptSettings("fedadam"))
    _run(opt, _tensors(10), _rounds(1))
    return _through_checkpoint(opt.state())


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda s: s["meta"].update(settings={"name": "fedyogi"}), "saved with"),
        (lambda s: s["meta"].update(last_round=-1), "last_round"),
        (lambda s: s["tensors"].pop("v_t/layer.lora_B.weight"), "do not match"),
        (
            lambda s: s["tensors"].update(
                {"m_t/layer.lora_A.weight": torch.zeros(3, 5)}
            ),
            "shape",
        ),
        (
            lambda s: s["tensors"]["m_t/layer.lora_A.weight"].fill_(math.inf),
            "not finite",
        ),
        (lambda s: s["tensors"]["v_t/layer.lora_A.weight"].fill_(-1.0), ">= 0"),
        (
            lambda s: s["tensors"].update(
                {"v_t/layer.lora_A.weight": torch.zeros(2, 5, dtype=torch.float64)}
            ),
            "float32",
        ),
        (lambda s: s.pop("tensors"), "'meta' and 'tensors'"),
    ],
)
def test_load_state_refusals(damage: Callable[[dict], object], match: str) -> None:
    """A damaged state is refused whole: the optimizer still starts afresh."""
    state = _saved_fedadam()
    damage(state)
    opt = ServerOptimizer(ServerOptSettings("fedadam"))
    with pytest.raises(ServerOptError, match=match):
        opt.load_state(state)
    assert opt.state()["tensors"] == {} and opt.state()["meta"]["last_round"] == 0


def test_load_state_with_other_hyperparameters_is_refused() -> None:
    state = _saved_fedadam()
    with pytest.raises(ServerOptError, match="saved with"):
        ServerOptimizer(ServerOptSettings("fedadam", eta=0.5)).load_state(state)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "sgd"},
        {"name": "fedadam", "eta": 0.0},
        {"name": "fedadam", "eta": math.nan},
        {"name": "fedadam", "beta_1": 1.0},
        {"name": "fedadam", "beta_2": -0.1},
        {"name": "fedadam", "tau": 0.0},
        {"name": "fedavgm", "momentum": 1.0},
    ],
)
def test_settings_refusals(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="server_opt"):
        ServerOptSettings(**kwargs)  # type: ignore[arg-type]


def test_paper_defaults() -> None:
    """Reddi et al.: beta_1 0.9, beta_2 0.99, tau 1e-3; Hsu et al.: eta 1, momentum 0.9."""
    s = ServerOptSettings("fedadam")
    assert (s.server_lr, s.beta_1, s.beta_2, s.tau) == (1e-2, 0.9, 0.99, 1e-3)
    m = ServerOptSettings("fedavgm")
    assert (m.server_lr, m.momentum) == (1.0, 0.9)
    assert ServerOptSettings("fedyogi").server_lr == 1e-2
    # not Flower's 1e-1, which diverged on SmolLM2 adapters (bench.lora_family)
    assert ServerOptSettings("fedadagrad").server_lr == 1e-2
