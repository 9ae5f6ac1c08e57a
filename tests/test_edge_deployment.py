"""A deployed FedKSeed federation with one torch client and one edge client.

The server (``pollinate server start``) and the torch client run in this
(full) environment; the edge client is ``pollinate client join --runtime
onnx`` from the slim edge environment named by ``$POLLINATE_EDGE_VENV``
(``.ci/run`` builds it: no torch, see ``edge-requirements.txt``), so its
SuperNode and ClientApp processes cannot import torch at all. Every round
both clients must answer with the server's model hash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corpora import generate_tasks, write_jsonl
from server.edge_bundle import export_edge
from simulation import read_metrics
from tests.conftest import REPO_ROOT, deployment_config, free_port

pytestmark = [pytest.mark.deployment, pytest.mark.integration]

VENV_ENV = "POLLINATE_EDGE_VENV"
FEDKSEED = """[zo]
num_seeds = 32
eps = 1e-3
learning_rate = 1e-3
"""


@pytest.fixture(scope="module")
def edge_venv() -> Path:
    """The slim edge environment; a failure (not a skip) when it is not given."""
    value = os.environ.get(VENV_ENV)
    if not value:
        pytest.fail(
            f"set {VENV_ENV} to the slim edge environment (.ci/run builds "
            "it as .ci-edge-venv: pip install --no-deps -e . && pip install "
            "-c constraints.txt -r edge-requirements.txt)"
        )
    venv = Path(value).resolve()
    python = venv / "bin" / "python"
    assert python.is_file(), f"{VENV_ENV}={value}: no {python}"
    probe = subprocess.run(
        [str(python), "-c", "import torch"], capture_output=True, timeout=60
    )
    assert probe.returncode != 0, f"{venv} can import torch: not the edge env"
    return venv


def _slim_env(venv: Path) -> dict[str, str]:
    """This environment with the slim venv first on PATH and no Python leaks."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


@pytest.fixture()
def daemons() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_torch_client_and_an_edge_client_stay_on_the_server_hash(
    tmp_path: Path, edge_venv: Path, daemons: list[subprocess.Popen[bytes]]
) -> None:
    """Three FedKSeed rounds on a real SuperLink: every round has both
    clients and no rejected reply (a reply is accepted only with the
    server's model hash), and the model changes every round.

    Breaks if the edge client needs torch, its bundle or replay differs from
    the server's model, or ``client join --runtime onnx`` does not reach the
    edge handler through a real SuperNode.
    """
    port = free_port()
    config = deployment_config(tmp_path, 3, extra=FEDKSEED, method="fedkseed")
    bundle = export_edge(config, tmp_path / "bundle")  # the full environment
    examples = generate_tasks(60, seed=3)
    runs = {
        "torch": (Path(sys.executable).parent / "pollinate", os.environ.copy(), []),
        "edge": (
            edge_venv / "bin" / "pollinate",
            _slim_env(edge_venv),
            ["--runtime", "onnx", "--bundle", str(bundle)],
        ),
    }
    for i, (label, (tool, env, extra)) in enumerate(runs.items()):
        data = tmp_path / f"{label}.jsonl"
        write_jsonl(examples[i * 30 : (i + 1) * 30], data)
        log = (tmp_path / f"daemon-{label}.log").open("ab")
        daemons.append(
            subprocess.Popen(
                [
                    str(tool),
                    "client",
                    "join",
                    "--server",
                    f"127.0.0.1:{port}",
                    "--data",
                    str(data),
                    "--label",
                    label,
                    "--insecure",
                    "--state-dir",
                    str(tmp_path / f"node-{label}"),
                    "--local-port",
                    str(free_port()),
                    *extra,
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    server = subprocess.run(
        [
            str(Path(sys.executable).parent / "pollinate"),
            "server",
            "start",
            str(config),
            "--insecure",
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )
    edge_log = (tmp_path / "daemon-edge.log").read_text(errors="replace")
    assert server.returncode == 0, (
        server.stdout[-2000:] + server.stderr[-2000:] + edge_log[-2000:]
    )
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["clients"], r["rejected"]) for r in rows[1:]] == [(2, 0)] * 3, rows
    assert len({r["model_hash"] for r in rows[1:]}) == 3
    assert all(d.poll() is None for d in daemons), "a client daemon gave up"
    # The edge node kept its synced model as NumPy snapshots on its own disk.
    assert list((tmp_path / "node-edge" / "zo-state").rglob("*.safetensors"))
