"""One benchmark run: a real federation in this process, summarised.

The one place this benchmark prepares a run folder and starts the server's
round loop; models stay cached in the ClientApp's runtime between runs, so
only the first run pays for loading SmolLM2.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any


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
    from protocols.run_folder import RunFolder
    from server.app import run_server
    from server.config import load_config
    from simulation.attacks import app as attack_app
    from simulation.inprocess import InProcessGrid
    from simulation.prepare import prepare_run

    config = load_config(None, {**overrides, "run.output_dir": str(work)})
    t0 = time.perf_counter()
    run_dir = prepare_run(config)
    grid = InProcessGrid(attack_app, config.federation.clients, run_dir=run_dir)
    status = "completed"
    try:
        run_server(grid, config, run_dir, simulation=True)
    except Exception as exc:  # the run's outcome is a result here
        status = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    seconds = time.perf_counter() - t0
    rows = RunFolder(run_dir).read_metrics()
    trained = [r for r in rows if r.get("round", 0) >= 1]
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    return {
        "status": status,
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
        "seconds": seconds,
    }


def scratch() -> tempfile.TemporaryDirectory[str]:
    """A folder for one run's run folder (deleted after it is read)."""
    return tempfile.TemporaryDirectory(prefix="pollinate-robustness-")
