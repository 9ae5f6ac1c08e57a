"""Edge clients in a federation: simulation config, the run folder, ``client join``.

Simulation: ``[federation] edge_share``/``edge_clients`` make some simulated
clients edge clients (ONNX Runtime, no torch); preparation exports one bundle
into the run folder and :meth:`RunFolder.edge_bundle` hands it to exactly
those partitions. Deployment: ``pollinate client join --runtime onnx
--bundle DIR`` checks the bundle before the SuperNode starts, and the whole
join path imports no torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Error, Message
from rich.console import Console

from cli.main import main
from cli.simulate import report_run
from client.app import build_client_app
from client.node import NodeSettings
from corpora import generate_tasks, write_jsonl
from protocols.edge_bundle import read_bundle
from protocols.model_hash import state_hash
from protocols.run_folder import RunFolder, RunFolderError
from protocols.zo_messages import (
    MESSAGE_TRAIN_ZO,
    decode_zo_train_ins,
    decode_zo_train_res,
)
from server.app import run_server
from server.config import ConfigError, RunConfig, load_config
from simulation.edge import edge_partitions, ensure_edge_bundle
from simulation.inprocess import InProcessGrid
from simulation.launcher import LaunchResult
from simulation.prepare import prepare_run
from tests.torch_blocker import run_without

K = 16


def _config(tmp_path: Path, **overrides: Any) -> RunConfig:
    settings: dict[str, Any] = {
        "run.method": "fedkseed",
        "run.rounds": 3,
        "run.output_dir": str(tmp_path / "runs"),
        "model.name": "tiny-llama",
        "model.max_length": 64,
        "federation.clients": 3,
        "data.limit": 60,
        "data.eval_examples": 6,
        "zo.num_seeds": K,
        "zo.eps": 1e-3,
        "zo.learning_rate": 1e-3,
        "train.local_steps": 2,
        "train.batch_size": 2,
        "eval.max_new_tokens": 2,
    }
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, settings)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared 3-client FedKSeed run folder with one edge client (share 1/3)."""
    tmp = tmp_path_factory.mktemp("edge-run")
    config = _config(tmp, federation__edge_share=0.34)
    return prepare_run(config, tmp / "run")


# -- config ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"run.method": "lora", "federation.edge_share": 0.5},
            "edge clients train fedkseed and fedkseed-pro, not 'lora'",
        ),
        (
            {"run.method": "sfprompt", "federation.edge_clients": [0]},
            "not 'sfprompt'",
        ),
        (
            {"run.method": "fedkseed", "federation.edge_clients": [1, 4]},
            "federation.edge_clients [4]: partition ids run from 0 to 3",
        ),
        (
            {"run.method": "fedkseed", "federation.edge_share": 0.1},
            "edge_share 0.1 of 4 clients rounds to no edge client",
        ),
        ({"run.method": "fedkseed", "federation.edge_share": 1.5}, "edge_share"),
    ],
)
def test_edge_settings_that_cannot_work_are_refused_in_one_line(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_the_edge_clients_are_a_rounded_share_drawn_from_the_run_seed(
    tmp_path: Path,
) -> None:
    """round(share x clients), half up, chosen by the run seed; explicit ids win."""

    def pick(seed: int, **overrides: Any) -> tuple[int, ...]:
        return edge_partitions(
            _config(
                tmp_path,
                run__seed=seed,
                federation__clients=10,
                data__limit=120,
                **overrides,
            )
        )

    picks = {seed: pick(seed, federation__edge_share=0.25) for seed in range(6)}
    assert all(len(p) == 3 for p in picks.values())  # 2.5 rounds half up
    assert len(set(picks.values())) > 1, "the seed does not change the choice"
    assert pick(3, federation__edge_share=0.25) == picks[3]
    assert len(pick(0, federation__edge_share=0.24)) == 2
    explicit = {"federation__edge_share": 1.0, "federation__edge_clients": [7, 0, 7]}
    assert pick(0, **explicit) == (0, 7)
    assert pick(0) == ()


# -- run folder --------------------------------------------------------------
def test_prepare_exports_one_bundle_for_the_chosen_partitions_only(
    prepared: Path,
) -> None:
    folder = RunFolder(prepared)
    config = load_config(folder.config)
    edge = edge_partitions(config)
    assert len(edge) == 1 and folder.edge_partitions() == edge
    bundle = read_bundle(folder.edge_bundle_dir)
    assert bundle.spec.num_seeds == K and bundle.spec.model == "tiny-llama"
    for pid in range(3):
        got = folder.edge_bundle(pid)
        assert got == (folder.edge_bundle_dir if pid in edge else None)
    assert json.loads(folder.partitions.read_text())["edge"] == list(edge)


def test_a_run_without_edge_clients_has_no_bundle(tmp_path: Path) -> None:
    run_dir = prepare_run(_config(tmp_path, run__rounds=1), tmp_path / "run")
    folder = RunFolder(run_dir)
    assert folder.edge_partitions() == ()
    assert not folder.edge_bundle_dir.exists()
    assert [folder.edge_bundle(p) for p in range(3)] == [None, None, None]
    assert ensure_edge_bundle(run_dir) is None


def _copy(prepared: Path, tmp_path: Path) -> RunFolder:
    return RunFolder(shutil.copytree(prepared, tmp_path / "run", symlinks=True))


@pytest.mark.parametrize(
    "edge",
    [[0, 0], [2, 1], [3], [-1], ["1"], [True], 1, {"0": 1}],
)
def test_a_tampered_edge_list_is_refused(
    prepared: Path, tmp_path: Path, edge: object
) -> None:
    folder = _copy(prepared, tmp_path)
    record = json.loads(folder.partitions.read_text())
    record["edge"] = edge
    folder.partitions.write_text(json.dumps(record))
    with pytest.raises(RunFolderError, match="partitions.json is damaged: 'edge'"):
        folder.edge_bundle(0)


def test_a_bundle_outside_the_run_folder_or_missing_is_refused(
    prepared: Path, tmp_path: Path
) -> None:
    folder = _copy(prepared, tmp_path)
    (pid,) = folder.edge_partitions()
    outside = shutil.move(folder.edge_bundle_dir, tmp_path / "elsewhere")
    with pytest.raises(RunFolderError, match="is missing"):
        folder.edge_bundle(pid)
    folder.edge_bundle_dir.symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunFolderError, match="leaves the run folder"):
        folder.edge_bundle(pid)
    with pytest.raises(RunFolderError, match="leaves the run folder"):
        ensure_edge_bundle(folder.path)


def test_resume_keeps_a_good_bundle_refuses_a_tampered_one_and_redoes_a_missing_one(
    prepared: Path, tmp_path: Path
) -> None:
    folder = _copy(prepared, tmp_path)
    model = folder.edge_bundle_dir / "model.onnx"
    before = model.stat().st_mtime_ns
    assert ensure_edge_bundle(folder.path) == folder.edge_bundle_dir
    assert model.stat().st_mtime_ns == before, "a good bundle was exported again"
    tokenizer = folder.edge_bundle_dir / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"', "'", 1))
    with pytest.raises(RunFolderError, match=r"tokenizer.json sha256 .* remove"):
        ensure_edge_bundle(folder.path)
    shutil.rmtree(folder.edge_bundle_dir)
    assert ensure_edge_bundle(folder.path) == folder.edge_bundle_dir
    read_bundle(folder.edge_bundle_dir)
    assert not list(folder.path.glob(".edge-bundle*")), "a staging folder was left"


# -- client join --runtime onnx ------------------------------------------------
def _join_args(data: Path, bundle: Path, tmp_path: Path) -> list[str]:
    return [
        "client",
        "join",
        "--server",
        "127.0.0.1:1",
        "--data",
        str(data),
        "--insecure",
        "--state-dir",
        str(tmp_path / "node"),
        "--max-restarts",
        "0",
        "--runtime",
        "onnx",
        "--bundle",
        str(bundle),
    ]


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "mine.jsonl"
    write_jsonl(generate_tasks(6, seed=0), path)
    return path


def test_join_refuses_a_missing_or_tampered_bundle_in_one_line(
    prepared: Path, tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = Path(shutil.copytree(RunFolder(prepared).edge_bundle_dir, tmp_path / "b"))
    assert main(_join_args(data_file, tmp_path / "nothing", tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no readable bundle.json" in err, err
    w0 = bundle / "w0.safetensors"
    data = bytearray(w0.read_bytes())
    data[-1] ^= 1
    w0.write_bytes(bytes(data))
    assert main(_join_args(data_file, bundle, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("pollinate client join: error: --runtime onnx: bundle")
    assert err.count("\n") == 1 and "w0.safetensors sha256" in err, err
    assert not (tmp_path / "node").exists(), "something started before the check"
    args = _join_args(data_file, bundle, tmp_path)[:-4]
    assert main([*args, "--bundle", str(bundle)]) == 2
    assert "a bundle is for runtime 'onnx'" in capsys.readouterr().err
    onnx = ["--runtime", "onnx", "--bundle", str(RunFolder(prepared).edge_bundle_dir)]
    assert main([*args, *onnx, "--method", "lora"]) == 2
    assert "trains ['fedkseed', 'fedkseed-pro'], not ['lora']" in (
        capsys.readouterr().err
    )


JOIN_WITHOUT_TORCH = """
import client.daemon as daemon

started = []

class FakeSuperNode:
    pid = 0
    def wait(self):
        return 0
    def poll(self):
        return 0

def fake_start(s):
    started.append(daemon.supernode_command(s))
    return FakeSuperNode()

daemon.start_supernode = fake_start
from cli.main import main
code = main(ARGS)
assert code == 0, code
(cmd,) = started
config = cmd[cmd.index("--node-config") + 1]
print(config)
assert cmd[0].endswith("flower-supernode"), cmd
"""


def test_the_join_path_imports_no_torch_and_names_the_bundle_in_the_node_config(
    prepared: Path, tmp_path: Path, data_file: Path
) -> None:
    """``pollinate client join --runtime onnx`` from argument parsing through the
    bundle check to the SuperNode's command line, in an interpreter where
    torch, transformers, peft and accelerate cannot be imported."""
    bundle = RunFolder(prepared).edge_bundle_dir
    args = _join_args(data_file, bundle, tmp_path)
    code = f"ARGS = {args!r}\n" + JOIN_WITHOUT_TORCH
    out = run_without(code)
    assert out.returncode == 0, out.stderr[-3000:]
    config = out.stdout.strip().splitlines()[-1]
    assert f'runtime="onnx" bundle="{bundle.resolve()}"' in config
    assert 'methods="fedkseed,fedkseed-pro"' in config


def test_the_join_command_refuses_a_bad_bundle_without_torch(
    tmp_path: Path, data_file: Path
) -> None:
    """The same refusal in a torch-free interpreter, as on an edge device."""
    args = _join_args(data_file, tmp_path / "nothing", tmp_path)
    code = f"from cli.main import main\nassert main({args!r}) == 2\n"
    out = run_without(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--runtime onnx: bundle" in out.stderr


# -- a mixed federation in process --------------------------------------------
class _Tap:
    """The real ClientApp, recording each train.zo reply's synced model; the
    edge node is away in round 1 (it joins late and must replay from w0)."""

    def __init__(self, late: int) -> None:
        self.app = build_client_app()
        self.late = late
        self.synced: dict[tuple[int, int], str] = {}
        self.runtimes: dict[int, str] = {}

    def __call__(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if msg.metadata.message_type != MESSAGE_TRAIN_ZO:
            return self.app(msg, context)
        ins = decode_zo_train_ins(msg.content)
        self.runtimes[pid] = NodeSettings.from_context(context).runtime
        if pid == self.late and ins.config.server_round == 1:
            return Message(Error(code=0, reason="away"), reply_to=msg)
        reply = self.app(msg, context)
        assert not reply.has_error(), reply.error.reason
        res = decode_zo_train_res(reply.content, num_seeds=K, max_steps=2)
        self.synced[(pid, res.synced_round)] = res.synced_hash
        return reply

    def rounds_of(self, pid: int) -> list[int]:
        return sorted(r for p, r in self.synced if p == pid)


def test_a_mixed_federation_stays_on_the_server_hash_with_a_late_edge_client(
    prepared: Path, tmp_path: Path
) -> None:
    """Three clients, one of them an edge client (ONNX Runtime) that misses
    round 1: every reply of every round is accepted, and each client's
    reported synced model is the server's model of the round before, so the
    edge client replayed the history bit-exactly from w0 and then trained.
    The simulation report counts the edge clients.
    """
    folder = _copy(prepared, tmp_path)
    config = load_config(folder.config)
    (edge,) = folder.edge_partitions()
    tap = _Tap(late=edge)
    run_server(InProcessGrid(tap, 3, run_dir=folder.path), config, folder.path)
    assert folder.read_status().state == "completed"
    rows = folder.read_metrics()
    # Round 1's one rejection is the edge node's "away" error reply.
    assert [(r["clients"], r["rejected"]) for r in rows[1:]] == [(2, 1), (3, 0), (3, 0)]
    # Round 0's model is w0: the bundle's, hashed as the server hashes.
    w0 = state_hash(read_bundle(folder.edge_bundle_dir).load_w0())
    hashes = [w0, *(r["model_hash"] for r in rows[1:])]
    assert len(set(hashes)) == 4, "a round left the model as it was"
    assert tap.runtimes == {p: "onnx" if p == edge else "torch" for p in range(3)}
    for pid in range(3):
        assert tap.rounds_of(pid) == ([1, 2] if pid == edge else [0, 1, 2]), pid
    for (pid, synced_round), synced_hash in tap.synced.items():
        assert synced_hash == hashes[synced_round], (pid, synced_round)

    console = Console(record=True, width=200)
    result = LaunchResult(0, "completed", None, folder.simulation_log)
    assert report_run(result, folder.path, config, console) == 0
    assert f"edge clients (ONNX Runtime, no torch): 1 of 3 (partitions {edge})" in (
        console.export_text()
    )
