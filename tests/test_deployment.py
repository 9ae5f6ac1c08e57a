"""Real deployment on 127.0.0.1: ``pollinate server`` and ``pollinate client join``.

Every process is real (SuperLink, SuperNodes, per-message ClientApp
processes), listens on 127.0.0.1 on a free port, and is stopped by the test
that started it. These tests take minutes: they carry the ``deployment``
marker, run by ``.ci/run`` after the default suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.daemon import JoinSettings, make_node_key, supernode_command, supernode_env
from corpora import generate_tasks, write_jsonl
from server.certificates import TlsFiles, make_dev_pki
from server.deploy import read_server_info, start_superlink
from server.flower_cli import connected_nodes, register_node_keys
from server.processes import process_alive, stop_process_tree, wait_for_port
from simulation import read_metrics
from tests.conftest import deployment_config, free_port, small_run_args, wait_until

pytestmark = [pytest.mark.deployment, pytest.mark.integration]

POLLINATE = str(Path(sys.executable).parent / "pollinate")


class Cluster:
    """Client daemons started by a test, stopped by it."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        self.tmp_path, self.port = tmp_path, port
        self.procs: list[subprocess.Popen[bytes]] = []
        examples = generate_tasks(60, seed=3)
        self.data = []
        for i, label in enumerate("ab"):
            path = tmp_path / f"{label}.jsonl"
            write_jsonl(examples[i * 30 : (i + 1) * 30], path)
            self.data.append(path)

    def join(self, label: str, *extra: str) -> subprocess.Popen[bytes]:
        data = self.data["ab".index(label)]
        log = (self.tmp_path / f"daemon-{label}.log").open("ab")
        proc = subprocess.Popen(
            [
                POLLINATE,
                "client",
                "join",
                "--server",
                f"127.0.0.1:{self.port}",
                "--data",
                str(data),
                "--label",
                label,
                "--state-dir",
                str(self.tmp_path / f"node-{label}"),
                "--local-port",
                str(free_port()),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, free_port())
    yield c
    c.stop()
    # A server that failed a test may have left its SuperLink and gateway.
    for record in tmp_path.rglob("server.json"):
        info = json.loads(record.read_text())
        for pid in (info.get("gateway_pid"), info["pid"]):
            if isinstance(pid, int) and process_alive(pid):
                stop_process_tree(pid, grace_s=2.0)


def _server(
    cluster: Cluster,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 400,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [POLLINATE, "server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _start(
    cluster: Cluster, config: Path, *extra: str, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``pollinate server start CONFIG`` in plaintext on the cluster's port."""
    return _server(
        cluster,
        "start",
        str(config),
        "--insecure",
        "--port",
        str(cluster.port),
        *extra,
        **kwargs,
    )


def _run_dir(tmp_path: Path) -> Path:
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def test_a_deployed_federation_runs_to_completion(
    cluster: Cluster, tmp_path: Path
) -> None:
    """``server start`` plus two ``client join`` daemons complete a LoRA run:
    every round has both clients, the SuperLink and its fleet gateway are
    stopped at the end.

    Breaks if the app is not found by the SuperLink/SuperNodes, a client
    cannot read its data through the node config, the gateway does not
    relay the Fleet API, or the server leaks its SuperLink or gateway.
    """
    cluster.join("a", "--insecure")
    cluster.join("b", "--insecure")
    out = _start(cluster, deployment_config(tmp_path, 2))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run_dir = _run_dir(tmp_path)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["clients"] for r in rows] == [0, 2, 2]
    info = read_server_info(run_dir)
    # The SuperLink sits on loopback behind the gateway; both are gone now.
    assert info.superlink_port not in (None, cluster.port)
    assert not process_alive(info.pid)
    assert info.gateway_pid is not None and not process_alive(info.gateway_pid)


def _crash_after_round_2_and_resume(
    cluster: Cluster, tmp_path: Path, **config: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Start a 3-round run whose ServerApp dies after round 2, SIGKILL what is
    left of the server, resume it, then run the same config uninterrupted.

    Returns the resumed run's metrics rows and the reference run's.
    """
    cluster.join("a", "--insecure")
    cluster.join("b", "--insecure")
    crash = _start(
        cluster,
        deployment_config(tmp_path, 3, **config),
        env={"POLLINATE_FAULT_AFTER_ROUND": "2"},
    )
    assert crash.returncode != 0
    run_dir = _run_dir(tmp_path)
    before = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in before] == [0, 1, 2]
    stop_process_tree(read_server_info(run_dir).pid, grace_s=0)  # SIGKILL the rest
    resumed = _server(cluster, "resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[:3] == before, "resume rewrote rounds it did not redo"
    assert [(r["round"], r["clients"]) for r in rows] == [
        (0, 0),
        (1, 2),
        (2, 2),
        (3, 2),
    ]
    # The uninterrupted reference, on the same machine and clients.
    (tmp_path / "ref").mkdir()
    ref_config = deployment_config(tmp_path / "ref", 3, **config)
    ref = _start(cluster, ref_config)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    return rows, read_metrics(_run_dir(tmp_path / "ref") / "metrics.jsonl")


def test_sfprompt_devices_reach_the_trunk_of_a_deployed_server(
    cluster: Cluster, tmp_path: Path
) -> None:
    """SFPrompt on real SuperNodes over TLS: the devices reach the trunk
    service that the ServerApp starts, every round has both clients and no
    rejected reply, the trunk's traffic is counted, and the trunk serves
    TLS with the server's certificates although no ``[split] tls_*`` is set.
    (LoRA runs in the test above, FedKSeed in the crash-and-resume test.)

    Breaks if the trunk's address or the split messages only work in
    simulation, or if ``server start --certs`` leaves the trunk in plaintext.
    """
    pki = make_dev_pki(tmp_path / "pki")
    cluster.join("a", "--root-cert", str(pki.ca_cert))
    cluster.join("b", "--root-cert", str(pki.ca_cert))
    split = "[split]\nnum_prompts = 4\n"
    config = deployment_config(tmp_path, 2, extra=split, method="sfprompt")
    out = _server(
        cluster,
        "start",
        str(config),
        "--certs",
        str(pki.ca_cert.parent),
        "--port",
        str(cluster.port),
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run_dir = _run_dir(tmp_path)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["clients"], r["rejected"]) for r in rows[1:]] == [(2, 0), (2, 0)]
    assert all(r["method"] == "sfprompt" for r in rows[1:])
    # prompts and tail both ways, plus the activations and their gradients
    assert rows[1]["bytes_up"] > rows[1]["bytes_down"] > 0
    # The ServerApp's log, streamed into the run folder, names the trunk's TLS.
    log = (run_dir / "server.log").read_text()
    assert "SFPrompt trunk service on" in log and "(TLS)" in log, log[-2000:]


def test_a_killed_server_resumes_and_ends_where_an_uninterrupted_one_does(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The ServerApp dies after round 2 (like SIGKILL) and its SuperLink is
    SIGKILLed; the daemons re-join the restarted server; ``server resume``
    finishes with the same metrics as an uninterrupted run.

    Breaks if the checkpoint misses state, the daemons do not reconnect, or
    resume redoes or skips rounds.
    """
    rows, ref_rows = _crash_after_round_2_and_resume(cluster, tmp_path)
    for got, want in zip(rows, ref_rows, strict=True):
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-4)
        assert (
            got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
            if got["train_loss"] is not None
            else want["train_loss"] is None
        )


FEDKSEED = """[zo]
num_seeds = 32
eps = 1e-3
learning_rate = 1e-3
"""


def test_fedkseed_daemons_resume_a_killed_server_to_the_same_model_hash(
    cluster: Cluster, tmp_path: Path
) -> None:
    """FedKSeed in deployment: every ClientApp is a fresh process, so a node's
    synced model lives in its ``--state-dir`` snapshots. The server dies after
    round 2 and is resumed; every round's model hash equals that of an
    uninterrupted run, and no reply was ever out of sync.

    Breaks if node snapshots are not shared across a SuperNode's processes
    (replies would be rejected), the seed history is not checkpointed, or
    resume rebuilds a different model.
    """
    rows, ref_rows = _crash_after_round_2_and_resume(
        cluster, tmp_path, extra=FEDKSEED, method="fedkseed"
    )
    assert [r["rejected"] for r in rows[1:]] == [0, 0, 0]
    # Each node kept its synced model on its own disk.
    for label in "ab":
        assert list((tmp_path / f"node-{label}" / "zo-state").rglob("*.safetensors"))
    hashes = [r["model_hash"] for r in rows[1:]]
    assert hashes == [r["model_hash"] for r in ref_rows[1:]]
    assert len(set(hashes)) == 3, "a round left the model as it was"


def test_server_status_stop_and_resume_of_a_detached_run(
    cluster: Cluster, tmp_path: Path
) -> None:
    """``server start --detach`` returns at once; ``server status`` shows the
    rounds done, the connected clients and the metrics table; ``server stop``
    stops the SuperLink and marks the run stopped; ``server resume`` finishes it.

    Breaks if status misreads the run folder or the SuperLink, stop leaves the
    server running or the run looking alive, or a stopped run cannot resume.
    """
    cluster.join("a", "--insecure")
    cluster.join("b", "--insecure")
    config = deployment_config(tmp_path, 4)
    started = _start(cluster, config, "--detach", timeout=120)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    run_dir = _run_dir(tmp_path)
    info = read_server_info(run_dir)
    assert process_alive(info.pid)

    def one_round_done() -> bool:
        path = run_dir / "metrics.jsonl"
        return path.exists() and len(read_metrics(path)) >= 2

    wait_until(one_round_done, 300, "the detached run to finish round 1")
    status = _server(cluster, "status", str(run_dir), timeout=60)
    assert status.returncode == 0, status.stderr
    text = " ".join(status.stdout.split())
    assert f"server up at 127.0.0.1:{cluster.port}" in text
    assert "clients connected: 2" in text
    assert re.search(r"lora: [1-4]/4 rounds", text), text

    stopped = _server(cluster, "stop", str(run_dir), timeout=60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not process_alive(info.pid)
    assert info.gateway_pid is not None and not process_alive(info.gateway_pid)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    after = _server(cluster, "status", str(run_dir), timeout=60)
    assert "stopped; server down" in " ".join(after.stdout.split())
    again = _server(cluster, "stop", str(run_dir), timeout=60)
    assert again.returncode == 1 and "no server running" in again.stderr

    resumed = _server(cluster, "resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"


def test_unknown_nodes_and_plaintext_clients_are_refused(tmp_path: Path) -> None:
    """With TLS and node authentication on, a node without a registered key
    and a node speaking plaintext are refused (their SuperNodes exit with an
    error), while a node with a registered key joins and shows online."""
    pki = make_dev_pki(tmp_path / "pki")
    tls = TlsFiles(pki.ca_cert, pki.server_cert, pki.server_key)
    port = free_port()
    run_dir = tmp_path / "srv"
    run_dir.mkdir()
    superlink = start_superlink(run_dir, "127.0.0.1", port, tls=tls, auth=True)
    procs = []
    try:
        data = tmp_path / "d.jsonl"
        write_jsonl(generate_tasks(10, seed=0), data)
        good, good_pub = make_node_key(tmp_path / "keys", "good")
        bad, _ = make_node_key(tmp_path / "keys", "unregistered")
        register_node_keys(run_dir, f"127.0.0.1:{port}", tls, [good_pub])

        def node(label: str, **kw: object) -> subprocess.Popen[bytes]:
            s = JoinSettings(
                server=f"127.0.0.1:{port}",
                data=data,
                label=label,
                state_dir=tmp_path / label,
                local_port=free_port(),
                **kw,
            )
            s.state_dir.mkdir()
            cmd = supernode_command(s) + ["--max-retries", "2", "--max-wait-time", "20"]
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=supernode_env(s),
                start_new_session=True,
            )
            procs.append(proc)
            return proc

        accepted = node("registered", root_certificates=pki.ca_cert, auth_key=good)
        unknown = node("unknown", root_certificates=pki.ca_cert, auth_key=bad)
        plaintext = node("plaintext", insecure=True)
        assert unknown.wait(timeout=120) != 0, "a node with an unregistered key joined"
        assert plaintext.wait(timeout=120) != 0, "a plaintext node joined a TLS server"
        assert accepted.poll() is None, "the registered node was refused"
        nodes = connected_nodes(run_dir, f"127.0.0.1:{port}", tls)
        assert [n for n in nodes if str(n.get("status", "")).startswith("online")]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        stop_process_tree(superlink.pid)


def test_a_simulation_runs_on_an_existing_ray_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With RAY_ADDRESS set, the engine's clients run on that Ray cluster (a
    local single-node one here) and find their data through the app, not
    through environment variables of the cluster's workers."""
    from cli.main import main as cli_main

    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    # Ray writes the cluster's address to <temp-dir>/ray_current_cluster and
    # only `ray stop` removes it; killing the head leaves it. An own, short
    # temp folder (it holds Unix sockets) keeps that file out of /tmp/ray.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    # --block keeps the head in the foreground: the test stops exactly this
    # cluster (its process group), never other Ray nodes on the machine.
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            "--temp-dir",
            str(ray_tmp),
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port, 120.0, head)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        code = cli_main(small_run_args(tmp_path))
        assert code == 0
        (run_dir,) = tmp_path.iterdir()
        log = (run_dir / "simulation.log").read_text()
        assert f"joining the existing Ray cluster at 127.0.0.1:{port}" in log
        assert read_metrics(run_dir / "metrics.jsonl")[1]["clients"] == 2
    finally:
        stop_process_tree(head.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_client_killed_mid_run_does_not_stop_the_round(
    cluster: Cluster, tmp_path: Path
) -> None:
    """One of two clients is killed after round 1: later rounds complete with
    the other once the round timeout passes, and the run finishes."""
    cluster.join("a", "--insecure")
    victim = cluster.join("b", "--insecure")
    config = deployment_config(tmp_path, 3, extra="")
    text = config.read_text().replace("round_timeout_s = 90", "round_timeout_s = 25")
    config.write_text(text)
    server = subprocess.Popen(
        [
            POLLINATE,
            "server",
            "start",
            str(config),
            "--insecure",
            "--port",
            str(cluster.port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        metrics = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for round 1 to be recorded
            runs = list((tmp_path / "runs").glob("*/metrics.jsonl"))
            if runs and len(runs[0].read_text().splitlines()) >= 2:
                metrics = runs[0]
                break
            assert server.poll() is None, "the server ended before round 1"
            time.sleep(0.5)  # polling the run folder for a condition
        assert metrics is not None, "round 1 never completed"
        log = (tmp_path / "daemon-b.log").read_text()
        supernode = int(re.findall(r"SuperNode started \(pid (\d+)\)", log)[-1])
        os.killpg(victim.pid, signal.SIGKILL)  # the daemon: no restart
        os.killpg(supernode, signal.SIGKILL)  # its SuperNode and ClientApp processes
        assert server.wait(timeout=400) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    rows = read_metrics(metrics)
    assert rows[1]["clients"] == 2
    assert [r["clients"] for r in rows[2:]] == [1, 1]


def test_lora_updates_are_summed_under_secagg_by_deployed_daemons(
    cluster: Cluster, tmp_path: Path
) -> None:
    """``privacy.secagg``: two ``client join`` daemons answer Flower's four
    SecAgg+ stages through the gateway (each stage a fresh ClientApp
    process, the mod's keys kept in the node's context), and the server
    applies the unmasked mean.

    Breaks if the default ``train`` handler or Flower's mod is not served in
    deployment, if a stage's state does not survive between messages, or if
    the secure result does not reach the strategy.
    """
    cluster.join("a", "--insecure")
    cluster.join("b", "--insecure")
    extra = "[privacy]\nsecagg = true\nsecagg_shares = 3\nsecagg_threshold = 2\n"
    out = _start(cluster, deployment_config(tmp_path, 1, extra))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = read_metrics(_run_dir(tmp_path) / "metrics.jsonl")
    assert [r["clients"] for r in rows] == [0, 2]
    assert rows[-1]["secagg_survivors"] == 2 and rows[-1]["rejected"] == 0
