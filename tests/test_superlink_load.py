"""The SuperLink store we deploy carries large, many-array messages intact.

Our deployment runs Flower's SuperLink with its default in-memory state store
(``server.deploy.start_superlink``). We chose it over the SQLite store
(``--database``): with about a thousand arrays per message, SQLite's 5 s busy
timeout runs out, the SuperLink answers HTTP 500, and a SuperNode exits on
the first 500 it gets, losing its message (the bench lost 3 of 4 nodes in
round 1 at 4 nodes x 1000 arrays x 32 MiB; where it held, it was about 2x
slower). We need no durability from the SuperLink: when it restarts, the
client daemon re-joins its SuperNodes and the run resumes from our own
checkpoints.

The deployment test pushes messages of 1000 float32 arrays (24 MiB) each way
through a real ``flower-superlink`` to real ``flower-supernode`` processes
and back (the load app of ``bench/superlink_load.py``) and requires every
reply bit for bit. Its size is cut to fit about two minutes on 2 cores:
Flower moves every array as its own HTTP object, 40-60 ms per array per node
per round trip here, so 4 nodes x 3 rounds would take 8-12 minutes; that
shape, with the SQLite store beside it, is what the bench runs
(``python -m bench.superlink_load``; results in ``bench/results``). The
array count per message stays at 1000 because that is where the SQLite
store fails. The cheap tests check, without starting any process, that the
verifier the deployed ServerApp runs can fail.
"""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict

from bench.superlink_load import (
    LoadDeployment,
    LoadSpec,
    check_reply,
    expected_reply,
    make_payload,
    payload_digest,
    write_load_app,
)
from tests.conftest import free_port, wait_until

pytestmark = [pytest.mark.deployment, pytest.mark.integration]

# 2 nodes x 1000 arrays x 24 MiB each way, one round: ~100 s of transfers here.
DEPLOYED = LoadSpec(
    nodes=2, arrays=1000, mib=24.0, rounds=1, round_timeout_s=240.0, join_timeout_s=90.0
)


def _flip_bit(arrays: list[np.ndarray], index: int) -> list[np.ndarray]:
    out = [a.copy() for a in arrays]
    out[index].view(np.uint32)[len(out[index]) // 2] ^= 1  # one mantissa bit
    return out


def _as_reply(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {str(i): a for i, a in enumerate(arrays)}


def _load_app_module(folder: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("loadapp", folder / "loadapp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop("loadapp", None)
    spec.loader.exec_module(module)
    return module


def test_payload_is_deterministic_sized_and_distinct_per_node() -> None:
    """The server regenerates what it sent from (seed, round, node): same
    arguments give the same bytes, another node or round gives other bytes,
    and the arrays add up to the asked size in the asked count.

    Breaks if the payload depends on hidden state (the check would compare
    against the wrong bytes) or nodes get identical content (Flower would
    deduplicate the objects and the load would be smaller than reported).
    """
    a = make_payload(7, 1, 0, 100, 0.5)
    assert len(a) == 100 and all(x.dtype == np.float32 for x in a)
    assert sum(x.nbytes for x in a) == int(0.5 * 2**20)
    assert payload_digest(a) == payload_digest(make_payload(7, 1, 0, 100, 0.5))
    assert payload_digest(a) != payload_digest(make_payload(7, 1, 1, 100, 0.5))
    assert payload_digest(a) != payload_digest(make_payload(7, 2, 0, 100, 0.5))


def test_verifier_accepts_intact_replies_and_rejects_any_corruption() -> None:
    """``check_reply`` passes only the exact transformed arrays with the exact
    digest of what was sent.

    Breaks (the deployment test would pass vacuously) if a flipped bit in one
    array, a downlink the node saw differently, an echo without the
    transform, a missing or extra array, a dtype change or no reply at all
    were accepted.
    """
    sent = make_payload(0, 1, 0, 50, 0.25)
    good = expected_reply(sent)
    digest = payload_digest(sent)
    assert check_reply(sent, _as_reply(good), digest) == "ok"

    flipped = check_reply(sent, _as_reply(_flip_bit(good, 17)), digest)
    assert flipped.startswith("corrupt uplink") and "array 17" in flipped
    downlink = payload_digest(_flip_bit(sent, 3))
    assert check_reply(sent, _as_reply(good), downlink).startswith("corrupt downlink")
    assert check_reply(sent, _as_reply(sent), digest).startswith("corrupt uplink")
    assert check_reply(sent, _as_reply(good[:-1]), digest).startswith("corrupt uplink")
    assert check_reply(sent, _as_reply([*good, good[0]]), digest).startswith(
        "corrupt uplink"
    )
    wider = [a.astype(np.float64) for a in good]
    assert check_reply(sent, _as_reply(wider), digest).startswith("corrupt uplink")
    assert check_reply(sent, None, None).startswith("missing")


def test_written_app_round_trips_real_messages_through_its_own_check(
    tmp_path: Path, flower_identity: None
) -> None:
    """The written ``loadapp.py`` (what the FAB carries) echoes a real Flower
    Message, and its server-side check passes that reply and fails a reply
    with one bit flipped, an error reply and a missing one.

    Breaks if the app file drifts from the tested helpers, the ClientApp's
    reply does not decode on the server side, or the ServerApp's check does
    not look at the reply's bytes. Also checks the app's pyproject: no
    dependencies to install and components inside the app folder.
    """
    app = write_load_app(tmp_path / "app")
    meta = tomllib.loads((app / "pyproject.toml").read_text())
    assert meta["project"]["dependencies"] == []
    assert meta["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "loadapp:server",
        "clientapp": "loadapp:client",
    }
    loadapp = _load_app_module(app)
    sent = make_payload(1, 2, 0, 20, 0.1)
    msg = Message(
        RecordDict({"arrays": ArrayRecord(sent)}),
        dst_node_id=5,
        message_type="query.echo",
    )
    ctx = Context(
        run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={}
    )
    reply = loadapp.echo(msg, ctx)
    assert loadapp._verdict(sent, reply) == "ok"

    reply.content["arrays"] = ArrayRecord(_flip_bit(expected_reply(sent), 4))
    assert loadapp._verdict(sent, reply).startswith("corrupt uplink")
    assert loadapp._verdict(sent, None).startswith("missing")
    failed = Message(Error(code=0, reason="boom"), reply_to=msg)
    assert loadapp._verdict(sent, failed) == "error reply: boom"


def test_in_memory_superlink_carries_many_array_messages(tmp_path: Path) -> None:
    """A real in-memory SuperLink and 2 real SuperNodes move 1000-array,
    24 MiB messages each way and every reply arrives bit for bit.

    Breaks if the deployed store loses, truncates or mixes up objects of a
    many-array message, stalls under it (the round timeout ends the run with
    missing replies), or the run does not finish as completed. Every process
    started is stopped, found by its 127.0.0.1 ports (the SuperLink and
    SuperNodes start their SuperExec, ServerApp and ClientApps outside their
    own process groups).
    """
    dep = LoadDeployment(DEPLOYED, "memory", tmp_path / "load", port=free_port)
    try:
        dep.start()
        dep.submit()
        wait_until(dep.finished, 420.0, "the load run to finish")
        result = dep.progress()
        status = dep.flower_status()
        errors = dep.log_errors()
    finally:
        dep.stop()
    assert dep.owned_processes() == []
    assert result is not None and result["done"], (result, errors)
    assert result["nodes_connected"] == DEPLOYED.nodes, errors
    assert [r["round"] for r in result["rounds"]] == list(range(1, DEPLOYED.rounds + 1))
    for rnd in result["rounds"]:
        assert len(rnd["verdicts"]) == DEPLOYED.nodes, rnd
        assert set(rnd["verdicts"].values()) == {"ok"}, rnd
    assert result["passed"] and result["error"] is None
    assert status == "finished:completed", errors
