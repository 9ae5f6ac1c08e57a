"""One benchmark run: a real federation in this process, summarised.

The run itself is :func:`bench.harness.run_in_process` (the one place the
benchmarks prepare an in-process run and start the server's round loop),
with the simulation's attack app as the ClientApp; models stay cached in its
runtime between runs, so only the first run pays for loading SmolLM2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import run_in_process


def run_once(overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    """Prepare and run one federation; its final numbers and per-round stats.

    Returns
    -------
    dict[str, Any]
        ``status`` (``completed`` or the error), ``metric_name``,
        ``metric_first``/``metric_last``, ``eval_loss_first``/``eval_loss_last``,
        ``epsilon`` (DP runs), ``clipped`` and ``rejected`` per round,
        ``bytes_per_round`` (up + down, mean over trained rounds) and
        ``seconds`` (wall time of the whole run).
    """
    from simulation.attacks import app as attack_app

    run = run_in_process(
        {**overrides, "run.output_dir": str(work)}, client_app=attack_app
    )
    rows = run.get("metrics") or []
    trained = [r for r in rows if r.get("round", 0) >= 1]
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    return {
        "status": run["error"] or "completed",
        "rounds_done": len(trained),
        "metric_name": first.get("eval_metric_name"),
        "metric_first": first.get("eval_metric"),
        "metric_last": last.get("eval_metric"),
        "eval_loss_first": first.get("eval_loss"),
        "eval_loss_last": last.get("eval_loss"),
        "epsilon": last.get("epsilon"),
        "clipped": [r.get("clipped") for r in trained],
        "clip_bound": [r.get("clip_bound") for r in trained],
        "rejected": [r.get("rejected") for r in trained],
        "bytes_per_round": (
            sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in trained)
            / len(trained)
            if trained
            else None
        ),
        "round_seconds": [r.get("seconds") for r in trained],
        "seconds": run["wall_s"],
    }
