"""``pollinate compare``: several runs in one table and one plot.

Reads each run folder's ``metrics.jsonl`` and puts the methods side by side:
final metric (with its bootstrap 95% interval), eval loss, total traffic and
traffic per client-round, then one line per pair of runs saying whether their
final metrics differ beyond their intervals, plus a plot of the metric per
round and against cumulative communication.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from cli.errors import CommandError

__all__ = ["add_parser", "run"]

EPILOG = """examples:
  pollinate compare runs/lora-* runs/fedkseed-* --out compare.png
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "compare",
        help="compare finished runs in one table and one plot",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument(
        "--out", type=Path, default=Path("compare.png"), help="plot file (PNG)"
    )
    parser.set_defaults(handler=run)


def _label(run_dir: Path, rows: list[dict[str, object]]) -> str:
    method = rows[-1].get("method", "?") if rows else "?"
    return f"{method}: {run_dir.name}"


def run(args: argparse.Namespace, console: Console) -> int:
    """Print the comparison table and write the plot.

    Raises
    ------
    cli.errors.CommandError
        If a run folder's metrics cannot be read or the plot cannot be
        written (exit status 2 through ``main``).
    """
    # Here, not at import: --help stays light.
    from protocols.run_folder import RunFolder
    from simulation import compare_table, plot_comparison, read_metrics
    from simulation.reports import ReportError, interval_verdicts

    runs: dict[str, list[dict[str, object]]] = {}
    for run_dir in args.runs:
        try:
            rows = read_metrics(RunFolder(run_dir).metrics)
        except (ReportError, FileNotFoundError) as exc:
            raise CommandError(f"cannot read {run_dir}: {exc}") from None
        runs[_label(run_dir, rows)] = rows
    console.print(compare_table(runs, title="Pollinate runs"))
    for line in interval_verdicts(runs):
        console.print(line, markup=False, highlight=False)
    try:
        plot = plot_comparison(runs, args.out, title="Metric per round and per MB")
    except OSError as exc:
        raise CommandError(
            f"--out {args.out}: cannot write the plot: {exc.strerror or exc}"
        ) from None
    console.print(f"plot: {plot}")
    return 0
