"""``flwr run .`` runs the same ServerApp and ClientApp on a prepared run folder.

Flower's CLI starts a detached local SuperLink that outlives it; this test
gives it its own FLWR_HOME and port and kills it by PID when done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser
from cli.overrides import collect_overrides
from server.config import load_config
from simulation import prepare_run
from tests.conftest import free_port, small_run_args

pytestmark = [pytest.mark.integration, pytest.mark.long]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _kill_superlinks(flwr_home: Path) -> None:
    """Kill every process whose command line names this test's FLWR_HOME."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(flwr_home) in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_flwr_run_completes_a_prepared_run(tmp_path: Path) -> None:
    """A run folder from ``pollinate simulate --prepare-only`` runs under
    ``flwr run .`` to completion, with the same metrics file.

    Breaks if the app components in pyproject.toml are wrong, the FAB misses a
    module, or the apps race on imports when Flower loads them together.
    """
    args = build_parser().parse_args(small_run_args(tmp_path / "runs"))
    run_dir = prepare_run(load_config(None, collect_overrides(args)))
    flwr_home = tmp_path / "flwr-home"
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    try:
        out = subprocess.run(
            [
                str(bin_dir / "flwr"),
                "run",
                ".",
                "--stream",
                "--run-config",
                f'run-dir="{run_dir}"',
                "--federation-config",
                "num-supernodes=2 client-resources-num-cpus=1",
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        _kill_superlinks(flwr_home)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed", out.stdout[-3000:] + out.stderr[-3000:]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads(rows[1])["clients"] == 2
