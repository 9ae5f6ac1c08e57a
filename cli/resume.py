"""``pollinate resume``: continue a stopped or crashed run from its checkpoint.

The run folder holds everything: the resolved config, the data partitions,
``metrics.jsonl`` and the checkpoint of the last completed round. Rounds
already recorded are not redone; the result equals an uninterrupted run with
the same seed (bit for bit for FedKSeed and, on one machine, for LoRA).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from cli.simulate import report_run
from server.config import ConfigError, load_config
from simulation import launch

__all__ = ["add_parser", "run"]

EPILOG = """examples:
  pollinate resume runs/pollinate-20261125-124107
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "resume",
        help="continue a stopped or crashed run from its last checkpoint",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="the run folder")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    """Resume; 2 when the folder cannot be resumed, 1 if the run fails again."""
    run_dir: Path = args.run_dir
    try:
        config = load_config(run_dir / "config.toml")
    except ConfigError as exc:
        console.print(f"[red]not a run folder[/]: {exc}")
        return 2
    state_path = run_dir / "checkpoint" / "state.json"
    status_path = run_dir / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    if status.get("state") == "completed":
        console.print(f"{run_dir} already completed {status.get('rounds')} rounds")
        return 2
    if not state_path.exists():
        console.print(
            f"[red]no checkpoint in {run_dir}[/]: it stopped before round 1 "
            "completed; start it again with pollinate simulate"
        )
        return 2
    done = json.loads(state_path.read_text()).get("round", 0)
    console.print(f"resuming {run_dir} after round {done} of {config.run.rounds}")
    result = launch(run_dir, rounds=config.run.rounds, console=console, resume=True)
    return report_run(result, run_dir, config, console)
