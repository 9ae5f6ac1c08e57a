"""InProcessGrid delivers each message to the right node's context and back.

The bench's in-process runs (and any test that wants the real server loop
without Ray) rely on three things checked here with a toy ClientApp: a
message reaches the ClientApp through its public ``__call__`` in the
destination node's own context (partition id, run folder, state kept across
messages), the reply comes back with that node as its source, and a
ClientApp that raises produces an error reply as on a SuperNode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from protocols.run_folder import RUN_DIR_KEY
from simulation.inprocess import InProcessGrid

toy = ClientApp()


@toy.query("echo")
def echo(msg: Message, context: Context) -> Message:
    seen = int(context.state.config_records.get("seen", {"n": 0})["n"]) + 1
    context.state.config_records["seen"] = ConfigRecord({"n": seen})
    reply = ConfigRecord(
        {
            "text": str(msg.content["ask"]["text"]),
            "partition": int(context.node_config["partition-id"]),
            "node": int(context.node_id),
            "run-dir": str(context.run_config[RUN_DIR_KEY]),
            "seen": seen,
        }
    )
    return Message(RecordDict({"reply": reply}), reply_to=msg)


@toy.query("fail")
def fail(msg: Message, context: Context) -> Message:
    raise RuntimeError("toy failure")


def _ask(node: int, text: str, action: str = "echo") -> Message:
    content = RecordDict({"ask": ConfigRecord({"text": text})})
    return Message(content, node, f"query.{action}")


def test_messages_reach_their_node_and_replies_name_it(tmp_path) -> None:
    """Breaks if a message is routed to another node's context, the run folder
    does not reach the client, or replies lose their source node id."""
    grid = InProcessGrid(toy, num_nodes=3, run_dir=tmp_path)
    assert isinstance(grid, Grid)
    nodes = grid.get_node_ids()
    assert len(set(nodes)) == 3 and nodes == [grid.node_id(n) for n in range(3)]
    sent = [_ask(node, f"hi {node}") for node in reversed(nodes)]
    replies = grid.send_and_receive(sent, timeout=1.0)
    assert len(replies) == 3
    for msg, reply in zip(sent, replies, strict=True):
        assert not reply.has_error()
        node = msg.metadata.dst_node_id
        body = reply.content["reply"]
        assert reply.metadata.src_node_id == node
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert body["text"] == f"hi {node}" and body["node"] == node
        assert body["partition"] == nodes.index(node)
        assert body["run-dir"] == str(tmp_path)
    # One context per node, kept across messages (a node's state survives).
    again = grid.send_and_receive([_ask(nodes[0], "again")])
    assert again[0].content["reply"]["seen"] == 2
    assert grid.context(nodes[1]).state.config_records["seen"]["n"] == 1


def test_push_then_pull_hands_each_reply_out_once() -> None:
    """Breaks if pull_messages loses replies or returns one twice."""
    grid = InProcessGrid(toy, num_nodes=2)
    ids = grid.push_messages([_ask(n, "x") for n in grid.get_node_ids()])
    assert len(set(ids)) == 2
    first = grid.pull_messages(ids[:1])
    assert [r.metadata.reply_to_message_id for r in first] == ids[:1]
    assert len(grid.pull_messages(ids)) == 1 and grid.pull_messages(ids) == []


def test_a_raising_client_app_gives_an_error_reply() -> None:
    """Breaks if an exception in the ClientApp kills the server loop instead of
    becoming an error reply (what a SuperNode sends), or if asking the grid to
    propagate it does not."""
    grid = InProcessGrid(toy, num_nodes=1)
    node = grid.get_node_ids()[0]
    (reply,) = grid.send_and_receive([_ask(node, "x", action="fail")])
    assert reply.has_error()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "toy failure" in reply.error.reason
    assert reply.metadata.src_node_id == node
    strict = InProcessGrid(toy, num_nodes=1, catch_exceptions=False)
    with pytest.raises(RuntimeError, match="toy failure"):
        strict.send_and_receive([_ask(node, "x", action="fail")])


def test_unknown_destination_is_refused() -> None:
    """Breaks if a message to a node that does not exist is silently dropped."""
    grid = InProcessGrid(toy, num_nodes=1)
    with pytest.raises(ValueError, match="not one of"):
        grid.push_messages([_ask(999, "x")])


def test_an_offline_node_is_unseen_and_unreachable_until_it_connects(
    tmp_path: Path,
) -> None:
    """Breaks if a node built offline is listed or reached before ``connect``
    (the server would see it connect before it does), if it is not listed and
    reached after, or if an offline id that is not a node is accepted."""
    late = InProcessGrid.node_id(1)
    grid = InProcessGrid(toy, num_nodes=3, run_dir=tmp_path, offline=[late])
    assert grid.get_node_ids() == [InProcessGrid.node_id(n) for n in (0, 2)]
    assert grid.context(late).node_config["partition-id"] == 1
    with pytest.raises(ValueError, match="not one of"):
        grid.push_messages([_ask(late, "x")])
    grid.connect(late)
    assert grid.get_node_ids() == [InProcessGrid.node_id(n) for n in range(3)]
    (reply,) = grid.send_and_receive([_ask(late, "x")])
    assert reply.content["reply"]["partition"] == 1
    with pytest.raises(ValueError, match="not among"):
        InProcessGrid(toy, num_nodes=1, offline=[999])
