"""Section 5: held-out loss and Rouge-L after an equal training wall-clock budget.

Methods (:data:`bench.edge.settings.METHODS`): LoRA FedAvg and FedKSeed
over every parameter, over a ``zo.include`` subset and over a LoRA
adapter. Each runs through the project's simulation path, as
``bench.fedkseed`` does: ``pollinate simulate`` (or, with the in-process
harness or when a run fails, the same ``prepare_run`` / ``run_server``
round loop on an ``InProcessGrid``), and its numbers are read from the run
folder (``metrics.jsonl``).

Budget: a calibration run per method (:data:`CALIBRATION_ROUNDS` rounds,
the central evaluation cut to one example and one new token) gives its
seconds per round: the last round's ``seconds`` (warm: round 1 also pays
for loading the client's model). The method then runs ``floor(budget /
seconds per round)`` rounds (at least 1, at most the scale's cap) from w0
with the real evaluation, whose time is not part of the budget (it is the
same for every method).

Harnesses: ``pollinate`` (``pollinate simulate``, Ray; the in-process loop
in a child when it fails), ``inproc`` (the in-process loop, one child per
run) and ``here`` (the in-process loop in this process, as
``bench.robustness`` runs; models stay cached between runs).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from bench.edge.settings import METHODS, NI_PATH, Scale, method_overrides
from bench.harness import (
    module_command,
    now,
    run_and_read,
    run_in_process,
    simulate_args,
)

CALIBRATION_ROUNDS = 2
CALIBRATION_EVAL = {"data.eval_examples": 1, "eval.max_new_tokens": 1}
"""What a calibration run changes: an evaluation that costs next to nothing."""


def set_args(overrides: dict[str, Any]) -> list[str]:
    """``--set key=value`` arguments (values written as TOML)."""
    out = []
    for key, value in overrides.items():
        text = json.dumps(value) if isinstance(value, str | list) else repr(value)
        out += ["--set", f"{key}={text}"]
    return out


def cli_args(
    name: str, out_dir: Path, scale: Scale, rounds: int, calibration: bool = False
) -> list[str]:
    """The ``pollinate simulate`` arguments of method ``name`` for ``rounds``."""
    sim = dict(scale.sim)
    if calibration:
        sim["eval_examples"] = CALIBRATION_EVAL["data.eval_examples"]
        sim["new_tokens"] = CALIBRATION_EVAL["eval.max_new_tokens"]
    base = simulate_args(
        name,
        out_dir,
        model=scale.model,
        dataset=NI_PATH,
        clients=sim["clients"],
        partition=sim["partition"],
        limit=sim["limit"],
        rounds=rounds,
        eval_examples=sim["eval_examples"],
        new_tokens=sim["new_tokens"],
    )
    return [*base, *set_args(method_overrides(name, scale))]


def run_here(cli: list[str], out_dir: Path, labels: dict[str, Any]) -> dict[str, Any]:
    """The in-process round loop in this process; what its run folder holds."""
    from bench.fedkseed.inproc import overrides_from_cli

    run = run_in_process(overrides_from_cli(cli))
    return {**labels, "harness": "here", **run}


def run_method(
    name: str,
    root: Path,
    scale: Scale,
    rounds: int,
    harness: str,
    calibration: bool = False,
) -> dict[str, Any]:
    """One run of ``name`` for ``rounds`` under ``root``; what its folder holds.

    ``harness`` ``"pollinate"`` starts ``pollinate simulate`` and falls back
    to the in-process round loop in a child when the run does not complete;
    ``"inproc"`` runs that child alone, ``"here"`` the loop in this process.
    """
    out_dir = root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    cli = cli_args(name, out_dir, scale, rounds, calibration)
    labels = {"name": name, "rounds_asked": rounds}
    if harness == "here":
        return run_here(cli, out_dir, labels)
    result: dict[str, Any] = {}
    if harness == "pollinate":
        exe = Path(sys.executable).parent / "pollinate"
        result = run_and_read(
            [str(exe), *cli],
            out_dir,
            root / f"{name}-pollinate.log",
            scale.sim_timeout_s,
            labels={**labels, "harness": "pollinate"},
        )
        if (result.get("status") or {}).get("state") == "completed":
            return result
        out_dir = root / "inproc" / name
        out_dir.mkdir(parents=True, exist_ok=True)
        cli = cli_args(name, out_dir, scale, rounds, calibration)
    cmd = module_command("bench.edge", "--inproc-run", json.dumps({"cli": cli}))
    fallback = run_and_read(
        cmd,
        out_dir,
        root / f"{name}-inproc.log",
        scale.sim_timeout_s,
        labels={**labels, "harness": "inproc"},
    )
    if result:
        fallback["failed_attempt"] = {
            k: result.get(k) for k in ("returncode", "timed_out", "wall_s", "status")
        }
    return fallback


def seconds_per_round(run: dict[str, Any]) -> float | None:
    """The last calibration round's seconds; None if it did not get there."""
    rows = run.get("metrics") or []
    last = rows[-1] if rows else {}
    if last.get("round") != CALIBRATION_ROUNDS or last.get("seconds") is None:
        return None
    return max(1e-3, float(last["seconds"]))


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    """What the report needs of a run (the metrics rows kept, logs trimmed)."""
    keep = (
        "harness",
        "rounds_asked",
        "returncode",
        "timed_out",
        "wall_s",
        "status",
        "run_dir",
        "metrics",
        "eval_loss_first",
        "eval_loss_last",
        "metric_first",
        "metric_last",
        "metric_name",
        "rounds_done",
        "round0_seconds",
        "round_seconds",
        "failed_attempt",
        "error",
    )
    out = {k: run.get(k) for k in keep}
    if (run.get("status") or {}).get("state") != "completed":
        out["log_tail"] = run.get("log_tail")
    return out


def section_quality(
    scale: Scale, root: Path, harness: str | None = None
) -> dict[str, Any]:
    """Calibrate, then run every method for its share of the budget, in ``root``."""
    harness = harness or scale.harness
    t_start = now()
    runs: dict[str, Any] = {}
    for name in METHODS:
        cal = run_method(
            name, root / "calibration", scale, CALIBRATION_ROUNDS, harness, True
        )
        per_round = seconds_per_round(cal)
        entry: dict[str, Any] = {
            "overrides": method_overrides(name, scale),
            "calibration": _summary(cal),
            "train_seconds_per_round": per_round,
        }
        if per_round is None:
            entry["error"] = "calibration round did not finish"
            runs[name] = entry
            continue
        rounds = max(1, min(scale.max_rounds, math.floor(scale.budget_s / per_round)))
        run = run_method(name, root / "budget", scale, rounds, harness)
        done = run.get("rounds_done") or 0
        entry.update(
            rounds=rounds,
            capped=math.floor(scale.budget_s / per_round) > scale.max_rounds,
            train_seconds_used=done * per_round,
            run=_summary(run),
        )
        runs[name] = entry
    return {
        "settings": {
            "model": scale.model,
            "dataset": str(NI_PATH),
            **scale.sim,
            "budget_s": scale.budget_s,
            "max_rounds": scale.max_rounds,
            "calibration_rounds": CALIBRATION_ROUNDS,
            "calibration_eval": CALIBRATION_EVAL,
            "harness": harness,
            "metric": "rouge_l",
        },
        "runs": runs,
        "seconds": now() - t_start,
    }
