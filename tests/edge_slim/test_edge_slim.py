"""The edge client in its own slim environment: no torch, a server's real history.

Run by ``.ci/run`` in the edge environment (``pip install --no-deps -e .``
plus ``edge-requirements.txt``) as ``pytest -m edge_slim tests/edge_slim``,
on a fixture the full environment wrote (:mod:`tests.edge_slim.make_fixture`,
folder named by ``$POLLINATE_EDGE_FIXTURE``): an edge bundle, a real
``train.zo`` instruction of the server's driver after two rounds of torch
clients, and the server's model hash after every round, computed with torch.

Every test fails if torch, transformers, peft or accelerate can be imported
here (this is the environment an edge device has), and fails, not skips,
without the fixture. The default suite deselects the ``edge_slim`` marker.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from client.app import build_client_app
from client.edge.engine import EdgeModel
from client.edge.trainer import edge_local_steps
from corpora import read_jsonl
from protocols.edge_bundle import read_bundle
from protocols.messages import RoundSchedule
from protocols.model_hash import state_hash
from protocols.philox import candidate_seeds
from protocols.seed_arrays import apply_seed_sum_arrays
from protocols.zo_messages import (
    MESSAGE_TRAIN_ZO,
    ZoTrainIns,
    decode_zo_train_ins,
    decode_zo_train_res,
)

pytestmark = pytest.mark.edge_slim

FIXTURE_ENV = "POLLINATE_EDGE_FIXTURE"
NOT_HERE = ("torch", "transformers", "peft", "accelerate")


@pytest.fixture(autouse=True)
def _no_torch() -> None:
    """This is an edge device's environment: none of the torch stack."""
    present = [name for name in NOT_HERE if importlib.util.find_spec(name)]
    assert not present, f"{present} importable: not the slim edge environment"


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    value = os.environ.get(FIXTURE_ENV)
    if not value:
        pytest.fail(
            f"set {FIXTURE_ENV} to a folder written by "
            "python -m tests.edge_slim.make_fixture (in the full environment)"
        )
    return Path(value)


@pytest.fixture(scope="module")
def expected(fixture_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((fixture_dir / "expected.json").read_text())
    return data


def _content(fixture_dir: Path) -> RecordDict:
    proto = ProtoRecordDict.FromString((fixture_dir / "train_ins.bin").read_bytes())
    return recorddict_from_proto(proto)


@pytest.fixture(scope="module")
def ins(fixture_dir: Path) -> ZoTrainIns:
    return decode_zo_train_ins(_content(fixture_dir))


def test_numpy_replay_reaches_the_servers_torch_hashes_bit_for_bit(
    fixture_dir: Path, ins: ZoTrainIns, expected: dict[str, Any]
) -> None:
    """w0 from the bundle, then each round of the server's history applied
    with NumPy: the hash equals the one the server computed with torch,
    after every round."""
    hashes = expected["hashes"]
    bundle = read_bundle(fixture_dir / "bundle")
    bundle.check_spec(ins.spec)
    params = bundle.load_w0()
    assert state_hash(params) == hashes[0]
    pool = candidate_seeds(ins.spec.master_seed, ins.spec.num_seeds)
    assert [d.round for d in ins.history] == list(range(1, len(hashes)))
    for delta in ins.history:
        seeds = [pool[i] for i in delta.indices.tolist()]
        apply_seed_sum_arrays(params, seeds, delta.coefficients.tolist())
        assert state_hash(params) == hashes[delta.round], delta.round
    assert ins.target_hash == hashes[-1]


def test_mezo_steps_on_onnx_runtime_move_the_model_and_repeat_exactly(
    fixture_dir: Path, ins: ZoTrainIns
) -> None:
    """Three MeZO steps on the bundle's graph: finite scalars, the weights
    move, and the same round's steps from the same start repeat bit for bit."""
    examples = read_jsonl(fixture_dir / "data.jsonl")
    config = RoundSchedule(server_round=3, local_steps=3, batch_size=2, seed=0)
    pool = candidate_seeds(ins.spec.master_seed, ins.spec.num_seeds)
    runs = []
    for _ in range(2):
        model = EdgeModel.open(fixture_dir / "bundle", threads=1)
        tokenized = [model.tokenize(e.prompt, e.response) for e in examples]
        w0 = [a.copy() for _, a in model.params()]
        stats = edge_local_steps(
            model,
            tokenized,
            config,
            seeds=pool,
            eps=ins.spec.eps,
            learning_rate=ins.spec.learning_rate,
            probabilities=None,
            label="edge",
        )
        assert stats.skipped == 0 and len(stats.scalars) == 3
        assert np.isfinite(stats.scalars).all() and math.isfinite(stats.mean_loss)
        moved = [
            not np.array_equal(a, b)
            for (_, a), b in zip(model.params(), w0, strict=True)
        ]
        assert any(moved), "the steps left every weight as it was"
        runs.append(
            (stats.indices.tolist(), stats.scalars.tolist(), state_hash(model.params()))
        )
    assert runs[0] == runs[1]


def test_the_edge_client_app_syncs_to_the_servers_hash_and_trains(
    fixture_dir: Path,
    expected: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flower_identity: None,
) -> None:
    """The real ClientApp of an ``onnx`` node answers the server's round-3
    instruction: it replays rounds 1-2 from w0 to the server's hash, trains
    the round's steps, and reports that hash, as a torch client does."""
    monkeypatch.setenv("POLLINATE_ZO_STATE_DIR", str(tmp_path / "zo-state"))
    message = Message(_content(fixture_dir), 9, MESSAGE_TRAIN_ZO)
    context = Context(
        run_id=7,
        node_id=9,
        node_config={
            "data-path": str(fixture_dir / "data.jsonl"),
            "label": "edge",
            "runtime": "onnx",
            "bundle": str(fixture_dir / "bundle"),
        },
        state=RecordDict(),
        run_config={},
    )
    reply = build_client_app()(message, context)
    assert not reply.has_error(), reply.error.reason
    steps = expected["local_steps"]
    ins = decode_zo_train_ins(_content(fixture_dir))
    res = decode_zo_train_res(
        reply.content, num_seeds=ins.spec.num_seeds, max_steps=steps
    )
    assert res.synced_round == expected["round"] - 1
    assert res.synced_hash == expected["hashes"][-1]
    assert len(res.scalars) + res.skipped_steps == steps and len(res.scalars) > 0
    assert np.isfinite(res.scalars).all()
