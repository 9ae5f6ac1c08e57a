"""The ``pollinate`` command line (top layer: wires server, client, simulation)."""

from cli.main import build_parser, main

__all__ = ["build_parser", "main"]
