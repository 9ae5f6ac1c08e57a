"""The ``pollinate`` command: one module per subcommand, wired here.

Every subcommand module imports only argparse, rich and light Pollinate
modules at module level; what a subcommand runs (torch, transformers, PEFT,
Flower) is imported by its handler. So ``pollinate --help`` and
``pollinate <verb> --help`` start fast (``tests/test_cli_start.py``).

A user's mistake ends every subcommand the same way: one line,
``pollinate <verb>: error: <message>``, on stderr and exit status 2. That
holds for argument errors (argparse's), and for any exception of the
user-facing types of :mod:`cli.errors` that a handler raises. Any other
exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

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
from cli.errors import one_line, user_error
from protocols.installation import InstallationError, check_installation

__all__ = ["build_parser", "main"]

USER_ERROR_STATUS = 2
"""Exit status of a command refused for a user's mistake (argparse's too)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose refusals are one line, like every user error."""

    def error(self, message: str, prog: str | None = None) -> NoReturn:
        """Print ``<prog>: error: <message>`` on one line and exit with status 2."""
        prog = prog or self.prog
        self.exit(
            USER_ERROR_STATUS,
            f"{prog}: error: {one_line(message)} (see {prog} --help)\n",
        )

    def parse_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        """Parse; unknown arguments are blamed on the subcommand they follow."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(
                f"unrecognized arguments: {' '.join(extras)}",
                getattr(parsed, "command_prog", None),
            )
        return parsed


def _record_prog(parser: argparse.ArgumentParser) -> None:
    """Let every (sub)command's namespace carry its full name, for messages."""
    parser.set_defaults(command_prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _record_prog(sub)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = _Parser(
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
    _record_prog(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; return its exit status.

    Exit status 2 for a user's mistake, reported on one line (see the module
    docstring), and when the installation is broken: a file or folder that
    shadows one of Pollinate's packages (see :mod:`protocols.installation`).

    Raises
    ------
    SystemExit
        From argparse: status 0 after ``--help``, 2 on a bad argument.
    Exception
        Whatever a handler raises that is not a user-facing error type: a
        bug, shown with its traceback.
    """
    try:
        check_installation()
        args = build_parser().parse_args(argv)
        return _run(args)
    except InstallationError as exc:
        Console(stderr=True, soft_wrap=True).print(
            f"[red]broken installation[/]:\n{escape(str(exc))}"
        )
        return USER_ERROR_STATUS


def _run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; a user-facing error becomes one line and 2."""
    try:
        return int(args.handler(args, report_console(stderr=True)))
    except Exception as exc:
        if isinstance(exc, InstallationError) or not user_error(exc):
            raise
        sys.stderr.write(f"{args.command_prog}: error: {one_line(str(exc))}\n")
        return USER_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
