"""Server optimizers and FedProx wired into whole LoRA runs.

The real ServerApp loop and ClientApp on tiny-llama, in process
(:class:`~simulation.inprocess.InProcessGrid`): a FedAdam run ends elsewhere
than FedAvg and says so in its rows; a run stopped after round 2 and resumed
ends bit-identical to the uninterrupted one (FedAdam, FedAvgM), its optimizer
moments having come back from the checkpoint; a damaged or missing optimizer
state is refused on one line and leaves the checkpoint as it was. The config
refuses what is not wired, and ``train.proximal_mu`` reaches the clients.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from flwr.app import Message

from corpora import generate_tasks
from protocols import (
    LoraTrainRes,
    decode_lora_train_ins,
    encode_lora_train_res,
)
from protocols.run_folder import CheckpointError, RunFolder
from server.app import build_driver
from server.config import ConfigError, RunConfig, load_config
from server.federation import FederationError
from server.lora_driver import SERVER_OPT_FILE, LoraDriver
from strategies.server_opt import SERVER_OPTIMIZERS, ServerOptSettings
from tests.lora_runs import run

CLIENTS = 2


def _config(tmp_path: Path, name: str, overrides: dict[str, Any]) -> RunConfig:
    return load_config(
        None,
        {
            "run.name": name,
            "run.rounds": 3,
            "run.output_dir": str(tmp_path),
            "model.name": "tiny-llama",
            "model.max_length": 32,
            "data.limit": 60,
            "data.eval_examples": 4,
            "federation.clients": CLIENTS,
            "train.local_steps": 2,
            "train.batch_size": 2,
            "eval.max_new_tokens": 2,
            **overrides,
        },
    )


def _run(config: RunConfig, stop_at: int | None = None) -> RunFolder:
    """The run whole, or stopped when round ``stop_at`` is sent and resumed."""
    return run(config, stop_at).folder


def _adapter(folder: RunFolder) -> dict[str, torch.Tensor]:
    return folder.read_checkpoint_tensors(folder.checkpoint_record())


def _rows(folder: RunFolder) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r.items() if k not in ("seconds", "eval_s")}
        for r in folder.read_metrics()
    ]


def _files(folder: RunFolder) -> dict[str, str]:
    root = folder.path / "checkpoint"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunFolder]:
    """FedAvg, FedAdam and FedAvgM, whole and stopped-then-resumed (five runs)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("runs")
    out = {"fedavg": _run(_config(tmp, "fedavg", {}))}
    for name in ("fedadam", "fedavgm"):
        config = _config(tmp, name, {"server_opt.name": name})
        out[name] = _run(config)
        out[f"{name}-resumed"] = _run(config, stop_at=3)
    return out


def test_fedadam_moves_the_adapter_elsewhere_and_rows_name_it(
    runs: dict[str, RunFolder],
) -> None:
    """Breaks if the optimizer is not applied (the adapters would be equal)
    or its name is missing from the rows (it is absent from a FedAvg row)."""
    adam, avg = _adapter(runs["fedadam"]), _adapter(runs["fedavg"])
    assert set(adam) == set(avg)
    assert any(not torch.equal(adam[k], avg[k]) for k in adam)
    rows = runs["fedadam"].read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["server_opt"] == "fedadam" for r in rows[1:])
    assert all("server_opt" not in r for r in runs["fedavg"].read_metrics())
    state = runs["fedadam"].checkpoint_record()
    assert state["server_opt"]["last_round"] == 3
    assert state["extra_tensors"] == [SERVER_OPT_FILE]
    assert "server_opt" not in runs["fedavg"].checkpoint_record()
    moments = runs["fedadam"].read_checkpoint_tensors(state, file=SERVER_OPT_FILE)
    assert {k.split("/", 1)[0] for k in moments} == {"m_t", "v_t"}


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_a_stopped_run_resumes_bit_identically(
    runs: dict[str, RunFolder], name: str
) -> None:
    """Breaks if the optimizer state (moments, momentum, last round) is not
    checkpointed or restored: the resumed round 3 would step from fresh state."""
    whole, resumed = runs[name], runs[f"{name}-resumed"]
    assert resumed.read_status().state == "completed"
    a, b = _adapter(whole), _adapter(resumed)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(whole) == _rows(resumed)
    sa = whole.read_checkpoint_tensors(whole.checkpoint_record(), file=SERVER_OPT_FILE)
    sb = resumed.read_checkpoint_tensors(
        resumed.checkpoint_record(), file=SERVER_OPT_FILE
    )
    assert sa and list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _driver(folder: RunFolder) -> LoraDriver:
    config = load_config(folder.config)
    return cast(LoraDriver, build_driver(config, generate_tasks(2, seed=3)))


def test_a_damaged_optimizer_file_is_refused_and_left_alone(
    runs: dict[str, RunFolder],
) -> None:
    """One flipped byte of server_opt.safetensors: restore and verify refuse
    with one line naming the file; no checkpoint file changes."""
    folder = runs["fedadam"]
    path = folder.path / "checkpoint" / SERVER_OPT_FILE
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF
    try:
        path.write_bytes(bytes(damaged))
        before = _files(folder)
        driver = _driver(folder)
        kept = {k: v.clone() for k, v in driver.adapter.items()}
        for call in (lambda: driver.restore(folder), folder.verify_checkpoint):
            with pytest.raises(CheckpointError) as err:
                call()
            assert SERVER_OPT_FILE in str(err.value)
            assert "\n" not in str(err.value)
        assert _files(folder) == before
        assert all(torch.equal(kept[k], driver.adapter[k]) for k in kept)
    finally:
        path.write_bytes(original)


def test_sealed_but_invalid_or_missing_optimizer_state_is_refused(
    runs: dict[str, RunFolder], tmp_path: Path
) -> None:
    """A correctly sealed checkpoint whose v_t is negative, one without any
    optimizer state, and one of other settings: each a one-line
    CheckpointError naming the problem; the driver keeps its state."""
    source = runs["fedadam"]
    state = source.checkpoint_record()
    adapter = _adapter(source)
    moments = source.read_checkpoint_tensors(state, file=SERVER_OPT_FILE)
    own = {
        k: v
        for k, v in state.items()
        if k not in ("round", "spec_fingerprint", "tensors", "extra_tensors")
    }
    fingerprint = state["spec_fingerprint"]
    bad = {k: (-v - 1 if k.startswith("v_t/") else v) for k, v in moments.items()}
    negative = RunFolder(tmp_path / "negative")
    negative.write_checkpoint(
        3, fingerprint, own, adapter, extra_tensors={SERVER_OPT_FILE: bad}
    )
    bare = RunFolder(tmp_path / "bare")
    bare.write_checkpoint(3, fingerprint, {"metrics": {}}, adapter)
    driver = _driver(source)
    assert "server_opt=fedadam(eta=0.01)" in driver.strategy.summary()
    for folder, match in ((negative, ">= 0"), (bare, "no server optimizer state")):
        with pytest.raises(CheckpointError, match=match) as err:
            driver.restore(folder)
        assert "\n" not in str(err.value)
    assert driver.server_opt.state()["meta"]["last_round"] == 0
    other = load_config(
        source.config, {"server_opt.name": "fedyogi", "run.output_dir": "x"}
    )
    yogi = cast(LoraDriver, build_driver(other, generate_tasks(2, seed=3)))
    with pytest.raises(CheckpointError, match="saved with"):
        yogi.restore(source)
    plain = load_config(source.config, {"server_opt.name": "none"})
    with pytest.raises(CheckpointError, match="this run's server_opt.name is 'none'"):
        build_driver(plain, generate_tasks(2, seed=3)).restore(source)


def test_config_refuses_what_is_not_wired(tmp_path: Path) -> None:
    """Server optimizers and the proximal term are LoRA's only; mu >= 0;
    the section's defaults are ServerOptSettings' and name every optimizer."""
    with pytest.raises(ConfigError, match="server optimizers cover lora"):
        _config(tmp_path, "x", {"run.method": "fedkseed", "server_opt.name": "fedadam"})
    with pytest.raises(ConfigError, match="train.proximal_mu"):
        _config(tmp_path, "x", {"train.proximal_mu": -0.1})
    with pytest.raises(ConfigError, match="proximal term covers lora, not 'sfprompt'"):
        _config(tmp_path, "x", {"run.method": "sfprompt", "train.proximal_mu": 0.1})
    with pytest.raises(ConfigError, match="server_opt.name"):
        _config(tmp_path, "x", {"server_opt.name": "sgd"})
    config = _config(tmp_path, "x", {})
    assert ServerOptSettings(**config.server_opt.model_dump()) == ServerOptSettings()
    field = type(config.server_opt).model_fields["name"]
    assert set(field.annotation.__args__) == set(SERVER_OPTIMIZERS)  # type: ignore[union-attr]
    # allowed together with central DP (post-processing) and SecAgg+
    _config(
        tmp_path,
        "x",
        {
            "server_opt.name": "fedyogi",
            "privacy.mode": "central",
            "train.proximal_mu": 1,
        },
    )


def test_proximal_mu_reaches_the_client(tmp_path: Path, flower_identity: None) -> None:
    """The instruction a client decodes carries train.proximal_mu (and none
    means 0), and the strategy's summary states it."""
    config = _config(tmp_path, "x", {"train.proximal_mu": 0.25})
    driver = cast(LoraDriver, build_driver(config, generate_tasks(2, seed=3)))
    (message,) = driver.configure(1, {7: "p0007"})
    ins = decode_lora_train_ins(message.content)
    assert ins.config.proximal_mu == 0.25
    assert "mu=0.25" in driver.strategy.summary()
    plain = cast(
        LoraDriver, build_driver(_config(tmp_path, "y", {}), generate_tasks(2, seed=3))
    )
    (message,) = plain.configure(1, {7: "p0007"})
    assert decode_lora_train_ins(message.content).config.proximal_mu == 0.0
    assert (
        json.dumps(driver.server_opt.state()["meta"]["settings"]) == '{"name": "none"}'
    )


def test_a_step_that_overflows_refuses_the_round(
    tmp_path: Path, flower_identity: None
) -> None:
    """FedAdam with eta 1e300 steps to inf once cast back to float32: the
    round is refused (FederationError, one line), the global adapter and the
    optimizer state are as before, and a sane optimizer accepts the same
    replies (the refusal is the step's, not the replies')."""
    examples = generate_tasks(2, seed=3)
    huge = _config(
        tmp_path, "x", {"server_opt.name": "fedadam", "server_opt.eta": 1e300}
    )
    driver = cast(LoraDriver, build_driver(huge, examples))
    before = {k: v.clone() for k, v in driver.adapter.items()}
    (ins,) = driver.configure(1, {7: "p0007"})
    moved = {k: v + 0.01 for k, v in driver.adapter.items()}
    res = LoraTrainRes(adapter=moved, num_examples=4, train_loss=1.0)
    replies = [("p0007", Message(encode_lora_train_res(res), reply_to=ins))]
    with pytest.raises(FederationError, match="fedadam refused") as err:
        driver.apply(1, replies)
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], driver.adapter[k]) for k in before)
    assert driver.server_opt.state()["meta"]["last_round"] == 0
    assert driver.server_opt.state()["tensors"] == {}
    sane = _config(tmp_path, "y", {"server_opt.name": "fedadam"})
    ok = cast(LoraDriver, build_driver(sane, examples))
    ok.configure(1, {7: "p0007"})
    assert ok.apply(1, replies).extra["server_opt"] == "fedadam"
    assert ok.server_opt.state()["meta"]["last_round"] == 1
