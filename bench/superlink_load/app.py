"""The load-test Flower app (``pyproject.toml`` and ``loadapp.py``), written at run time.

Its ServerApp sends every node one message of ``arrays`` float32 arrays per
round, checks every reply bit for bit with the payload helpers of
:mod:`bench.superlink_load.payload` (carried in ``loadapp.py`` verbatim),
and rewrites a JSON result file after every round.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from bench.superlink_load.payload import (
    check_reply,
    expected_reply,
    make_payload,
    payload_digest,
)
from protocols.durable import atomic_write_bytes

_APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pollinate-superlink-load"
version = "1.0.0"
description = "Pollinate's SuperLink load test: large many-array echo rounds"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "pollinate"

[tool.flwr.app.components]
serverapp = "loadapp:server"
clientapp = "loadapp:client"

[tool.flwr.app.config]
rounds = 3
arrays = 1000
mib = 32.0
seed = 0
nodes = 4
round-timeout-s = 300.0
join-timeout-s = 120.0
result-path = ""
"""

_APP_HEADER = '''"""Pollinate SuperLink load test app (written by bench.superlink_load)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

'''

_APP_BODY = '''

server = ServerApp()
client = ClientApp()


@client.query("echo")
def echo(msg: Message, context: Context) -> Message:
    """Reply with every array plus one and the sha256 of what arrived."""
    record = msg.content["arrays"]
    arrays = [record[str(i)].numpy() for i in range(len(record))]
    digest = payload_digest(arrays)
    content = RecordDict(
        {
            "arrays": ArrayRecord(expected_reply(arrays)),
            "echo": ConfigRecord({"sha256": digest, "pid": os.getpid()}),
        }
    )
    return Message(content, reply_to=msg)


def _write(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def _verdict(sent: list[np.ndarray], reply: Message | None) -> str:
    if reply is None:
        return check_reply(sent, None, None)
    if reply.has_error():
        return f"error reply: {reply.error.reason}"
    try:
        record = reply.content["arrays"]
        arrays = {key: record[key].numpy() for key in record}
        digest = str(reply.content["echo"]["sha256"])
    except (KeyError, ValueError, TypeError) as exc:
        return f"corrupt uplink: unreadable reply ({type(exc).__name__}: {exc})"
    return check_reply(sent, arrays, digest)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Echo rounds; the result file is rewritten after every round."""
    cfg = context.run_config
    path, want = str(cfg["result-path"]), int(cfg["nodes"])
    result: dict = {"done": False, "passed": False, "rounds": [], "error": None}
    deadline = time.monotonic() + float(cfg["join-timeout-s"])
    while len(list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.5)  # nodes join on their own time; nothing to wait on
    nodes = sorted(grid.get_node_ids())
    result["nodes_connected"] = len(nodes)
    _write(path, result)
    if len(nodes) < want:
        result.update(done=True, error=f"{len(nodes)} of {want} nodes joined")
        _write(path, result)
        raise RuntimeError(result["error"])
    for rnd in range(1, int(cfg["rounds"]) + 1):
        sent = {
            node: make_payload(
                int(cfg["seed"]), rnd, i, int(cfg["arrays"]), float(cfg["mib"])
            )
            for i, node in enumerate(nodes)
        }
        msgs = [
            Message(
                RecordDict({"arrays": ArrayRecord(arrays)}),
                dst_node_id=node,
                message_type="query.echo",
            )
            for node, arrays in sent.items()
        ]
        # Flower's message id is the content hash; error replies the SuperLink
        # makes for a lost node come from node 0, so match by reply_to.
        dst = {m.object_id: m.metadata.dst_node_id for m in msgs}
        t0 = time.monotonic()
        replies = grid.send_and_receive(msgs, timeout=float(cfg["round-timeout-s"]))
        seconds = time.monotonic() - t0
        del msgs
        by_node = {dst.get(r.metadata.reply_to_message_id): r for r in replies}
        verdicts = {
            str(node): _verdict(sent[node], by_node.get(node)) for node in nodes
        }
        result["rounds"].append(
            {
                "round": rnd,
                "seconds": seconds,
                "verdicts": verdicts,
                "check_seconds": time.monotonic() - t0 - seconds,
            }
        )
        _write(path, result)
        bad = sorted(set(verdicts.values()) - {"ok"})
        if bad:  # later rounds would only add time to a failed run
            result["error"] = f"round {rnd}: {bad[0]}"
            break
    ok = result["error"] is None
    result.update(done=True, passed=ok)
    _write(path, result)
    if not ok:
        raise RuntimeError(result["error"])
'''


def _app_source() -> str:
    helpers = [make_payload, payload_digest, expected_reply, check_reply]
    body = "\n\n".join(inspect.getsource(f) for f in helpers)
    return _APP_HEADER + "\n" + body + _APP_BODY


def write_load_app(folder: Path) -> Path:
    """Write the load-test Flower app into ``folder``; return it.

    The app is ``pyproject.toml`` (components ``loadapp:server`` and
    ``loadapp:client``, no dependencies) and ``loadapp.py``, which carries
    the payload helpers and :func:`check_reply` of this module verbatim.
    """
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "pyproject.toml", _APP_PYPROJECT.encode())
    atomic_write_bytes(folder / "loadapp.py", _app_source().encode())
    return folder
