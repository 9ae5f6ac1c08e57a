"""``pollinate export``: a finished run as an adapter, a merged model, ONNX.

Or a FedKSeed run's edge bundle, from its run folder or its config file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from protocols.methods import EXPORT_FORMATS as FORMATS

__all__ = ["add_parser", "run"]

EPILOG = """examples:
  pollinate export runs/lora-run --format adapter --out exported/adapter
  pollinate export runs/lora-run --format merged --out exported/merged   # from_pretrained-able
  pollinate export runs/lora-run --format onnx --out exported/onnx       # checked with ONNX Runtime
  pollinate export run.toml --format edge --out bundles/edge              # FedKSeed: for edge clients
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "export",
        help="export a finished run (adapter, merged model folder, ONNX, edge bundle)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dir",
        type=Path,
        help="the run folder (for --format edge, the run's config file works too)",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--out", required=True, type=Path, help="new folder to write")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    """Export; a run that cannot be exported raises a user-facing error."""
    # Here, not at import: --help stays light.
    from server.export import adapter_note, export_run

    # ExportError, ConfigError, RunFolderError: one line and exit 2 (cli.main).
    out = export_run(args.run_dir, args.out, args.fmt)
    console.print(f"exported {args.run_dir} as {args.fmt}: {out}")
    note = adapter_note(out) if args.fmt == "adapter" else None
    if note:
        console.print(note)
    return 0
