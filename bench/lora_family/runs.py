"""One benchmark run: a real LoRA federation in this process, summarised.

The run itself is :func:`bench.harness.run_in_process` (the server's round
loop against an in-process grid that hands each real Flower message to
Pollinate's ClientApp); the numbers come from the run folder it reads.
Models stay cached in the ClientApp's runtime between runs, so only the
first run pays for loading the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import run_in_process


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
    run = run_in_process({**overrides, "run.output_dir": str(work)})
    rows = run.get("metrics") or []
    return {
        "status": run["error"] or "completed",
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
        "seconds": run["wall_s"],
    }
