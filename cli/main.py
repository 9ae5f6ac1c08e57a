"""The ``pollinate`` command: one module per subcommand, wired here."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from cli import (
    certs,
    client_cmd,
    compare,
    export,
    resume,
    server_cmd,
    simulate,
    validate,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="pollinate",
        description="Federated and edge fine-tuning of language models, on Flower.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    validate.add_parser(sub)
    simulate.add_parser(sub)
    resume.add_parser(sub)
    compare.add_parser(sub)
    export.add_parser(sub)
    certs.add_parser(sub)
    server_cmd.add_parser(sub)
    client_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; return its exit status."""
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    return int(args.handler(args, console))


if __name__ == "__main__":
    sys.exit(main())
