"""Hostile nodes: extreme metrics in replies, and labels claimed twice at hello.

A node may send a legal-looking reply whose metric is ``1e308``, ``inf`` or
``nan``, or claim another node's label. Neither may stop the run, lose a
``metrics.jsonl`` row, or cost an honest node its updates: the reply is
refused at decode with a reason naming the metric, and a second claim of a
label is refused once, at hello (by the label's key when nodes authenticate,
by the lowest node id otherwise). The runs below are real LoRA rounds on a
tiny model with the real ClientApp, through :class:`InProcessGrid`, with the
hostile node's behaviour injected around the ClientApp.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.app import Context, Message, RecordDict

from client.app import app as client_app
from client.daemon import JoinSettings, make_node_key, supernode_command
from corpora import generate_tasks, write_jsonl
from protocols import ByteLedger, ProtocolError, TensorLayout
from protocols.identity import (
    NONCE_BYTES,
    IdentityError,
    check_key_name,
    sign_hello,
    verify_hello,
)
from protocols.messages import (
    ERROR_NODE_SETUP,
    MAX_WIRE_FLOAT,
    MESSAGE_HELLO,
    MESSAGE_TRAIN_LORA,
    LoraTrainRes,
    decode_hello,
    decode_lora_train_ins,
    decode_lora_train_res,
    encode_hello_ins,
    encode_lora_train_res,
)
from protocols.run_folder import RunFolder
from protocols.zo_messages import ZoTrainRes, decode_zo_train_res, encode_zo_train_res
from server.app import run_server
from server.config import RunConfig, load_config
from server.federation import check_hello_identity, discover_nodes, node_auth_keys
from simulation import read_metrics
from simulation.inprocess import InProcessGrid
from simulation.prepare import prepare_run
from strategies import NodeBook, SamplingError
from strategies.aggregation import weighted_mean
from strategies.replies import weighted_loss
from strategies.sampling import settle_label_claims

HOSTILE_LOSSES = [1e308, math.inf, math.nan]


def _config(tmp_path: Path, rounds: int, clients: int = 3) -> RunConfig:
    return load_config(
        None,
        {
            "model.name": "tiny-llama",
            "run.rounds": rounds,
            "federation.clients": clients,
            "train.local_steps": 1,
            "data.limit": 60,
            "data.eval_examples": 4,
            "eval.max_new_tokens": 2,
            "run.output_dir": str(tmp_path),
        },
    )


class _Tap:
    """The real ClientApp, with a hook that may rewrite a node's reply."""

    def __init__(
        self, rewrite: Callable[[int, Message, Message], None] | None = None
    ) -> None:
        self.rewrite = rewrite
        self.seen: list[tuple[int, Message, Message]] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        node = msg.metadata.dst_node_id
        is_train = msg.metadata.message_type == MESSAGE_TRAIN_LORA
        if self.rewrite is not None and is_train and not reply.has_error():
            self.rewrite(node, msg, reply)
        self.seen.append((node, msg, reply))
        return reply

    def train(self) -> list[tuple[int, Message, Message]]:
        return [
            s for s in self.seen if s[1].metadata.message_type == MESSAGE_TRAIN_LORA
        ]


# -- 5: metrics that are not finite, or whose aggregate would overflow -----------------


@pytest.mark.parametrize("loss", [1e308, -1e31, math.inf, -math.inf, math.nan])
def test_an_extreme_train_loss_is_refused_at_decode_naming_it(loss: float) -> None:
    """Breaks if a reply's loss beyond MAX_WIRE_FLOAT (1e308 overflows any
    weighted mean) or non-finite reaches a strategy."""
    adapter = {"w": torch.ones(2, 2)}
    content = encode_lora_train_res(LoraTrainRes(adapter, 3, 0.5))
    content["metrics"]["train-loss"] = loss
    with pytest.raises(ProtocolError, match="'train-loss'") as info:
        decode_lora_train_res(content, expected=TensorLayout.of(adapter))
    assert "\n" not in str(info.value)
    content["metrics"]["train-loss"] = MAX_WIRE_FLOAT
    assert decode_lora_train_res(content, expected=TensorLayout.of(adapter))


def test_zo_scalars_and_metrics_are_bounded_at_decode() -> None:
    """Breaks if a FedKSeed reply with a finite but huge scalar (its seed
    coefficients would overflow float32) or loss is accepted."""

    def res(scalar: float, loss: float) -> RecordDict:
        return encode_zo_train_res(
            ZoTrainRes(
                indices=torch.tensor([1], dtype=torch.int32),
                scalars=torch.tensor([scalar]),
                num_examples=2,
                train_loss=loss,
                synced_round=0,
                synced_hash="h",
            )
        )

    assert decode_zo_train_res(res(1e29, 1.0), num_seeds=4, max_steps=2)
    with pytest.raises(ProtocolError, match="scalars"):
        decode_zo_train_res(res(1e31, 1.0), num_seeds=4, max_steps=2)
    with pytest.raises(ProtocolError, match="'train-loss'"):
        decode_zo_train_res(res(1.0, 1e308), num_seeds=4, max_steps=2)


@pytest.mark.parametrize("metric", ["train-loss", "local-loss"])
def test_sfprompt_losses_are_bounded_at_decode(metric: str) -> None:
    """Breaks if an SFPrompt reply's loss of 1e308 reaches the strategy (its
    decoder reads metrics through the same bounded reader as LoRA's)."""
    from protocols.split_messages import (
        SplitTrainRes,
        decode_split_train_res,
        encode_split_train_res,
    )

    tensors = {"prompt": torch.ones(2)}
    res = SplitTrainRes(
        tensors=tensors,
        num_examples=3,
        train_loss=0.5,
        local_loss=0.4,
        kept=3,
        trunk_bytes_up=1,
        trunk_bytes_down=1,
    )
    content = encode_split_train_res(res)
    content["metrics"][metric] = 1e308
    with pytest.raises(ProtocolError, match=f"'{metric}'"):
        decode_split_train_res(content, expected=TensorLayout.of(tensors))


def test_weighted_loss_of_finite_losses_never_overflows() -> None:
    """Breaks if the example-weighted mean multiplies before dividing
    (1e308 weighted by 2 examples is inf)."""
    mean = weighted_loss([(1e308, 2), (1e308, 1)])
    assert math.isfinite(mean) and mean == pytest.approx(1e308)
    assert weighted_loss([(1.0, 1), (4.0, 3)]) == pytest.approx(3.25)


def test_hostile_metrics_are_refused_and_every_round_is_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One node replies with train-loss 1e308, inf, then nan in rounds 1-3.
    Breaks if its reply is not refused with a reason naming 'train-loss', if
    a round's metrics row is lost or the run stops, or if the global adapter
    differs from the example-weighted mean of the two honest replies."""
    config = _config(tmp_path, rounds=4)
    run_dir = prepare_run(config, tmp_path / "run")
    hostile = InProcessGrid.node_id(2)

    def rewrite(node: int, msg: Message, reply: Message) -> None:
        rnd = decode_lora_train_ins(msg.content).config.server_round
        if node == hostile and rnd <= len(HOSTILE_LOSSES):
            reply.content["metrics"]["train-loss"] = HOSTILE_LOSSES[rnd - 1]

    tap = _Tap(rewrite)
    grid = InProcessGrid(tap, 3, run_dir=run_dir)
    with caplog.at_level(logging.WARNING):
        run_server(grid, config, run_dir)

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    by_round: dict[int, dict[int, tuple[Message, Message]]] = defaultdict(dict)
    for node, msg, reply in tap.train():
        by_round[decode_lora_train_ins(msg.content).config.server_round][node] = (
            msg,
            reply,
        )
    for rnd, loss in enumerate(HOSTILE_LOSSES, start=1):
        row = rows[rnd]
        assert (row["clients"], row["rejected"]) == (2, 1), row
        reason = [
            r.getMessage()
            for r in caplog.records
            if f"round {rnd}: rejected update from p0002" in r.getMessage()
        ]
        assert len(reason) == 1 and "'train-loss'" in reason[0], reason
        assert repr(loss) in reason[0]
        # The honest replies, as the server decodes them, sorted by label.
        adapter_now = decode_lora_train_ins(by_round[rnd][hostile][0].content).adapter
        honest = [
            decode_lora_train_res(
                by_round[rnd][InProcessGrid.node_id(p)][1].content,
                expected=TensorLayout.of(adapter_now),
            )
            for p in (0, 1)
        ]
        assert row["train_loss"] == pytest.approx(
            weighted_loss([(h.train_loss, h.num_examples) for h in honest])
        )
        expected = weighted_mean(
            [h.adapter for h in honest], [float(h.num_examples) for h in honest]
        )
        # The next round's instruction carries the global adapter.
        after = decode_lora_train_ins(by_round[rnd + 1][hostile][0].content).adapter
        assert after.keys() == expected.keys()
        assert all(torch.equal(after[k], expected[k]) for k in expected)
    assert (rows[4]["clients"], rows[4]["rejected"]) == (3, 0)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"


# -- 8: a label claimed twice -----------------------------------------------------------


def test_label_claims_go_to_the_lowest_node_id_and_the_book_holds_each_once() -> None:
    """Breaks if a duplicate claim is not settled deterministically (whatever
    order the replies came in), or if a NodeBook accepts one label twice."""
    claims = {9: "a", 3: "b", 5: "a", 7: "a"}
    labels, refused = settle_label_claims(claims)
    assert labels == {3: "b", 5: "a"}
    assert sorted(refused) == [7, 9] and "node 5" in refused[9]
    assert settle_label_claims(dict(reversed(claims.items()))) == (labels, refused)
    with pytest.raises(SamplingError, match="'a' is held by nodes 1 and 2"):
        NodeBook({1: "a", 2: "a"})


def test_an_impostor_is_left_out_at_hello_and_the_victim_counts_every_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without node authentication a node that claims a label already claimed
    by a lower node id is refused once, at hello, with a log naming it. Breaks
    if it is asked to train, or if the victim's updates are rejected as
    duplicates in any round."""
    config = _config(tmp_path, rounds=2)
    run_dir = prepare_run(config, tmp_path / "run")
    tap = _Tap()
    grid = InProcessGrid(tap, 3, run_dir=run_dir)
    victim, impostor = InProcessGrid.node_id(0), InProcessGrid.node_id(2)
    grid.context(impostor).node_config["partition-id"] = 0  # claims "p0000"
    with caplog.at_level(logging.WARNING):
        run_server(grid, config, run_dir)

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["round"], r["clients"], r["rejected"]) for r in rows] == [
        (0, 0, 0),
        (1, 2, 0),
        (2, 2, 0),
    ]
    trained = [node for node, _, _ in tap.train()]
    assert impostor not in trained and trained.count(victim) == 2
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert left_out == [
        f"node {impostor} left out: claims label 'p0000': label 'p0000' is "
        f"already held by node {victim} (the lowest node id claiming it)"
    ]


def _keys(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Node keys alice, bob and eve; the server registers alice and bob."""
    private = {
        n: make_node_key(tmp_path / "nodes", n)[0] for n in ("alice", "bob", "eve")
    }
    registered = tmp_path / "server-keys"
    registered.mkdir()
    for name in ("alice", "bob"):
        pub = (tmp_path / "nodes" / f"{name}.pub").read_bytes()
        (registered / f"{name}.pub").write_bytes(pub)
    return registered, private


def test_sign_and_verify_a_hello(tmp_path: Path) -> None:
    """Breaks if a signature verifies under another key, nonce, label or node
    id, if an unsigned hello passes, or if a non-EC key or a label that is not
    a safe key name is accepted."""
    registered, private = _keys(tmp_path)
    alice = (registered / "alice.pub").read_bytes()
    nonce = b"n" * NONCE_BYTES
    sig = sign_hello(private["alice"].read_bytes(), nonce, "alice", 7)
    verify_hello(alice, nonce, "alice", 7, sig)
    for args in [
        (b"m" * NONCE_BYTES, "alice", 7),
        (nonce, "bob", 7),
        (nonce, "alice", 8),
    ]:
        with pytest.raises(IdentityError, match="does not verify"):
            verify_hello(alice, *args, sig)
    eve_sig = sign_hello(private["eve"].read_bytes(), nonce, "alice", 7)
    with pytest.raises(IdentityError, match="does not verify"):
        verify_hello(alice, nonce, "alice", 7, eve_sig)
    with pytest.raises(IdentityError, match="not signed"):
        verify_hello(alice, nonce, "alice", 7, b"")
    # A P-256 key (what ssh-keygen -t ecdsa makes by default) works too.
    p256 = ec.generate_private_key(ec.SECP256R1())
    pem = p256.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = p256.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    verify_hello(pub, nonce, "x", 1, sign_hello(pem, nonce, "x", 1))
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    with pytest.raises(IdentityError, match="not an EC key"):
        sign_hello(ed, nonce, "x", 1)
    for bad in ["", "../alice", "a/b", ".hidden", "a" * 129, "sp ace"]:
        with pytest.raises(IdentityError, match="cannot name a key"):
            check_key_name(bad)


def test_server_side_check_binds_a_label_to_its_registered_key(tmp_path: Path) -> None:
    """Breaks if check_hello_identity accepts a label without a registered
    key, a path-like label, or a hello signed with another key."""
    from protocols.messages import NodeHello

    registered, private = _keys(tmp_path)
    nonce = b"k" * NONCE_BYTES

    def hello(label: str, key: str) -> NodeHello:
        sig = sign_hello(private[key].read_bytes(), nonce, label, 5)
        return NodeHello(label, 3, sig)

    check_hello_identity(registered, 5, nonce, hello("alice", "alice"))
    with pytest.raises(IdentityError, match="does not verify"):
        check_hello_identity(registered, 5, nonce, hello("alice", "eve"))
    with pytest.raises(IdentityError, match="no key is registered"):
        check_hello_identity(registered, 5, nonce, hello("eve", "eve"))
    with pytest.raises(IdentityError, match="cannot name a key"):
        check_hello_identity(registered, 5, nonce, hello("../nodes/eve", "eve"))


def test_with_node_keys_only_proven_labels_are_accepted_at_hello(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the real ClientApp's hello: with registered keys, a label is
    accepted only with a hello signed by its key. Breaks if an impostor
    holding the lowest node id keeps a label whose key it lacks, if a label
    with no registered key, or an unsigned hello, is accepted, or if a
    correctly signed node is left out."""
    registered, private = _keys(tmp_path)
    data = tmp_path / "d.jsonl"
    write_jsonl(generate_tasks(4, seed=0), data)
    nodes: list[tuple[str, str | None]] = [
        ("alice", "eve"),  # impostor with the lowest node id: wrong key
        ("alice", "alice"),
        ("bob", "alice"),  # signs for bob with alice's key
        ("eve", "eve"),  # no key registered for 'eve'
        ("bob", None),  # unsigned
        ("bob", "bob"),
    ]
    grid = InProcessGrid(client_app, len(nodes))
    for n, (label, key) in enumerate(nodes):
        cfg: dict[str, Any] = {"data-path": str(data), "label": label}
        if key is not None:
            cfg["auth-key"] = str(private[key])
        grid.context(grid.node_id(n)).node_config = cfg
    with caplog.at_level(logging.WARNING):
        labels = discover_nodes(
            grid,
            expected=len(nodes),
            timeout_s=5.0,
            ledger=ByteLedger(),
            auth_keys=registered,
        )
    assert labels == {grid.node_id(1): "alice", grid.node_id(5): "bob"}
    left_out = {
        r.getMessage().split(" left out")[0]: r.getMessage()
        for r in caplog.records
        if "left out" in r.getMessage()
    }
    assert sorted(left_out) == [f"node {grid.node_id(n)}" for n in (0, 2, 3, 4)]
    assert "'alice'" in left_out[f"node {grid.node_id(0)}"]
    assert "does not verify" in left_out[f"node {grid.node_id(2)}"]
    assert "no key is registered" in left_out[f"node {grid.node_id(3)}"]
    assert "not signed" in left_out[f"node {grid.node_id(4)}"]
    assert all("\n" not in m for m in left_out.values())


def test_the_hello_handler_signs_with_the_node_key(tmp_path: Path) -> None:
    """Breaks if the ClientApp does not sign (nonce, label, its node id) with
    its ``auth-key``, or if an unreadable key is not a node-setup error."""
    registered, private = _keys(tmp_path)
    data = tmp_path / "d.jsonl"
    write_jsonl(generate_tasks(3, seed=0), data)
    grid = InProcessGrid(client_app, 1)
    node = grid.node_id(0)
    ctx = grid.context(node)
    ctx.node_config = {
        "data-path": str(data),
        "label": "bob",
        "auth-key": str(private["bob"]),
    }
    nonce = b"z" * NONCE_BYTES
    msg = Message(encode_hello_ins(nonce), dst_node_id=node, message_type=MESSAGE_HELLO)
    (reply,) = grid.send_and_receive([msg])
    hello = decode_hello(reply.content)
    verify_hello(
        (registered / "bob.pub").read_bytes(), nonce, "bob", node, hello.signature
    )
    ctx.node_config = {**ctx.node_config, "auth-key": str(tmp_path / "missing.key")}
    (msg2,) = [
        Message(encode_hello_ins(nonce), dst_node_id=node, message_type=MESSAGE_HELLO)
    ]
    (reply,) = grid.send_and_receive([msg2])
    assert reply.has_error() and reply.error.code == ERROR_NODE_SETUP
    assert "auth-key" in reply.error.reason


def test_the_daemon_hands_its_key_to_the_client_app(tmp_path: Path) -> None:
    """Breaks if ``client join --auth-key`` stops passing the key path in the
    node config, where the ClientApp reads it to sign its hello."""
    key = tmp_path / "bob.key"
    s = JoinSettings(
        server="127.0.0.1:1",
        data=tmp_path / "d.jsonl",
        label="bob",
        root_certificates=tmp_path / "ca.crt",
        auth_key=key,
    )

    def node_config(settings: JoinSettings) -> str:
        cmd = supernode_command(settings)
        return cmd[cmd.index("--node-config") + 1]

    assert f'auth-key="{key.resolve()}"' in node_config(s)
    plain = JoinSettings(server="127.0.0.1:1", data=s.data, label="a", insecure=True)
    assert "auth-key" not in node_config(plain)


def test_the_server_app_finds_the_keys_in_server_json(tmp_path: Path) -> None:
    """Breaks if the ServerApp does not learn the registered keys folder of an
    authenticating server from ``server.json`` (or invents one without it)."""
    from server.deploy import ServerInfo, write_server_info

    folder = RunFolder(tmp_path)
    assert node_auth_keys(folder) is None
    where = {"pid": 1, "host": "127.0.0.1", "port": 9, "address": "127.0.0.1:9"}
    write_server_info(tmp_path, ServerInfo(**where, certs=None, auth_keys=None))
    assert node_auth_keys(folder) is None
    keys = tmp_path / "keys"
    write_server_info(tmp_path, ServerInfo(**where, certs="c", auth_keys=str(keys)))
    assert node_auth_keys(folder) == keys


@pytest.mark.deployment
@pytest.mark.integration
def test_a_deployed_node_cannot_take_a_label_whose_key_it_lacks(tmp_path: Path) -> None:
    """Real processes: ``pollinate server start`` with TLS and node keys, and
    three ``client join`` daemons, one of them registered (so it may join)
    but claiming another node's label. Breaks if the ClientApp's signature
    does not verify on a real SuperNode (node id, key path in the node
    config), if the impostor gets the label, or if the victim misses a round.
    """
    import shutil
    import signal
    import subprocess
    import sys

    from server.certificates import make_dev_pki
    from server.deploy import stop_process_tree
    from tests.conftest import free_port

    pollinate = str(Path(sys.executable).parent / "pollinate")
    make_dev_pki(tmp_path / "certs")
    registered = tmp_path / "keys"
    registered.mkdir()
    for name in ("a", "b", "mallory"):
        _, pub = make_node_key(tmp_path / "nodes", name)
        shutil.copy(pub, registered / pub.name)
    examples = generate_tasks(60, seed=3)
    config = tmp_path / "run.toml"
    config.write_text(
        f"""[run]
rounds = 2
output_dir = "{tmp_path / "runs"}"
[model]
name = "tiny-llama"
[federation]
clients = 3
round_timeout_s = 90
[train]
local_steps = 1
batch_size = 4
[data]
limit = 120
eval_examples = 4
[eval]
max_new_tokens = 2
"""
    )
    port = free_port()
    daemons = []
    for label, key in (("a", "a"), ("b", "b"), ("a", "mallory")):
        data = tmp_path / f"{key}.jsonl"
        write_jsonl(examples[len(daemons) * 20 : (len(daemons) + 1) * 20], data)
        cmd = [
            pollinate,
            "client",
            "join",
            "--server",
            f"127.0.0.1:{port}",
            "--data",
            str(data),
            "--label",
            label,
            "--root-cert",
            str(tmp_path / "certs" / "ca.crt"),
            "--auth-key",
            str(tmp_path / "nodes" / f"{key}.key"),
            "--state-dir",
            str(tmp_path / f"node-{key}"),
            "--local-port",
            str(free_port()),
        ]
        log = (tmp_path / f"daemon-{key}.log").open("ab")
        daemons.append(
            subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    try:
        out = subprocess.run(
            [
                pollinate,
                "server",
                "start",
                str(config),
                "--certs",
                str(tmp_path / "certs"),
                "--port",
                str(port),
                "--auth-keys",
                str(registered),
            ],
            capture_output=True,
            text=True,
            timeout=500,
            check=False,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        (run_dir,) = (tmp_path / "runs").iterdir()
        rows = read_metrics(run_dir / "metrics.jsonl")
        assert [(r["clients"], r["rejected"]) for r in rows] == [(0, 0), (2, 0), (2, 0)]
        # The SuperNodes' own logs say which nodes were asked to train: the
        # victim (its signature verified on a real SuperNode) and b, never
        # the impostor, whatever the order of the random node ids.
        trained = {
            key: (tmp_path / f"node-{key}" / "supernode.log")
            .read_text(errors="replace")
            .count("Receiving: train.lora")
            for key in ("a", "b", "mallory")
        }
        assert trained == {"a": 2, "b": 2, "mallory": 0}
    finally:
        for proc in daemons:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        for info in tmp_path.rglob("server.json"):
            stop_process_tree(int(json.loads(info.read_text())["pid"]), grace_s=2.0)


def test_a_fedkseed_round_whose_coefficients_overflow_is_refused_whole(
    flower_identity: None,
) -> None:
    """Breaks if bounded scalars times an extreme learning rate give the
    global model an infinite seed coefficient (and the checkpoint an inf)
    instead of a refused round with the reason named."""
    from flwr.app import Message as FlowerMessage

    from protocols import ZOSpec
    from protocols.seeds import GENERATOR_VERSION
    from strategies.fedkseed import FedKSeed, ZoGlobal

    spec = ZOSpec(
        model="m",
        walk_fingerprint="w",
        generator=GENERATOR_VERSION,
        num_seeds=4,
        learning_rate=1e10,
    )
    strategy = FedKSeed(spec=spec, local_steps=2, batch_size=1)
    (ins,) = strategy.configure(1, {7: "a"}, ZoGlobal(0, "h"))
    res = ZoTrainRes(
        indices=torch.tensor([1, 1], dtype=torch.int32),
        scalars=torch.tensor([1e29, 1e29]),
        num_examples=2,
        train_loss=1.0,
        synced_round=0,
        synced_hash="h",
    )
    reply = FlowerMessage(encode_zo_train_res(res), reply_to=ins)
    out = strategy.aggregate(1, [("a", reply)], ZoGlobal(0, "h"))
    assert out.delta is None and "overflow float32" in out.rejected["a"]
    assert strategy.history == []
