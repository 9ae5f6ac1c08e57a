"""``pollinate certs``: a development CA and server certificate for TLS."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from cli.errors import CommandError

__all__ = ["add_parser", "run"]

EPILOG = """examples:
  pollinate certs certs/                          # 127.0.0.1 and localhost
  pollinate certs certs/ --host server.example.org --host 10.0.0.5  # and those

The server certificate always covers 127.0.0.1 and localhost: pollinate server
start runs the SuperLink there, behind the fleet gateway on the public host.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    parser = sub.add_parser(
        "certs",
        help="make a development CA and a server certificate",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="where to write the PEM files")
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        help="host name or IP the server certificate covers besides 127.0.0.1 "
        "and localhost (repeatable; the first is its common name)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity in days")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    """Write the PKI.

    Raises
    ------
    cli.errors.CommandError
        If ``--days`` is below 1, the folder already has a PKI or cannot be
        written (exit status 2 through ``main``).
    """
    # Here, not at import: --help stays light.
    from server.certificates import make_dev_pki

    if args.days < 1:
        raise CommandError(f"--days must be at least 1, got {args.days}")
    if args.folder.exists() and not args.folder.is_dir():
        raise CommandError(f"{args.folder} is a file, not a folder for the PKI")
    try:
        pki = make_dev_pki(args.folder, args.host or (), args.days)
    except FileExistsError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(
            f"{args.folder}: cannot write the PKI: {exc.strerror or exc}"
        ) from None
    console.print(
        f"CA: {pki.ca_cert}\nserver certificate: {pki.server_cert} "
        f"(hosts: {', '.join(pki.hosts)})\n"
        f"keys: {pki.ca_key}, {pki.server_key} (keep them private)"
    )
    return 0
