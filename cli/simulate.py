"""``pollinate simulate``: run many virtual clients on this machine.

Prepares a run folder (config, held-out set, one data file per client),
starts Flower's simulation engine in a process it owns, shows a progress bar
over rounds, then writes the plot and prints a summary table. A failed run is
reported with its error and the tail of its log, and exits non-zero.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from cli.overrides import add_config_arguments
from cli.validate import load_checked_config

if TYPE_CHECKING:
    from server.config import RunConfig
    from simulation import LaunchResult

__all__ = ["add_parser", "report_run", "run"]

EPILOG = """examples:
  pollinate simulate                                  # offline default: SmolLM2-135M, built-in tasks
  pollinate simulate --clients 8 --rounds 10 --fraction 0.5
  pollinate simulate run.toml --dataset ../shared/data/dolly-15k/databricks-dolly-15k.jsonl.gz
  pollinate simulate --model tiny-llama --rounds 2    # seconds-long smoke run
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "simulate",
        help="run a federation of virtual clients on this machine",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, config_required=False)
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the run folder (config, data partitions) and stop",
    )
    parser.set_defaults(handler=run)


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run(args: argparse.Namespace, console: Console) -> int:
    """Prepare, launch, report. Exit status 0 on a completed run."""
    # Here, not at import: --help stays light.
    from simulation import launch, prepare_run

    # A bad config or data file raises a user-facing error: one line, exit 2.
    config = load_checked_config(Path(args.config) if args.config else None, args)
    with console.status("preparing run folder (data partitions, model cache)"):
        run_dir = prepare_run(config)
    console.print(f"run folder: [bold]{run_dir}[/]")
    if args.prepare_only:
        return 0
    # Another engine owning the folder is a RunFolderError: one line, exit 2.
    result = launch(run_dir, rounds=config.run.rounds, console=console)
    return report_run(result, run_dir, config, console)


def _loss(value: float | None) -> str:
    """An eval loss for the summary line; ``-`` when no round had a finite one."""
    return "-" if value is None else f"{value:.3f}"


def report_run(
    result: LaunchResult, run_dir: Path, config: RunConfig, console: Console
) -> int:
    """Print the outcome of a launch: the error, or the table, plot and outputs."""
    # Here, not at import: --help stays light.
    from protocols.methods import get_method
    from protocols.run_folder import RunFolder, RunFolderError
    from simulation import plot_run, summary_table
    from simulation.reports import run_summary

    if not result.ok:
        console.print(
            f"[red]run failed[/] (engine exit {result.returncode}, state {result.state})"
        )
        if result.error:
            console.print(f"error: {result.error}")
        console.print(f"last lines of {result.log_path}:\n{_tail(result.log_path)}")
        console.print(f"continue it with: pollinate resume {run_dir}")
        return 1
    folder = RunFolder(run_dir)
    try:
        rows = folder.read_metrics()
    except RunFolderError as exc:  # damaged since the run wrote it
        console.print(f"[red]cannot report the run[/]: {escape(str(exc))}")
        return 1
    plot = plot_run(rows, folder.plot, title=f"{folder.name} ({config.run.method})")
    console.print(
        summary_table(rows, title=f"{config.run.method} on {config.model.name}")
    )
    s = run_summary(rows)
    artefact = folder.artefact(get_method(config.run.method).artefact)
    edge = folder.edge_partitions()
    if edge:
        console.print(
            f"edge clients (ONNX Runtime, no torch): {len(edge)} of "
            f"{config.federation.clients} (partitions {', '.join(map(str, edge))})"
        )
    console.print(
        f"{s['metric_name']}: {100 * (s['first_metric'] or 0):.1f}% -> "
        f"{100 * (s['last_metric'] or 0):.1f}%  eval loss {_loss(s['first_eval_loss'])}"
        f" -> {_loss(s['last_eval_loss'])}\nplot: {plot}\ntrained: {artefact}"
    )
    return 0
