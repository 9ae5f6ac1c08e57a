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

import numpy as np
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
from server.federation import (
    FederationError,
    check_hello_identity,
    discover_nodes,
    node_auth_keys,
)
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
    """The real ClientApp, with hooks around a node's messages.

    ``before(node, msg)`` runs before the ClientApp (it may raise, as a
    failing ClientApp would); ``rewrite`` may change a train reply;
    ``after(node, msg)`` runs once the reply is made (e.g. to connect a node
    of an :class:`InProcessGrid` built with ``offline`` nodes).
    """

    def __init__(
        self, rewrite: Callable[[int, Message, Message], None] | None = None
    ) -> None:
        self.rewrite = rewrite
        self.before: Callable[[int, Message], None] | None = None
        self.after: Callable[[int, Message], None] | None = None
        self.seen: list[tuple[int, Message, Message]] = []
        self.asked: list[tuple[int, str]] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        node = msg.metadata.dst_node_id
        self.asked.append((node, msg.metadata.message_type))
        if self.before is not None:
            self.before(node, msg)
        reply = client_app(msg, context)
        is_train = msg.metadata.message_type == MESSAGE_TRAIN_LORA
        if self.rewrite is not None and is_train and not reply.has_error():
            self.rewrite(node, msg, reply)
        self.seen.append((node, msg, reply))
        if self.after is not None:
            self.after(node, msg)
        return reply

    def hellos(self, node: int) -> int:
        return self.asked.count((node, MESSAGE_HELLO))

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
                indices=np.array([1], dtype=np.int32),
                scalars=np.array([scalar], dtype=np.float32),
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
        # Equal up to float rounding: the server adds the mean change to the
        # global adapter rather than averaging the adapters themselves.
        assert all(
            torch.allclose(after[k], expected[k], rtol=1e-5, atol=1e-7)
            for k in expected
        )
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


def _left_out(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]


def test_an_impostor_is_left_out_at_hello_and_the_victim_counts_every_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without node authentication a node that claims a label already claimed
    by a lower node id is refused once, at hello, with a log naming it, and
    is not one of the run's 2 clients. Breaks if it is asked to train, or if
    the victim's updates are rejected as duplicates in any round."""
    config = _config(tmp_path, rounds=2, clients=2)
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
    left_out = _left_out(caplog)
    assert left_out == [
        f"node {impostor} left out: claims label 'p0000': label 'p0000' is "
        f"already held by node {victim} (the lowest node id claiming it)"
    ]


def test_a_label_granted_at_an_earlier_hello_keeps_its_holder() -> None:
    """Breaks if a label already held goes to a later claimant, even one with
    a lower node id, if the lowest-id rule stops applying among new claims,
    or if a node that holds a label may claim again."""
    labels, refused = settle_label_claims({2: "a", 4: "c", 6: "c"}, held={5: "a"})
    assert labels == {4: "c"}
    assert refused == {
        2: "label 'a' is already held by node 5 (granted at an earlier hello)",
        6: "label 'c' is already held by node 4 (the lowest node id claiming it)",
    }
    with pytest.raises(SamplingError, match="already hold a label"):
        settle_label_claims({5: "b"}, held={5: "a"})


def _labelled_grid(
    tmp_path: Path, tap: _Tap, labels: list[str], offline: tuple[int, ...] = ()
) -> tuple[InProcessGrid, list[int]]:
    """Nodes 0.. with these labels (no keys), ``offline`` ones not connected yet."""
    data = tmp_path / "d.jsonl"
    write_jsonl(generate_tasks(4, seed=0), data)
    ids = [InProcessGrid.node_id(n) for n in range(len(labels))]
    grid = InProcessGrid(tap, len(labels), offline=[ids[n] for n in offline])
    for node, label in zip(ids, labels, strict=True):
        grid.context(node).node_config = {"data-path": str(data), "label": label}
    return grid, ids


def test_refused_nodes_do_not_count_and_nodes_that_connect_later_are_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without node authentication, 3 nodes expected: nodes 1-3 connect
    first, and 3 loses 'bob' to 2. Once 1 has answered, node 0 (the lowest
    id, claiming 1's 'alice') and node 4 connect. Breaks if discovery stops
    at the 2 accepted (the refused node counted toward 3), if node 0 takes
    'alice' from its holder because its id is lower, or if a node is asked
    twice."""
    tap = _Tap()
    grid, ids = _labelled_grid(
        tmp_path, tap, ["alice", "alice", "bob", "bob", "carol"], offline=(0, 4)
    )

    def connect_late(node: int, msg: Message) -> None:
        if node == ids[1] and msg.metadata.message_type == MESSAGE_HELLO:
            grid.connect(ids[0])
            grid.connect(ids[4])

    tap.after = connect_late
    counts: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        labels = discover_nodes(
            grid, expected=3, timeout_s=30.0, ledger=ByteLedger(), counts=counts
        )
    assert labels == {ids[1]: "alice", ids[2]: "bob", ids[4]: "carol"}
    # Each accepted label's hello count (4 examples each), and no refused claim.
    assert counts == {"alice": 4, "bob": 4, "carol": 4}
    assert [tap.hellos(n) for n in ids] == [1, 1, 1, 1, 1]
    assert _left_out(caplog) == [
        f"node {ids[3]} left out: claims label 'bob': label 'bob' is already "
        f"held by node {ids[2]} (the lowest node id claiming it)",
        f"node {ids[0]} left out: claims label 'alice': label 'alice' is already "
        f"held by node {ids[1]} (granted at an earlier hello)",
    ]


def test_a_failed_hello_is_retried_once_and_the_timeout_counts_the_nodes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """4 nodes expected, no keys: node 1 claims node 0's label, node 2's
    first hello raises, node 3's every hello raises. Breaks if a failed
    hello is not asked exactly once more (node 2 accepted on its second, its
    two hellos in the ledger), if a refused node is asked again, or if
    discovery, short of 4, does not fail at its timeout with a message
    counting the accepted, refused and failed nodes."""
    tap = _Tap()
    grid, ids = _labelled_grid(tmp_path, tap, ["alice", "alice", "bob", "carol"])
    failures = {ids[2]: 1, ids[3]: 99}

    def fail(node: int, msg: Message) -> None:
        if msg.metadata.message_type == MESSAGE_HELLO and failures.get(node, 0):
            failures[node] -= 1
            raise RuntimeError("data not mounted yet")

    tap.before = fail
    ledger = ByteLedger()
    with caplog.at_level(logging.WARNING), pytest.raises(FederationError) as info:
        discover_nodes(grid, expected=4, timeout_s=1.0, ledger=ledger)
    assert str(info.value) == (
        "only 2 of 4 nodes accepted within 1 s: 1 refused at hello, 1 left out "
        "after 2 unanswered or failed hellos, 0 connected and still to be asked "
        "(4 connected in all)"
    )
    assert [tap.hellos(n) for n in ids] == [1, 1, 2, 2]
    down = {e.client: e.nbytes for e in ledger if e.direction == "down"}
    assert down.keys() == {"alice", "bob"} and down["bob"] == 2 * down["alice"]
    left_out = _left_out(caplog)
    assert len(left_out) == 2 and "data not mounted yet" in left_out[1]
    assert left_out[1].startswith(f"node {ids[3]} left out: ")


def test_after_the_timeout_discovery_goes_on_with_enough_accepted_nodes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """4 nodes expected but a round can train with 2 (``minimum``): an
    impostor and a node whose every hello fails must not stop the run.
    Breaks if discovery fails although ``minimum`` nodes were accepted, if it
    returns before its timeout gave the others their chance, or if the
    shortfall is not logged."""
    tap = _Tap()
    grid, ids = _labelled_grid(tmp_path, tap, ["alice", "alice", "bob", "carol"])

    def fail(node: int, msg: Message) -> None:
        if msg.metadata.message_type == MESSAGE_HELLO and node == ids[3]:
            raise RuntimeError("data not mounted yet")

    tap.before = fail
    with caplog.at_level(logging.WARNING):
        labels = discover_nodes(
            grid, expected=4, minimum=2, timeout_s=0.5, ledger=ByteLedger()
        )
    assert labels == {ids[0]: "alice", ids[2]: "bob"}
    assert tap.hellos(ids[3]) == 2  # its second chance came before giving up
    assert any("only 2 of 4 nodes accepted" in m for m in caplog.messages)
    with pytest.raises(ValueError, match="minimum"):
        discover_nodes(grid, expected=2, minimum=3, timeout_s=0.5, ledger=ByteLedger())


def test_once_every_node_answered_discovery_waits_only_late_join_s(
    tmp_path: Path,
) -> None:
    """In a simulation (``late_join_s = 0``) no node can join later: once
    every connected node answered, discovery goes on with those accepted.
    Breaks if it waits out ``timeout_s`` (300 s here: the grid fails the
    test past 20 polls, 4 s) for a replacement of the refused impostor."""
    tap = _Tap()
    grid, ids = _labelled_grid(tmp_path, tap, ["alice", "alice", "bob"])
    polls: list[int] = []
    real = grid.get_node_ids

    def counting() -> list[int]:
        polls.append(1)
        assert len(polls) < 20, "discovery waited for its timeout"
        return list(real())

    grid.get_node_ids = counting  # type: ignore[method-assign]
    labels = discover_nodes(
        grid,
        expected=3,
        minimum=2,
        timeout_s=300.0,
        late_join_s=0.0,
        ledger=ByteLedger(),
    )
    assert labels == {ids[0]: "alice", ids[2]: "bob"}


class _SilentGrid:
    """A grid whose one node never answers (its replies time out)."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def get_node_ids(self) -> list[int]:
        return [7]

    def send_and_receive(
        self, messages: list[Message], *, timeout: float | None = None
    ) -> list[Message]:
        self.sent += [m.metadata.dst_node_id for m in messages]
        return []


def test_a_node_that_never_answers_is_asked_twice(flower_identity: None) -> None:
    """Breaks if a node whose hello times out is never asked again, or is
    asked more than twice, or if discovery then returns instead of failing."""
    grid = _SilentGrid()
    with pytest.raises(FederationError, match="1 left out after 2 unanswered"):
        discover_nodes(grid, expected=1, timeout_s=0.5, ledger=ByteLedger())
    assert grid.sent == [7, 7]


def test_with_node_keys_a_victim_connecting_after_its_impostor_trains_every_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys are registered for p0000, p0001 and mallory, and the run has 2
    clients. Mallory's node connects first claiming p0000 (signed with its
    own key); the victim, holding p0000's key, connects only once mallory has
    answered its hello. Breaks if the refused impostor counts toward the 2
    clients (discovery would stop at p0001 and never ask the victim), if the
    victim misses a round, or if the impostor is asked to train."""
    from server.deploy import ServerInfo, write_server_info

    config = _config(tmp_path, rounds=2, clients=2)
    run_dir = prepare_run(config, tmp_path / "run")
    registered = tmp_path / "server-keys"
    registered.mkdir()
    private = {}
    for name in ("p0000", "p0001", "mallory"):
        private[name], pub = make_node_key(tmp_path / "nodes", name)
        (registered / pub.name).write_bytes(pub.read_bytes())
    where = {"pid": 1, "host": "127.0.0.1", "port": 9, "address": "127.0.0.1:9"}
    info = ServerInfo(**where, certs=None, auth_keys=str(registered))
    write_server_info(run_dir, info)
    impostor, honest, victim = (InProcessGrid.node_id(n) for n in range(3))
    tap = _Tap()
    grid = InProcessGrid(tap, 3, run_dir=run_dir, offline=[victim])
    for node, partition, key in [
        (impostor, 0, "mallory"),
        (honest, 1, "p0001"),
        (victim, 0, "p0000"),
    ]:
        grid.context(node).node_config["partition-id"] = partition
        grid.context(node).node_config["auth-key"] = str(private[key])

    def connect_victim(node: int, msg: Message) -> None:
        if node == impostor and msg.metadata.message_type == MESSAGE_HELLO:
            grid.connect(victim)

    tap.after = connect_victim
    with caplog.at_level(logging.WARNING):
        run_server(grid, config, run_dir)

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["round"], r["clients"], r["rejected"]) for r in rows] == [
        (0, 0, 0),
        (1, 2, 0),
        (2, 2, 0),
    ]
    trained = [node for node, _, _ in tap.train()]
    assert trained.count(victim) == 2 and trained.count(honest) == 2
    assert impostor not in trained
    assert [tap.hellos(n) for n in (impostor, honest, victim)] == [1, 1, 1]
    (left_out,) = _left_out(caplog)
    assert left_out.startswith(f"node {impostor} left out: claims label 'p0000': ")
    assert "does not verify" in left_out


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
            expected=2,
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
    but claiming another node's label; the run has 2 clients (the impostor is
    none of them, whenever it connects). Breaks if the ClientApp's signature
    does not verify on a real SuperNode (node id, key path in the node
    config), if the impostor gets the label, or if the victim misses a round.
    """
    import shutil
    import signal
    import subprocess
    import sys

    from server.certificates import make_dev_pki
    from server.processes import stop_process_tree
    from tests.conftest import deployment_config, free_port

    pollinate = str(Path(sys.executable).parent / "pollinate")
    make_dev_pki(tmp_path / "certs")
    registered = tmp_path / "keys"
    registered.mkdir()
    for name in ("a", "b", "mallory"):
        _, pub = make_node_key(tmp_path / "nodes", name)
        shutil.copy(pub, registered / pub.name)
    examples = generate_tasks(60, seed=3)
    config = deployment_config(tmp_path, 2, local_steps=1, eval_examples=4)
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
        indices=np.array([1, 1], dtype=np.int32),
        scalars=np.array([1e29, 1e29], dtype=np.float32),
        num_examples=2,
        train_loss=1.0,
        synced_round=0,
        synced_hash="h",
    )
    reply = FlowerMessage(encode_zo_train_res(res), reply_to=ins)
    out = strategy.aggregate(1, [("a", reply)], ZoGlobal(0, "h"))
    assert out.delta is None and "overflow float32" in out.rejected["a"]
    assert strategy.history == []
