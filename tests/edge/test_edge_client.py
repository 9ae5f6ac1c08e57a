"""The edge client as a real ClientApp path: torch and onnx nodes in one federation.

The server's :class:`~server.zo_driver.ZoDriver` and the real ClientApp
(``client.app.build_client_app``) exchange real Flower messages in-process, as
in ``tests/test_fedkseed.py``; some nodes' node config says ``runtime =
"onnx"`` with the run's edge bundle, so they train on ONNX Runtime and
replay in NumPy. Every reply must prove the server's model hash.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict, UserConfigValue

from client.app import build_client_app
from client.edge.runtime import EdgeRuntime
from client.node import NodeConfigError, NodeSettings
from client.runtime import ClientRuntime
from client.snapshots import ZO_STATE_ENV
from corpora import Example, generate_tasks, write_jsonl
from models import tokenize_example
from models.edge_export import export_edge_bundle
from models.zo_model import zo_model_for
from protocols import ZOSpec, state_hash
from protocols.edge_bundle import read_bundle
from protocols.messages import (
    ERROR_NODE_SETUP,
    ERROR_OUT_OF_SYNC,
)
from protocols.seed_arrays import apply_seed_sum_arrays
from protocols.seeds import apply_seed_sum_, candidate_seeds
from protocols.zo_messages import decode_zo_train_ins, decode_zo_train_res
from server.app import build_driver
from server.config import load_config
from server.federation import FederationError
from strategies.seed_clip import clipped_pairs as np_clipped_pairs
from strategies.seed_pool import clipped_pairs as torch_clipped_pairs
from tests.torch_blocker import run_without

K = 32
STEPS = 3
SETTINGS = {
    "run.method": "fedkseed",
    "model.name": "tiny-llama",
    "model.max_length": 64,
    "zo.num_seeds": K,
    "zo.learning_rate": 1e-3,
    "zo.eps": 1e-3,
    "train.local_steps": STEPS,
    "train.batch_size": 2,
    "eval.max_new_tokens": 2,
}
EXAMPLES = generate_tasks(60, seed=1)


def _driver(**overrides: object):  # noqa: ANN202
    return build_driver(load_config(None, {**SETTINGS, **overrides}), EXAMPLES[:4])


def _export(spec: ZOSpec, out: Path, examples: list[Example]) -> Path:
    zo = zo_model_for(spec)
    tokenized = [tokenize_example(e, zo.tokenizer, spec.max_length) for e in examples]
    export_edge_bundle(zo.model, zo.tokenizer, zo.walk, spec, out, tokenized)
    return out


@pytest.fixture(scope="module")
def run_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The edge bundle of the runs below (the spec the driver builds)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    spec = _driver().spec
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    return _export(spec, tmp_path_factory.mktemp("run") / "bundle", EXAMPLES[:6])


class Node:
    """One device: a context, its own process (ClientApp and caches), a state dir."""

    def __init__(self, node_id: int, tmp: Path, bundle: Path | None) -> None:
        path = tmp / f"node{node_id}.jsonl"
        write_jsonl(EXAMPLES[node_id * 10 : node_id * 10 + 10], path)
        config: dict[str, UserConfigValue] = {
            "data-path": str(path),
            "label": f"n{node_id}",
        }
        if bundle is not None:
            config |= {"runtime": "onnx", "bundle": str(bundle)}
        self.context = Context(
            run_id=7,
            node_id=node_id,
            node_config=config,
            state=RecordDict(),
            run_config={},
        )
        self.state_dir = tmp / f"state{node_id}"
        self.restart()

    def restart(self) -> None:
        """A fresh device process: new caches, nothing in memory."""
        self.runtime = ClientRuntime()
        self.edge = EdgeRuntime()
        self.app = build_client_app(self.runtime, self.edge)

    def __call__(self, message: Message, monkeypatch: pytest.MonkeyPatch) -> Message:
        monkeypatch.setenv(ZO_STATE_ENV, str(self.state_dir))
        return self.app(message, self.context)

    def edge_state(self):  # noqa: ANN201
        return next(iter(self.edge._states.values()))


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flower_identity: None):  # noqa: ANN201
    monkeypatch.setenv("POLLINATE_CACHE_DIR", str(tmp_path / "cache"))


def _train(driver, nodes: dict[int, Node], server_round: int, mp) -> list[Message]:  # noqa: ANN001
    """One round's instructions answered by ``nodes``; each must prove the hash."""
    labels = {n: f"n{n}" for n in nodes}
    messages = driver.configure(server_round, labels)
    replies = [nodes[m.metadata.dst_node_id](m, mp) for m in messages]
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
        res = decode_zo_train_res(reply.content, num_seeds=K, max_steps=STEPS)
        assert (res.synced_round, res.synced_hash) == (server_round - 1, driver.hash)
        assert res.indices.size > 0
    return replies


def _apply(driver, replies: list[Message], server_round: int):  # noqa: ANN001, ANN202
    labelled = [(f"n{r.metadata.src_node_id}", r) for r in replies]
    return driver.apply(server_round, labelled)


def _same(arrays: list[tuple[str, np.ndarray]], tensors) -> bool:  # noqa: ANN001
    return [n for n, _ in arrays] == [n for n, _ in tensors] and all(
        np.array_equal(a, t.detach().cpu().numpy())
        for (_, a), (_, t) in zip(arrays, tensors, strict=True)
    )


def test_torch_and_edge_clients_stay_on_the_servers_hash_with_a_late_joiner(
    run_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: None
) -> None:
    """Two torch and two edge nodes, one edge node appearing at round 3 in a
    fresh process with no snapshot: every reply of every round carries the
    server's hash, and the edge model equals the server's tensor for tensor.

    Breaks if the NumPy replay is not bit-exact with the server's, the edge
    node drifts from its own training (restore), or the router sends an onnx
    node to the torch handler.
    """
    driver = _driver()
    nodes = {
        1: Node(1, tmp_path, None),
        2: Node(2, tmp_path, None),
        3: Node(3, tmp_path, run_bundle),
    }
    late = Node(4, tmp_path, run_bundle)
    hashes = [driver.hash]
    for server_round in range(1, 6):
        if server_round == 3:
            nodes[4] = late
            assert not late.state_dir.exists()  # it starts from w0
        replies = _train(driver, nodes, server_round, monkeypatch)
        result = _apply(driver, replies, server_round)
        assert result.rejected == 0 and result.clients == len(nodes)
        hashes.append(driver.hash)
    assert len(set(hashes)) == len(hashes), "some round did not change the model"
    assert nodes[1].runtime._zo and not nodes[1].edge._states  # torch node
    assert not late.runtime._zo  # the edge nodes never built a torch model
    # Sync both edge nodes to the final model: their arrays are the server's.
    messages = driver.configure(6, {3: "n3", 4: "n4"})
    for node in (nodes[3], late):
        (message,) = [
            m for m in messages if m.metadata.dst_node_id == node.context.node_id
        ]
        assert not node(message, monkeypatch).has_error()
        state = node.edge_state()
        assert state.round == 5 and state.hash == driver.hash
        assert _same(state.params, driver.params)


def test_fedkseed_pro_sends_importances_that_edge_clients_sample_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: None
) -> None:
    """FedKSeed-Pro: from round 2 the instruction carries importances, the
    edge node draws by them and still reports the server's hash.

    Breaks if the edge handler mishandles ``ins.probabilities()`` or Pro's
    spec differs from what the bundle checks.
    """
    driver = _driver(**{"run.method": "fedkseed-pro"})
    bundle = _export(driver.spec, tmp_path / "pro-bundle", EXAMPLES[:6])
    nodes = {1: Node(1, tmp_path, None), 3: Node(3, tmp_path, bundle)}
    for server_round in (1, 2, 3):
        replies = _train(driver, nodes, server_round, monkeypatch)
        assert _apply(driver, replies, server_round).rejected == 0
    ins = decode_zo_train_ins(driver.configure(4, {3: "n3"})[0].content)
    assert ins.importance is not None and len(set(ins.importance.tolist())) > 1


def test_numpy_replay_of_real_histories_equals_the_torch_replay(
    run_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: None
) -> None:
    """The full history a late joiner receives, replayed round by round from
    w0 in NumPy and in torch: every tensor equal (``np.array_equal``) and the
    hashes the same after every round, and the last one the server's.

    Breaks if :func:`apply_seed_sum_arrays` and :func:`apply_seed_sum_` differ
    in any bit (generator, coefficient rounding, accumulation order).
    """
    driver = _driver()
    nodes = {1: Node(1, tmp_path, None), 3: Node(3, tmp_path, run_bundle)}
    for server_round in (1, 2, 3, 4):
        replies = _train(driver, nodes, server_round, monkeypatch)
        _apply(driver, replies, server_round)
    ins = decode_zo_train_ins(driver.configure(5, {9: "n9"})[0].content)
    assert ins.base_round == 0 and [d.round for d in ins.history] == [1, 2, 3, 4]
    assert all(len(set(d.indices.tolist())) > 1 for d in ins.history)
    arrays = read_bundle(run_bundle).load_w0()
    tensors = [(n, torch.from_numpy(a.copy())) for n, a in arrays]
    seeds = candidate_seeds(driver.spec.master_seed, driver.spec.num_seeds)
    for delta in ins.history:
        picked = [seeds[i] for i in delta.indices.tolist()]
        apply_seed_sum_arrays(arrays, picked, delta.coefficients.tolist())
        apply_seed_sum_(tensors, picked, delta.coefficients.tolist())
        assert _same(arrays, tensors)
        assert state_hash(arrays) == state_hash(tensors)
    assert state_hash(arrays) == ins.target_hash == driver.hash


def _tamper_walk(bundle: Path) -> str:
    record = json.loads((bundle / "bundle.json").read_text())
    record["walk"]["fingerprint"] = "0" * 16
    (bundle / "bundle.json").write_text(json.dumps(record))
    return "walk fingerprint"


def _tamper_w0(bundle: Path) -> str:
    data = bytearray((bundle / "w0.safetensors").read_bytes())
    data[-3] ^= 0x01
    (bundle / "w0.safetensors").write_bytes(bytes(data))
    return "w0.safetensors sha256"


@pytest.mark.parametrize("tamper", [_tamper_walk, _tamper_w0])
def test_a_tampered_bundle_is_refused_and_the_global_model_is_unchanged(
    tamper,  # noqa: ANN001
    run_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cache: None,
) -> None:
    """An altered bundle gets a setup-error reply naming what differs; the
    round then has no update and the server's model stays as it was."""
    bundle = Path(shutil.copytree(run_bundle, tmp_path / "tampered"))
    expect = tamper(bundle)
    driver = _driver()
    node = Node(3, tmp_path, bundle)
    (message,) = driver.configure(1, {3: "n3"})
    reply = node(message, monkeypatch)
    assert reply.has_error() and reply.error.code == ERROR_NODE_SETUP
    assert "EdgeBundleError" in reply.error.reason and expect in reply.error.reason
    before = (driver.hash, [p.clone() for _, p in driver.params])
    with pytest.raises(FederationError, match="n3"):
        _apply(driver, [reply], 1)
    assert driver.hash == before[0] == state_hash(driver.params)
    assert all(
        torch.equal(a, b) for (_, a), b in zip(driver.params, before[1], strict=True)
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"zo.eps": 2e-3}, "ZOSpec.eps"), ({"model.max_length": 32}, "max_length")],
)
def test_a_server_spec_other_than_the_bundles_is_refused_naming_the_field(
    overrides: dict[str, object],
    field: str,
    run_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cache: None,
) -> None:
    """A bundle made for another spec (eps, max length) cannot join the run."""
    driver = _driver(**overrides)
    node = Node(3, tmp_path, run_bundle)
    (message,) = driver.configure(1, {3: "n3"})
    reply = node(message, monkeypatch)
    assert reply.has_error() and reply.error.code == ERROR_NODE_SETUP
    assert field in reply.error.reason and "export a new bundle" in reply.error.reason
    assert not node.state_dir.exists()  # nothing synced, nothing written


def test_a_damaged_snapshot_is_removed_and_refused(
    run_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: None
) -> None:
    """A fresh process of an edge node resumes from its snapshot; a flipped
    byte in it makes the node remove it and answer out-of-sync, after which
    the server's full history brings it back to the server's hash."""
    driver = _driver()
    nodes = {3: Node(3, tmp_path, run_bundle)}
    for server_round in (1, 2):
        _apply(driver, _train(driver, nodes, server_round, monkeypatch), server_round)
    (snapshot,) = sorted(nodes[3].state_dir.rglob("round-000001-*.safetensors"))
    data = bytearray(snapshot.read_bytes())
    data[-5] ^= 0x10
    snapshot.write_bytes(bytes(data))
    nodes[3].restart()
    (message,) = driver.configure(3, {3: "n3"})
    assert decode_zo_train_ins(message.content).base_round == 1
    reply = nodes[3](message, monkeypatch)
    assert reply.has_error() and reply.error.code == ERROR_OUT_OF_SYNC
    assert str(snapshot) in reply.error.reason and "damaged" in reply.error.reason
    assert not snapshot.exists()
    assert nodes[3].edge_state().round == 0  # back at w0, not half a snapshot
    with pytest.raises(FederationError):
        _apply(driver, [reply], 3)  # the server learns: full history next time
    (again,) = driver.configure(3, {3: "n3"})
    assert decode_zo_train_ins(again.content).base_round == 0
    _train(driver, nodes, 3, monkeypatch)


def test_node_config_runtime_and_bundle_are_checked(tmp_path: Path) -> None:
    """Unknown runtime, onnx without bundle, bundle with torch, onnx off the
    CPU: each one NodeConfigError line; a good onnx node config parses."""

    def parse(cfg: dict[str, str]) -> NodeSettings:
        config: dict[str, UserConfigValue] = dict(cfg)
        ctx = Context(
            run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={}
        )
        return NodeSettings.from_context(ctx)

    data = str(tmp_path / "d.jsonl")
    for cfg, expect in (
        ({"runtime": "tflite"}, "'runtime' is 'tflite'"),
        ({"runtime": "onnx"}, "no 'bundle'"),
        ({"bundle": "/b"}, "needs 'runtime'"),
        ({"runtime": "onnx", "bundle": "/b", "device": "cuda"}, "CPU only"),
    ):
        with pytest.raises(NodeConfigError, match=expect) as info:
            parse({"data-path": data, **cfg})
        assert "\n" not in str(info.value)
    node = parse({"data-path": data, "runtime": "onnx", "bundle": "/b"})
    assert (node.runtime, node.bundle, node.device_name) == ("onnx", Path("/b"), "cpu")
    torch_node = parse({"data-path": data})
    assert (torch_node.runtime, torch_node.bundle) == ("torch", None)
    assert torch_node.device == torch.device("cpu")


def test_a_simulated_partition_runs_onnx_iff_the_run_folder_names_a_bundle(
    run_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``RunFolder.edge_bundle`` decides a partition's runtime; a damaged
    partition list is a node setup error (one line), not a crash."""
    from protocols.run_errors import RunFolderError
    from protocols.run_folder import RUN_DIR_KEY, RunFolder

    def edge_bundle(self: RunFolder, pid: int) -> Path | None:
        if pid == 3:
            raise RunFolderError("partitions.json is damaged")
        return run_bundle if pid == 1 else None

    monkeypatch.setattr(RunFolder, "edge_bundle", edge_bundle)

    def parse(pid: int) -> NodeSettings:
        ctx = Context(
            run_id=1,
            node_id=pid + 1,
            node_config={"partition-id": pid, "num-partitions": 4, "device": "cuda:0"},
            state=RecordDict(),
            run_config={RUN_DIR_KEY: str(tmp_path)},
        )
        return NodeSettings.from_context(ctx)

    edge = parse(1)
    assert (edge.runtime, edge.bundle, edge.device_name) == ("onnx", run_bundle, "cpu")
    assert edge.state_dir == RunFolder(tmp_path).zo_state
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plain = parse(0)
    assert (plain.runtime, plain.bundle, plain.device_name) == ("torch", None, "cuda:0")
    with pytest.raises(NodeConfigError, match="partitions.json is damaged"):
        parse(3)


def test_an_edge_node_refuses_other_training_naming_the_action(
    run_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: None
) -> None:
    """A LoRA instruction to an onnx node is a setup-error reply naming it;
    a SecAgg+ stage is refused before the torch-only SecAgg+ code loads."""
    node = Node(3, tmp_path, run_bundle)
    message = Message(RecordDict(), dst_node_id=3, message_type="train.lora")
    reply = node(message, monkeypatch)
    assert reply.has_error() and reply.error.code == ERROR_NODE_SETUP
    assert "onnx runtime" in reply.error.reason and "'lora'" in reply.error.reason
    assert not node.runtime._models  # no torch model was built for it
    secagg = Message(RecordDict(), dst_node_id=3, message_type="train")
    with pytest.raises(NodeConfigError, match="does not support SecAgg"):
        node(secagg, monkeypatch)


def test_client_side_clipping_on_an_edge_node(
    run_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: None
) -> None:
    """With a ``client-clip`` record the edge reply is one pair per distinct
    seed, increasing, its L2 norm at most C; and the NumPy clip is the torch
    client's (same seeds, values equal to float32 rounding)."""
    from protocols.messages import ClientClip
    from protocols.zo_messages import encode_zo_train_ins

    driver = _driver(**{"train.local_steps": 8})
    node = Node(3, tmp_path, run_bundle)
    (message,) = driver.configure(1, {3: "n3"})
    ins = dataclasses.replace(
        decode_zo_train_ins(message.content), client_clip=ClientClip(1e-3)
    )
    clipped = Message(encode_zo_train_ins(ins), dst_node_id=3, message_type="train.zo")
    reply = node(clipped, monkeypatch)
    assert not reply.has_error(), reply.error.reason
    res = decode_zo_train_res(reply.content, num_seeds=K, max_steps=8)
    assert res.indices.size >= 1 and bool(np.all(np.diff(res.indices) > 0))
    assert float(np.linalg.norm(res.scalars.astype(np.float64))) <= 1e-3 * (1 + 1e-6)

    rng = np.random.default_rng(0)
    idx = rng.integers(0, 8, size=20).astype(np.int32)
    g = rng.normal(size=20).astype(np.float32)
    for clip in (0.5, 100.0):
        seeds_np, values_np = np_clipped_pairs(idx, g, clip_norm=clip)
        seeds_t, values_t = torch_clipped_pairs(
            torch.from_numpy(idx), torch.from_numpy(g), clip_norm=clip
        )
        assert np.array_equal(seeds_np, seeds_t.numpy())
        assert seeds_np.dtype == np.int32 and values_np.dtype == np.float32
        np.testing.assert_allclose(values_np, values_t.numpy(), rtol=1e-6)


EDGE_PROCESS = """
import os, sys
from pathlib import Path

os.environ["POLLINATE_ZO_STATE_DIR"] = {state!r}
import client.app as client_app
from flwr.app import Context, Message, RecordDict, UserConfigValue
from flwr.supercore.task_identity import TaskIdentity

from protocols.edge_bundle import read_bundle
from protocols.messages import RoundSchedule, decode_hello
from protocols.model_hash import state_hash
from protocols.zo_messages import (
    ZoTrainIns, decode_zo_train_res, encode_zo_train_ins,
)

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 3, 0, 1
bundle = read_bundle({bundle!r})
ctx = Context(
    run_id=3, node_id=5, state=RecordDict(), run_config={{}},
    node_config={{"data-path": {data!r}, "label": "edge", "runtime": "onnx",
                 "bundle": {bundle!r}}},
)
hello = client_app.app(Message(RecordDict(), dst_node_id=5, message_type="query.hello"), ctx)
assert not hello.has_error(), hello.error.reason
print("hello", decode_hello(hello.content))
w0_hash = state_hash(bundle.load_w0())
ins = ZoTrainIns(
    bundle.spec, RoundSchedule(server_round=1, local_steps=2, batch_size=2, seed=4),
    0, 0, w0_hash, (),
)
msg = Message(encode_zo_train_ins(ins), dst_node_id=5, message_type="train.zo")
reply = client_app.app(msg, ctx)
assert not reply.has_error(), reply.error.reason
res = decode_zo_train_res(reply.content, num_seeds=bundle.spec.num_seeds, max_steps=2)
assert (res.synced_round, res.synced_hash) == (0, w0_hash), res
assert res.indices.size == 2 and res.num_examples == 7, res
print("trained", res.indices.tolist(), res.train_loss)
print("torch" in sys.modules)
"""


def test_an_edge_node_answers_hello_and_train_zo_with_torch_blocked(
    run_bundle: Path, tmp_path: Path
) -> None:
    """In a process where torch, transformers and peft cannot be imported,
    ``client.app`` imports, an onnx node's hello counts its examples and its
    ``train.zo`` syncs to w0's hash and trains; torch never gets imported.

    Breaks if anything on the edge path (node config, router, error mapping,
    counting, bundle, state, handler) imports torch.
    """
    data = tmp_path / "edge.jsonl"
    write_jsonl(EXAMPLES[:7], data)
    code = EDGE_PROCESS.format(
        state=str(tmp_path / "state"), bundle=str(run_bundle), data=str(data)
    )
    done = run_without(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hello NodeHello(label='edge', num_examples=7" in done.stdout
    assert "trained" in done.stdout and done.stdout.strip().endswith("False")
    assert list((tmp_path / "state").rglob("round-000000-*.safetensors"))
