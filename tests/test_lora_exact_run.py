"""FedEx-LoRA (``lora.aggregation = "exact"``) in whole runs, on both sides.

Tiny-llama in process (:mod:`tests.lora_runs`). After every round the model
the server evaluates is base + residual + (alpha/r) B A, and that equals base
plus the weighted mean of what the clients trained from (residual + their
(alpha/r) B_i A_i); the residual travels to the clients, is checkpointed,
resumes bit-exactly, is refused when damaged, goes into the final artefact
and into ``merged`` export. A client folds the residual into its model's base
weights from a pristine copy and never keeps a stale one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from safetensors.torch import load_file

import models
from cli.main import main
from client.lora_handler import apply_residual, handle
from client.node import NodeSettings
from client.runtime import ClientRuntime
from corpora import generate_tasks, write_jsonl
from protocols import (
    MESSAGE_TRAIN_LORA,
    LocalTrainConfig,
    LoraSpec,
    LoraTrainIns,
    ProtocolError,
    encode_lora_train_ins,
)
from protocols.run_folder import CheckpointError, RunFolder, RunFolderError
from server.app import build_driver
from server.config import load_config
from server.export import adapter_note, export_run
from server.federation import FederationError
from server.lora_driver import RESIDUAL_FILE, LoraDriver
from strategies.lora import LoraAggregate
from strategies.lora_factors import fold_residual
from tests.lora_runs import (
    Recorded,
    checkpoint,
    equal,
    lora_config,
    module_prefixes,
    run,
)

CLIENTS = 3
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Recorded]:
    """An exact run whole, and the same run stopped at round 3 and resumed."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("exact")
    overrides = {
        "lora.aggregation": "exact",
        "lora.rank": RANK,
        "lora.alpha": ALPHA,
    }
    config = lora_config(tmp, "exact", CLIENTS, overrides)
    return {"whole": run(config), "resumed": run(config, stop_at=3)}


def _product(adapter: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    a = adapter[f"{prefix}.lora_A.weight"].float()
    b = adapter[f"{prefix}.lora_B.weight"].float()
    return SCALE * (b @ a)


def test_each_round_is_the_weighted_mean_of_the_clients_products(
    runs: dict[str, Recorded],
) -> None:
    """Breaks if the increment is not added, is added to the live weight
    twice, or the server model is not re-folded: base + R_t + s B_t A_t must
    equal base + R_{t-1} + sum_i w_i s B_i A_i (w_i = examples share), the
    live base weight must be exactly fold(pristine, R_t), and the next
    round's instruction carries R_t and the adapter evaluated."""
    rec = runs["whole"]
    assert len(rec.evaluated) == 4 and len(rec.rounds) == 3
    base0 = rec.evaluated[0][2]
    assert rec.evaluated[0][1] == {}
    for t in (1, 2, 3):
        adapter, residual, bases = rec.evaluated[t]
        rnd = rec.rounds[t - 1]
        prev = [ins.residual for ins in rnd.ins.values()]
        assert all(equal(p, prev[0]) for p in prev)  # every node got the same one
        assert equal(prev[0], rec.evaluated[t - 1][1])
        total = sum(r.num_examples for r in rnd.res.values())
        prefixes = module_prefixes(adapter)
        assert set(residual) == set(prefixes)
        for p in prefixes:
            want = base0[p] + prev[0].get(p, torch.zeros_like(base0[p]))
            for res in rnd.res.values():
                want = want + (res.num_examples / total) * _product(res.adapter, p)
            got = bases[p] + _product(adapter, p)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert torch.equal(bases[p], fold_residual(base0[p], residual[p]))
        # the exact step is not plain FedAvg: the residual moved this round
        zero = torch.zeros_like(base0[prefixes[0]])
        assert all(not torch.equal(residual[p], prev[0].get(p, zero)) for p in prefixes)
        if t < 3:
            nxt = next(iter(rec.rounds[t].ins.values()))
            assert equal(nxt.adapter, adapter) and equal(nxt.residual, residual)


def test_a_stopped_run_resumes_bit_identically(runs: dict[str, Recorded]) -> None:
    """Breaks if the residual is not checkpointed or restored (the resumed
    round 3 would start from zero residual and end elsewhere)."""
    whole, resumed = runs["whole"].folder, runs["resumed"].folder
    assert resumed.read_status().state == "completed"
    assert equal(checkpoint(whole), checkpoint(resumed))
    rw, rr = checkpoint(whole, RESIDUAL_FILE), checkpoint(resumed, RESIDUAL_FILE)
    assert rw and equal(rw, rr)
    assert all(v.dtype == torch.float32 for v in rw.values())
    assert equal(rw, runs["whole"].evaluated[-1][1])
    art = [f.artefact("adapter") / RESIDUAL_FILE for f in (whole, resumed)]
    assert equal(load_file(art[0]), load_file(art[1]))
    rows = [
        [
            {k: v for k, v in r.items() if k not in ("seconds", "eval_s")}
            for r in f.read_metrics()
        ]
        for f in (whole, resumed)
    ]
    assert rows[0] == rows[1]


def _driver(folder: RunFolder) -> LoraDriver:
    config = load_config(folder.config)
    return cast(LoraDriver, build_driver(config, generate_tasks(2, seed=3)))


def _live_bases(driver: LoraDriver) -> dict[str, torch.Tensor]:
    return {
        p: driver.model.get_submodule(p).get_base_layer().weight.detach().clone()
        for p in module_prefixes(driver.adapter)
    }


def test_restore_folds_the_residual_into_the_server_model(
    runs: dict[str, Recorded],
) -> None:
    """A fresh driver restored from the checkpoint evaluates the model the
    run ended with: same adapter, residual and live base weights, bit for bit."""
    rec = runs["whole"]
    driver = _driver(rec.folder)
    assert driver.restore(rec.folder) == 3
    adapter, residual, bases = rec.evaluated[-1]
    assert equal(driver.adapter, adapter) and equal(driver.residual, residual)
    assert equal(_live_bases(driver), bases)


def test_a_damaged_or_wrong_residual_is_refused(
    runs: dict[str, Recorded], tmp_path: Path
) -> None:
    """One flipped byte of residual.safetensors, and a sealed checkpoint whose
    residual has the wrong shape or names an unknown module: each a one-line
    CheckpointError; the driver keeps its (empty) residual and pristine model."""
    folder = runs["whole"].folder
    path = folder.path / "checkpoint" / RESIDUAL_FILE
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF
    driver = _driver(folder)
    pristine = _live_bases(driver)
    try:
        path.write_bytes(bytes(damaged))
        for call in (lambda: driver.restore(folder), folder.verify_checkpoint):
            with pytest.raises(CheckpointError) as err:
                call()
            assert RESIDUAL_FILE in str(err.value) and "\n" not in str(err.value)
    finally:
        path.write_bytes(original)
    state = folder.checkpoint_record()
    adapter, residual = checkpoint(folder), checkpoint(folder, RESIDUAL_FILE)
    own = {
        k: v
        for k, v in state.items()
        if k not in ("round", "spec_fingerprint", "tensors", "extra_tensors")
    }
    first = next(iter(residual))
    bad = {
        "shape": {**residual, first: residual[first][:, :-1].contiguous()},
        "module": {**residual, "base_model.model.nowhere": residual[first].clone()},
        "dtype": {**residual, first: residual[first].double()},
    }
    for what, tensors in bad.items():
        wrong = RunFolder(tmp_path / what)
        wrong.write_checkpoint(
            3,
            state["spec_fingerprint"],
            own,
            adapter,
            extra_tensors={RESIDUAL_FILE: tensors},
        )
        with pytest.raises(CheckpointError, match=RESIDUAL_FILE) as err:
            driver.restore(wrong)
        assert "\n" not in str(err.value)
    assert driver.residual == {}
    assert equal(_live_bases(driver), pristine)


def test_export_merged_is_the_evaluated_model_and_adapter_carries_the_residual(
    runs: dict[str, Recorded], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``merged`` weights equal base + residual + s B A of the model the
    server evaluated last; ``adapter`` holds residual.safetensors under its
    manifest and says the adapter alone is not the model; a damaged residual
    in the artefact is refused by export."""
    rec = runs["whole"]
    adapter, residual, bases = rec.evaluated[-1]
    merged = export_run(rec.folder.path, tmp_path / "merged", "merged")
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(merged.glob("*.safetensors")):
        weights.update(load_file(f))
    for p in module_prefixes(adapter):
        name = p.removeprefix("base_model.model.") + ".weight"
        want = bases[p] + _product(adapter, p)
        torch.testing.assert_close(weights[name], want, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(residual[p], torch.zeros_like(residual[p]))
    out = export_run(rec.folder.path, tmp_path / "adapter", "adapter")
    assert equal(load_file(out / RESIDUAL_FILE), residual)
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert RESIDUAL_FILE in files
    note = adapter_note(out)
    assert note is not None and "not the model" in note and "\n" not in note
    assert (
        main(
            [
                "export",
                str(rec.folder.path),
                "--format",
                "adapter",
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    assert "not the model" in capsys.readouterr().err
    art = rec.folder.artefact("adapter") / RESIDUAL_FILE
    original = art.read_bytes()
    try:
        art.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        with pytest.raises(RunFolderError, match=RESIDUAL_FILE):
            export_run(rec.folder.path, tmp_path / "again", "merged")
    finally:
        art.write_bytes(original)


# -- the client side ------------------------------------------------------------------

SPEC = LoraSpec(
    model="tiny-llama",
    max_length=32,
    rank=RANK,
    alpha=ALPHA,
    aggregation="exact",
)
CONFIG = LocalTrainConfig(
    server_round=1,
    local_steps=1,
    batch_size=2,
    learning_rate=1e-3,
    weight_decay=0.0,
    seed=0,
)


def _instruction(
    spec: LoraSpec,
    adapter: dict[str, torch.Tensor],
    residual: dict[str, torch.Tensor],
    rank: int = RANK,
) -> Message:
    ins = LoraTrainIns(spec, CONFIG, adapter, client_rank=rank, residual=residual)
    return Message(
        encode_lora_train_ins(ins), dst_node_id=5, message_type=MESSAGE_TRAIN_LORA
    )


def test_the_client_folds_the_residual_and_never_keeps_a_stale_one(
    tmp_path: Path, flower_identity: None
) -> None:
    """Round with a residual: the cached model's adapted base weights are
    fold(pristine, R), the others pristine; next instruction without one, and
    one of another rank and spec (the cached base model is rebuilt): pristine
    bit for bit. A residual for a module the model lacks is refused in one
    line and leaves the weights alone."""
    torch.set_num_threads(1)
    data = tmp_path / "node.jsonl"
    write_jsonl(generate_tasks(8, seed=3), data)
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"data-path": str(data)},
        state=RecordDict(),
        run_config={},
    )
    node = NodeSettings.from_context(context)
    runtime = ClientRuntime()
    lora0 = models.attach_lora(models.load_causal_lm("tiny-llama").model, SPEC)
    adapter = models.adapter_tensors(lora0)
    prefixes = module_prefixes(adapter)
    pristine = {
        p: lora0.get_submodule(p).get_base_layer().weight.detach().clone()
        for p in prefixes
    }
    g = torch.Generator().manual_seed(0)
    folded = prefixes[::2]  # some modules only: the others must stay pristine
    residual = {p: 0.1 * torch.randn(pristine[p].shape, generator=g) for p in folded}

    def live(rank: int = RANK, spec: LoraSpec = SPEC) -> dict[str, torch.Tensor]:
        model = runtime.lora_model(spec.at_rank(rank), node.device).model
        return {p: model.get_submodule(p).get_base_layer().weight for p in prefixes}

    reply = handle(_instruction(SPEC, adapter, residual), context, node, runtime)
    assert not reply.has_error()
    weights = live()
    for p in prefixes:
        want = fold_residual(pristine[p], residual[p]) if p in folded else pristine[p]
        assert torch.equal(weights[p], want), p
    assert not torch.equal(weights[folded[0]], pristine[folded[0]])

    with pytest.raises(ProtocolError, match="no LoRA module") as err:
        apply_residual(
            runtime.lora_model(SPEC, node.device),
            {"base_model.model.nowhere": residual[folded[0]], **residual},
        )
    assert "\n" not in str(err.value)
    assert torch.equal(
        live()[folded[0]], fold_residual(pristine[folded[0]], residual[folded[0]])
    )

    reply = handle(_instruction(SPEC, adapter, {}), context, node, runtime)
    assert not reply.has_error()
    assert equal(dict(live()), pristine)

    handle(_instruction(SPEC, adapter, residual), context, node, runtime)
    other = LoraSpec(model="tiny-llama", max_length=32, rank=2, alpha=ALPHA)
    small = models.adapter_tensors(
        models.attach_lora(models.load_causal_lm("tiny-llama").model, other)
    )
    plain = LoraTrainIns(other, CONFIG, small)
    msg = Message(
        encode_lora_train_ins(plain), dst_node_id=5, message_type=MESSAGE_TRAIN_LORA
    )
    assert not handle(msg, context, node, runtime).has_error()
    assert equal(dict(live(2, other)), pristine)


def test_a_refused_residual_keeps_adapter_residual_and_model(
    tmp_path: Path, flower_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round whose increment is not finite is refused whole (one line):
    the adapter, the residual and the server model's base weights are as
    before; a finite increment of the same round is taken, and folded."""
    config = lora_config(tmp_path, "unit", 2, {"lora.aggregation": "exact"})
    driver = cast(LoraDriver, build_driver(config, generate_tasks(2, seed=3)))
    before, bases = (
        {k: v.clone() for k, v in driver.adapter.items()},
        _live_bases(driver),
    )
    prefix = module_prefixes(driver.adapter)[0]
    moved = {k: v + 0.01 for k, v in driver.adapter.items()}
    inc = torch.full(bases[prefix].shape, 0.5)

    def aggregate(increment: torch.Tensor) -> LoraAggregate:
        return LoraAggregate(
            adapter=moved,
            residual={prefix: increment},
            accepted=["p0000"],
            train_loss=1.0,
            num_examples=4,
        )

    monkeypatch.setattr(
        driver.strategy, "aggregate", lambda *a: aggregate(inc * torch.inf)
    )
    with pytest.raises(FederationError, match="residual") as err:
        driver.apply(1, [])
    assert "\n" not in str(err.value)
    assert equal(driver.adapter, before) and driver.residual == {}
    assert equal(_live_bases(driver), bases)
    monkeypatch.setattr(driver.strategy, "aggregate", lambda *a: aggregate(inc))
    driver.apply(1, [])
    assert equal(driver.adapter, moved) and equal(driver.residual, {prefix: inc})
    assert torch.equal(_live_bases(driver)[prefix], fold_residual(bases[prefix], inc))
