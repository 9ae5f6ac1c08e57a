"""Section 5's runs: one ``pollinate simulate`` each, continued if killed.

On a shared machine a run can be ended from outside (``ray stop --force``
ends every Ray node of the machine). :func:`run_with_retry` continues a killed
run with ``pollinate resume`` from its last checkpoint and, if no attempt
makes progress, runs it once with the in-process harness
(:mod:`bench.fedkseed.inproc`: the same preparation, server loop and
ClientApp, no Ray). Outcomes are read from the run folder
(:func:`bench.harness.read_run`).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.fedkseed.settings import (
    MODEL,
    NI_PATH,
    PAPER_K,
    SIM_CLIENTS,
    SIM_EVAL,
    SIM_LIMIT,
    SIM_ROUNDS,
    ZO_EPS,
    ZO_INCLUDE,
)
from bench.harness import module_command, newest_run_dir, run_and_read, simulate_args

HARNESSES = ("pollinate", "resume", "inproc", "parse-only")

OUTCOME_KEYS = ("harness", "returncode", "status", "wall_s", "rounds_done", "timed_out")
"""The fields of a run that say how it went (kept of an attempt or a replaced run)."""


def outcome(run: dict[str, Any], *more: str) -> dict[str, Any]:
    """``run``'s :data:`OUTCOME_KEYS`, then ``more`` keys (``None`` where missing)."""
    return {k: run.get(k) for k in (*OUTCOME_KEYS, *more)}


def sim_base_args(out_dir: Path, name: str) -> list[str]:
    """The ``pollinate simulate`` arguments every section 5 run shares."""
    return simulate_args(
        name,
        out_dir,
        model=MODEL,
        dataset=NI_PATH,
        clients=SIM_CLIENTS,
        partition="task",
        limit=SIM_LIMIT,
        rounds=SIM_ROUNDS,
        eval_examples=SIM_EVAL,
        new_tokens=32,
    )


def zo_args(method: str, steps: int, batch: int, lr: float) -> list[str]:
    """The FedKSeed-specific arguments (K, eps, lr, include globs, steps, batch)."""
    include = "[" + ", ".join(f'"{g}"' for g in ZO_INCLUDE) + "]"
    return [
        "--set",
        f'run.method="{method}"',
        "--set",
        f"zo.num_seeds={PAPER_K}",
        "--set",
        f"zo.eps={ZO_EPS}",
        "--set",
        f"zo.learning_rate={lr}",
        "--set",
        f"zo.include={include}",
        "--local-steps",
        str(steps),
        "--batch-size",
        str(batch),
    ]


def sim_extra(name: str, zo_steps: int, zo_batch: int, lr: float) -> list[str]:
    """The method-specific ``pollinate simulate`` arguments of one section 5 run."""
    if name == "lora":
        return ["--local-steps", "10", "--batch-size", "8"]
    return zo_args(name, zo_steps, zo_batch, lr)


def run_simulation(
    name: str, extra: list[str], root: Path, timeout: float, harness: str = "pollinate"
) -> dict[str, Any]:
    """One run with ``harness`` (see :data:`HARNESSES`); its outcome.

    ``pollinate`` starts ``pollinate simulate``, ``resume`` continues the
    newest run folder under ``root/name``, ``inproc`` runs the in-process
    harness in a child process, ``parse-only`` only reads the newest folder.
    """
    out_dir = root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "pollinate"
    cli_args = [*sim_base_args(out_dir, name), *extra]
    if harness == "pollinate":
        cmd = [str(exe), *cli_args]
    elif harness == "resume":
        existing = newest_run_dir(out_dir)
        cmd = [str(exe), "resume", str(existing)]
    elif harness == "inproc":
        cmd = module_command(
            "bench.fedkseed", "--inproc-run", json.dumps({"cli": cli_args})
        )
    else:
        cmd = []
    log_path = root / f"{name}-{harness}-{datetime.now(UTC):%H%M%S}.log"
    return run_and_read(
        cmd,
        out_dir,
        log_path,
        timeout,
        labels={"name": name, "harness": harness},
        append=True,
    )


def _state(run: dict[str, Any]) -> str | None:
    return (run.get("status") or {}).get("state")


def _next_harness(out_dir: Path, first: bool) -> str | None:
    """How to go on with the runs under ``out_dir`` (None: reuse a completed one)."""
    from protocols.run_folder import RunFolder, RunFolderError

    existing = newest_run_dir(out_dir)
    if existing is None:
        return "pollinate"
    folder = RunFolder(existing)
    try:
        state = folder.read_status().state if folder.status_file.exists() else None
    except RunFolderError:
        state = None
    if state == "completed" and first:
        return None
    if folder.checkpoint_state.exists():
        return "resume"
    for p in sorted(q for q in out_dir.iterdir() if q.is_dir()):
        p.rename(p.with_name(p.name + "-abandoned"))  # nothing to continue from
    return "pollinate"


def run_with_retry(
    name: str, extra: list[str], root: Path, timeout: float, max_attempts: int = 4
) -> dict[str, Any]:
    """``pollinate simulate``, continued with ``pollinate resume`` if it is killed.

    A killed run is continued from its last checkpoint with ``pollinate
    resume`` (rounds are deterministic, so the metrics are those of an
    uninterrupted run); a run folder already under ``root`` (from a killed
    earlier invocation of this bench) is continued the same way, or reused
    when it completed. If no attempt makes progress, the in-process harness
    runs it once. ``wall_s_total`` sums every attempt.
    """
    out_dir = root / name
    attempts: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for _ in range(max_attempts):
        harness = _next_harness(out_dir, first=not attempts)
        if harness is None:
            result = run_simulation(name, extra, root, 0.001, harness="parse-only")
            result["reused_completed_run"] = True
            break
        before = result.get("rounds_done") or 0
        result = run_simulation(name, extra, root, timeout, harness=harness)
        attempts.append(outcome(result, "log_tail"))
        if _state(result) == "completed" or result["timed_out"]:
            break
        if (result.get("rounds_done") or 0) <= before and harness == "resume":
            break  # no progress
    if _state(result) != "completed" and not result.get("timed_out"):
        result = run_simulation(name, extra, root / "inproc", timeout, harness="inproc")
        attempts.append(
            {k: result.get(k) for k in ("harness", "returncode", "status", "wall_s")}
        )
    result["attempts"] = attempts
    result["wall_s_total"] = sum(a.get("wall_s") or 0.0 for a in attempts)
    result["earlier_attempts"] = attempts[:-1]
    return result
