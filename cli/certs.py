"""``pollinate certs``: a development CA and server certificate for TLS."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

__all__ = ["add_parser", "run"]

EPILOG = """examples:
  pollinate certs certs/                          # 127.0.0.1 and localhost
  pollinate certs certs/ --host server.example.org --host 10.0.0.5
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
        help="host name or IP the server certificate covers (repeatable)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity in days")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    """Write the PKI; exit status 2 if the folder already has one."""
    # Here, not at import: --help stays light.
    from server.certificates import make_dev_pki

    hosts = args.host or ["127.0.0.1", "localhost"]
    try:
        pki = make_dev_pki(args.folder, hosts, args.days)
    except (FileExistsError, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    console.print(
        f"CA: {pki.ca_cert}\nserver certificate: {pki.server_cert} (hosts: {', '.join(hosts)})\n"
        f"keys: {pki.ca_key}, {pki.server_key} (keep them private)"
    )
    return 0
