"""``pollinate export``: a finished run as an adapter, a merged model or ONNX."""

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
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "export",
        help="export a finished run (adapter, merged model folder, ONNX)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="the run folder")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--out", required=True, type=Path, help="new folder to write")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    """Export; exit status 2 with the reason when it cannot be done."""
    # Here, not at import: --help stays light.
    from server.config import ConfigError
    from server.export import ExportError, export_run

    try:
        out = export_run(args.run_dir, args.out, args.fmt)
    except (ExportError, ConfigError) as exc:
        console.print(f"[red]cannot export[/]: {exc}")
        return 2
    console.print(f"exported {args.run_dir} as {args.fmt}: {out}")
    return 0
