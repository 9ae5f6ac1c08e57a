"""Write the slim edge tests' fixture with the full (torch) environment.

``python -m tests.edge_slim.make_fixture OUT`` writes into the new folder OUT:

``run.toml``
    A small tiny-llama FedKSeed run's config.
``bundle/``
    Its edge bundle (``pollinate export run.toml --format edge``).
``train_ins.bin``
    A real ``train.zo`` instruction of the server's driver for round 3, to a
    node that never trained: its content (a Flower ``RecordDict`` as protobuf
    bytes) carries the spec, the history of rounds 1-2 that two torch clients
    trained, and the server's model hash after round 2.
``expected.json``
    The server's model hash after each round (0: w0), computed with torch,
    and the local steps a reply must carry.
``data.jsonl``
    The edge node's examples.

:mod:`tests.edge_slim.test_edge_slim` replays and trains from these in an
environment without torch and must reach the same hashes bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_to_proto

from client.app import build_client_app
from client.runtime import ClientRuntime
from corpora import generate_tasks, write_jsonl
from server.app import build_driver
from server.config import config_to_toml, load_config
from server.edge_bundle import export_edge
from simulation.inprocess import use_server_identity

ROUNDS = 2
LOCAL_STEPS = 3
EDGE_NODE = 9
SETTINGS = {
    "run.method": "fedkseed",
    "model.name": "tiny-llama",
    "model.max_length": 64,
    "data.limit": 60,
    "data.eval_examples": 6,
    "zo.num_seeds": 32,
    "zo.learning_rate": 1e-3,
    "zo.eps": 1e-3,
    "train.local_steps": LOCAL_STEPS,
    "train.batch_size": 2,
    "eval.max_new_tokens": 2,
}


def make_fixture(out: Path) -> None:
    """Write the fixture (see the module docstring) into the new folder ``out``."""
    out.mkdir(parents=True)
    config = load_config(None, SETTINGS)
    (out / "run.toml").write_text(config_to_toml(config))
    export_edge(out / "run.toml", out / "bundle")
    use_server_identity()
    examples = generate_tasks(48, seed=1)
    driver = build_driver(config, examples[:4])
    hashes = [driver.hash]
    app = build_client_app(ClientRuntime())
    contexts = {}
    for node in (1, 2):
        path = out / f"torch-{node}.jsonl"
        write_jsonl(examples[node * 12 : node * 12 + 12], path)
        contexts[node] = Context(
            run_id=7,
            node_id=node,
            node_config={"data-path": str(path), "label": f"n{node}"},
            state=RecordDict(),
            run_config={},
        )
    for server_round in range(1, ROUNDS + 1):
        messages = driver.configure(server_round, {1: "n1", 2: "n2"})
        replies = [app(m, contexts[m.metadata.dst_node_id]) for m in messages]
        result = driver.apply(
            server_round, [(f"n{r.metadata.src_node_id}", r) for r in replies]
        )
        assert result.rejected == 0 and result.clients == 2, result
        hashes.append(driver.hash)
    nodes = {1: "n1", 2: "n2", EDGE_NODE: "edge"}
    (message,) = [
        m
        for m in driver.configure(ROUNDS + 1, nodes)
        if m.metadata.dst_node_id == EDGE_NODE
    ]
    content = recorddict_to_proto(message.content).SerializeToString()
    (out / "train_ins.bin").write_bytes(content)
    write_jsonl(examples[36:48], out / "data.jsonl")
    expected = {"hashes": hashes, "local_steps": LOCAL_STEPS, "round": ROUNDS + 1}
    (out / "expected.json").write_text(json.dumps(expected, indent=1))


if __name__ == "__main__":
    make_fixture(Path(sys.argv[1]))
    print(f"edge fixture written to {sys.argv[1]}")
