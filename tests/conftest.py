"""Shared fixtures: offline environment, Flower task identity, data paths."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (servers in tests bind there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(pythonpath: Path | None = None) -> dict[str, str]:
    """This environment with ``PYTHONPATH`` dropped (or set to ``pythonpath``)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def run_python(
    code: str,
    cwd: Path,
    *,
    pythonpath: Path | None = None,
    timeout: float = 300,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``python -c code`` in a fresh interpreter run from ``cwd``, output captured."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=clean_env(pythonpath),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``.

    For states another process reaches on its own time (a round finishing),
    where there is no event to wait on.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)


def small_run_args(
    out: Path,
    *extra: str,
    rounds: int = 1,
    clients: int = 2,
    local_steps: int = 2,
    limit: int = 120,
    eval_examples: int = 8,
    max_new_tokens: int = 2,
) -> list[str]:
    """``pollinate simulate`` arguments of a small tiny-llama run under ``out``."""
    return [
        "simulate",
        "--model",
        "tiny-llama",
        "--rounds",
        str(rounds),
        "--clients",
        str(clients),
        "--local-steps",
        str(local_steps),
        "--limit",
        str(limit),
        "--output-dir",
        str(out),
        "--set",
        f"data.eval_examples={eval_examples}",
        "--set",
        f"eval.max_new_tokens={max_new_tokens}",
        *extra,
    ]


def deployment_config(
    tmp_path: Path,
    rounds: int,
    extra: str = "",
    method: str = "lora",
    *,
    local_steps: int = 2,
    eval_examples: int = 8,
) -> Path:
    """``tmp_path/run.toml`` of a small tiny-llama run of 2 deployed clients
    (``server start``): its run folders go to ``tmp_path/runs``; ``extra`` is
    appended TOML (a ``[split]`` table, say)."""
    path = tmp_path / "run.toml"
    path.write_text(
        f"""[run]
rounds = {rounds}
method = "{method}"
output_dir = "{tmp_path / "runs"}"
[model]
name = "tiny-llama"
[federation]
clients = 2
round_timeout_s = 90
[train]
local_steps = {local_steps}
batch_size = 4
[data]
limit = 120
eval_examples = {eval_examples}
[eval]
max_new_tokens = 2
{extra}"""
    )
    return path


def shared_data_dir() -> Path:
    """``shared/data`` beside the checkout (CI clones the repo next to it)."""
    return REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _offline() -> Iterator[None]:
    """Nothing in the suite may reach a model hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    yield


@pytest.fixture()
def flower_identity() -> Iterator[None]:
    """Let tests build Flower ``Message`` objects outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture()
def shared_data() -> Path:
    """Path of the real datasets; fails (not skips) when they are missing."""
    path = shared_data_dir()
    assert path.is_dir(), f"shared data folder not found at {path}"
    return path


if TYPE_CHECKING:
    from protocols import ZOSpec


def fake_zo_spec(num_seeds: int, learning_rate: float = 0.1) -> ZOSpec:
    """A valid FedKSeed spec for strategy-level tests (no model behind it)."""
    from protocols import ZOSpec
    from protocols.seeds import GENERATOR_VERSION

    return ZOSpec(
        model="tiny",
        walk_fingerprint="0" * 16,
        generator=GENERATOR_VERSION,
        include=(),
        num_seeds=num_seeds,
        master_seed=0,
        eps=1e-3,
        learning_rate=learning_rate,
        sampling="uniform",
        grad_clip=1000.0,
        max_length=64,
    )


class UnlimitedBudget:
    """The strategy of a fake round driver: no privacy budget to spend."""

    def budget_allows(self, sampled: int) -> bool:
        return True


class EmptyGrid:
    """A grid whose nodes answer nothing (fake drivers build their own results)."""

    def send_and_receive(self, messages: list[Any], timeout: float) -> list[Any]:
        return []


def run_fake_rounds(driver: Any, folder: Path, **kwargs: Any) -> int:
    """:func:`server.federation.run_rounds` of a fake driver over two nodes."""
    from protocols import ByteLedger
    from protocols.run_folder import RunFolder
    from server.federation import run_rounds
    from strategies import NodeBook

    return run_rounds(
        EmptyGrid(),  # type: ignore[arg-type]
        driver,
        NodeBook({1: "n1", 2: "n2"}),
        folder=RunFolder(folder),
        timeout_s=1.0,
        ledger=ByteLedger(),
        **kwargs,
    )


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test: tiny models gain nothing from more,
    and one thread avoids spin-waits on a busy CPU."""
    import torch  # here: the torch-free edge tests share this conftest

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
