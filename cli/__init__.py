"""The ``pollinate`` command line (top layer: wires server, client, simulation).

Importing this package is cheap even though it imports :mod:`cli.main`: every
subcommand module imports what it runs (torch, transformers, Flower) inside
its handler, so ``pollinate --help`` loads none of it. The import is eager,
not lazy like the other packages, because the function :func:`main` shares
its name with the module :mod:`cli.main`: once that module is imported,
``cli.main`` would name the module instead of the function.
"""

from cli.main import build_parser, main

__all__ = ["build_parser", "main"]
