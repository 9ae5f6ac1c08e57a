"""The ``pollinate`` command: one module per subcommand, wired here.

Every subcommand module imports only argparse, rich and light Pollinate
modules at module level; what a subcommand runs (torch, transformers, PEFT,
Flower) is imported by its handler. So ``pollinate --help`` and
``pollinate <verb> --help`` start fast (``tests/test_cli_start.py``).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape

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
from cli.console import report_console
from protocols.installation import InstallationError, check_installation

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
    """Parse ``argv`` and run the chosen subcommand; return its exit status.

    Exit status 2 when the installation is broken: a file or folder that
    shadows one of Pollinate's packages (see :mod:`protocols.installation`).
    """
    try:
        check_installation()
        args = build_parser().parse_args(argv)
        return int(args.handler(args, report_console(stderr=True)))
    except InstallationError as exc:
        Console(stderr=True, soft_wrap=True).print(
            f"[red]broken installation[/]:\n{escape(str(exc))}"
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
