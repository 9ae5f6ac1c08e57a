"""Starting, watching and stopping the engine process of a simulation.

``pollinate simulate`` owns every process it starts: the engine runs in its
own session (process group) with its output in ``simulation.log``; Ray's
processes join that group. Whatever happens (success, a crash, Ctrl-C) the
group is stopped before this returns, and a run counts as successful only if
the engine exited 0 *and* ``status.json`` says ``completed``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from simulation.reports import ReportError, read_metrics

__all__ = ["LaunchResult", "engine_env", "launch"]

ZO_STATE_DIR = ".zo-state"


@dataclass(frozen=True, slots=True)
class LaunchResult:
    """How the engine ended."""

    returncode: int
    state: str
    error: str | None
    log_path: Path

    @property
    def ok(self) -> bool:
        """True when the run completed."""
        return self.returncode == 0 and self.state == "completed"


def engine_env(run_dir: Path) -> dict[str, str]:
    """The engine's environment: offline, no telemetry, Flower state in the run."""
    env = dict(os.environ)
    env.update(
        {
            "POLLINATE_RUN_DIR": str(run_dir),
            "POLLINATE_ZO_STATE_DIR": str(run_dir / ZO_STATE_DIR),
            "FLWR_HOME": str(run_dir / ".flwr"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the engine's process group, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # The leader is gone; stragglers (Ray workers) may remain.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


def _rounds_done(metrics: Path) -> list[dict[str, object]]:
    if not metrics.exists():
        return []
    try:
        return read_metrics(metrics)
    except ReportError:
        return []


def _watch(
    proc: subprocess.Popen[bytes], run_dir: Path, rounds: int, console: Console
) -> None:
    """Show a progress bar over rounds until the engine exits."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("federated training", total=rounds, last="starting engine")
        while proc.poll() is None:
            rows = _rounds_done(run_dir / "metrics.jsonl")
            if rows:
                last = rows[-1]
                text = (
                    f"round {last['round']}: eval loss {last['eval_loss']:.3f}, "
                    f"{last['eval_metric_name']} {100 * float(last['eval_metric']):.1f}%"
                )
                bar.update(task, completed=int(last["round"]), last=text)
            time.sleep(0.5)  # UI refresh rate; the engine's exit ends the loop
        rows = _rounds_done(run_dir / "metrics.jsonl")
        if rows:
            bar.update(task, completed=int(rows[-1]["round"]))


def launch(
    run_dir: Path,
    *,
    rounds: int,
    console: Console | None = None,
    resume: bool = False,
    env: dict[str, str] | None = None,
) -> LaunchResult:
    """Run the engine on a prepared ``run_dir`` and wait for it, owning its processes.

    ``resume`` continues from the run's last checkpoint; ``env`` adds variables
    to the engine's environment.
    """
    console = console or Console(stderr=True)
    log_path = run_dir / "simulation.log"
    with log_path.open("ab" if resume else "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulation.engine", str(run_dir)]
            + (["--resume"] if resume else []),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**engine_env(run_dir), **(env or {})},
            start_new_session=True,
        )
        try:
            _watch(proc, run_dir, rounds, console)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping the simulation[/]")
        finally:
            _stop_group(proc)
            # Clients' seed-sync snapshots are scratch: the checkpoint has the state.
            shutil.rmtree(run_dir / ZO_STATE_DIR, ignore_errors=True)
    status_path = run_dir / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    returncode = proc.returncode if proc.returncode is not None else -1
    return LaunchResult(
        returncode=returncode,
        state=str(status.get("state", "not started")),
        error=status.get("error"),
        log_path=log_path,
    )
