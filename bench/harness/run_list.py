"""A benchmark of many runs, each written to the results JSON as it finishes.

The results dict holds ``runs``, a list of planned runs (dicts of their
labels) that each carry their ``result`` once done. :func:`resume_runs`
keeps the finished ones of an earlier results file, :func:`run_pending`
does the rest (each in a scratch folder, the JSON rewritten after every
run), :func:`finish_runs` writes the report.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness.results import read_json, write_results

Run = dict[str, Any]
"""A planned run: its labels, then its ``result`` once done."""


def utc_stamp() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def resume_runs(
    results: dict[str, Any], path: Path, keep: Callable[[Run], bool]
) -> dict[str, Any]:
    """Take the runs ``keep`` accepts (and the start time) from ``path`` into ``results``.

    Returns
    -------
    dict[str, Any]
        The earlier results file, for what else the benchmark carries over.
    """
    old: dict[str, Any] = read_json(path)
    results["runs"] = [r for r in old.get("runs", []) if keep(r)]
    results["started"] = old.get("started", results["started"])
    return old


def run_pending(
    results: dict[str, Any],
    planned: Iterable[Run],
    *,
    key: Callable[[Run], str],
    run_one: Callable[[Run, Path], dict[str, Any]],
    stem: str,
    out_dir: Path,
    max_runs: int = 0,
    scratch_prefix: str = "pollinate-bench-",
    metric_label: str = "metric",
) -> None:
    """Run the planned runs not yet in ``results``; save the JSON after each.

    Parameters
    ----------
    results : dict[str, Any]
        The results so far; each finished run is appended to its ``runs``.
    planned : Iterable[Run]
        Every run of the benchmark, in order.
    key : Callable[[Run], str]
        A run's identity (a planned run whose key is done is skipped).
    run_one : Callable[[Run, Path], dict[str, Any]]
        Does one run in a scratch folder (deleted after); its ``result``,
        with ``status``, ``metric_last``, ``eval_loss_last`` and ``seconds``.
    stem : str
        The results file's stem, in ``out_dir``.
    out_dir : Path
        Where the results go.
    max_runs : int
        Stop after this many new runs (0: no limit).
    scratch_prefix : str
        The scratch folders' name prefix.
    metric_label : str
        How the progress line (on stderr) names the metric.
    """
    done = {key(r) for r in results["runs"]}
    todo = [r for r in planned if key(r) not in done]
    if max_runs:
        todo = todo[:max_runs]
    for i, run in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {key(run)}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=scratch_prefix) as work:
            run["result"] = run_one(run, Path(work))
        res = run["result"]
        print(
            f"    -> {res['status']}, {metric_label} {res['metric_last']}, "
            f"loss {res['eval_loss_last']}, {res['seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        results["runs"].append(run)
        write_results(stem, results, out_dir=out_dir)


def finish_runs(
    results: dict[str, Any],
    stem: str,
    render: Callable[..., str],
    out_dir: Path,
) -> int:
    """Stamp ``finished``, write ``<stem>.json`` and ``.md`` (plot beside), print it.

    ``render(results, plot_dir=out_dir)`` makes the markdown.

    Returns
    -------
    int
        0, the command's exit status.
    """
    results["finished"] = utc_stamp()
    table = render(results, plot_dir=out_dir)
    write_results(stem, results, table, out_dir=out_dir)
    print(table)
    return 0
