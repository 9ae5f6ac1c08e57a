"""``pollinate resume``: continue a stopped or crashed run from its checkpoint.

The run folder holds everything: the resolved config, the data partitions,
``metrics.jsonl`` and the checkpoint of the last completed round. Rounds
already recorded are not redone; the result equals an uninterrupted run with
the same seed (bit for bit for FedKSeed and, on one machine, for LoRA).

Before anything starts, the folder must be free (no live engine owns it) and
its checkpoint whole: every file hashed against the checkpoint's manifest. A
damaged file is refused with one line naming it, and nothing is written. A
run with edge clients keeps its edge bundle once it passes
:func:`protocols.edge_bundle.read_bundle`; a missing one is exported again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from cli.simulate import report_run

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
    # Here, not at import: --help stays light.
    from protocols.run_folder import RunFolder, RunFolderError
    from server.config import load_config
    from simulation import launch
    from simulation.edge import ensure_edge_bundle

    run_dir: Path = args.run_dir
    folder = RunFolder(run_dir)
    # A user-facing error (ConfigError, RunFolderError) becomes one line in
    # cli.main; nothing has been written when it is raised here.
    folder.check_free()
    config = load_config(folder.config)
    status = folder.read_status()
    folder.read_metrics()
    done = folder.verify_checkpoint()
    if status.state == "completed":
        raise RunFolderError(
            f"{run_dir} already completed {status.fields.get('rounds')} rounds"
        )
    if done is None:
        raise RunFolderError(
            f"no checkpoint in {run_dir}: it stopped before round 1 completed; "
            "start it again with pollinate simulate"
        )
    ensure_edge_bundle(run_dir)
    console.print(f"resuming {run_dir} after round {done} of {config.run.rounds}")
    result = launch(run_dir, rounds=config.run.rounds, console=console, resume=True)
    return report_run(result, run_dir, config, console)
