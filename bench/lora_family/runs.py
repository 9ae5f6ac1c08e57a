"""One benchmark run: a real LoRA federation in this process, summarised.

The one place this benchmark prepares a run folder and starts the server's
round loop (:func:`server.app.run_server` against a
:class:`simulation.inprocess.InProcessGrid` that hands each real Flower
message to Pollinate's ClientApp); the numbers come from the run folder
through :func:`bench.harness.read_run`. Models stay cached in the ClientApp's
runtime between runs, so only the first run pays for loading the model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.harness import now, read_run


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


def run_once(overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    """Prepare and run one federation under ``work``; what the report needs.

    A run that raises is a result: ``status`` holds the error (one line),
    and whatever rounds it finished are still read.

    Returns
    -------
    dict[str, Any]
        ``status`` (``completed`` or the error), ``rounds_done``,
        ``metric_name``, ``metric_first``/``metric_last``,
        ``eval_loss_first``/``eval_loss_last``, ``curve`` (round, eval loss,
        metric per evaluation), ``bytes_down``/``bytes_up`` (mean per client
        and trained round), ``round_seconds`` and ``seconds`` (the whole run).
    """
    from client.app import app as client_app
    from server.app import run_server
    from server.config import load_config
    from simulation.inprocess import InProcessGrid
    from simulation.prepare import prepare_run

    t0 = now()
    status = "completed"
    run: dict[str, Any] = {}
    try:
        config = load_config(None, {**overrides, "run.output_dir": str(work)})
        run_dir = prepare_run(config)
        grid = InProcessGrid(client_app, config.federation.clients, run_dir=run_dir)
        try:
            run_server(grid, config, run_dir, simulation=True)
        finally:
            run = read_run(Path(run_dir))
    except Exception as exc:  # the run's outcome is a result here
        status = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    rows = run.get("metrics") or []
    return {
        "status": status,
        "rounds_done": run.get("rounds_done", 0),
        "metric_name": run.get("metric_name"),
        "metric_first": run.get("metric_first"),
        "metric_last": run.get("metric_last"),
        "eval_loss_first": run.get("eval_loss_first"),
        "eval_loss_last": run.get("eval_loss_last"),
        "curve": [
            [r.get("round"), r.get("eval_loss"), r.get("eval_metric")] for r in rows
        ],
        "bytes_down": _mean(run.get("bytes_down_per_client_round")),
        "bytes_up": _mean(run.get("bytes_up_per_client_round")),
        "round_seconds": run.get("round_seconds"),
        "seconds": now() - t0,
    }


def scratch() -> tempfile.TemporaryDirectory[str]:
    """A folder for one run's run folder (deleted after it is read)."""
    return tempfile.TemporaryDirectory(prefix="pollinate-lora-family-")
