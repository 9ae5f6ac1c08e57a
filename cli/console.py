"""The consoles the ``pollinate`` command prints on.

Reports (tables of rounds, metrics and bytes) are the output people paste
into issues and CI logs keep, so no console here ever cuts one. At a
terminal rich sizes the console to the terminal. Off a terminal (a file, a
pipe, a CI log) rich would assume 80 columns and shorten wide tables' cells
to ``'Clien…'``; :func:`report_console` is then wide enough for every table
to print at its natural width, one line per row.
"""

from __future__ import annotations

from typing import IO

from rich.console import Console

__all__ = ["report_console"]

OFF_TERMINAL_WIDTH = 10_000
"""Console width off a terminal: wider than any table, so none is cut."""


def report_console(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A console to print reports on, which never cuts a table.

    Parameters
    ----------
    stderr : bool, optional
        Write to standard error instead of standard output.
    file : IO[str] | None, optional
        Write to this stream instead (tests).

    Returns
    -------
    rich.console.Console
        Rich's usual console at a terminal; off a terminal, one
        :data:`OFF_TERMINAL_WIDTH` columns wide, so that tables keep their
        natural width and text is not wrapped.
    """
    console = Console(stderr=stderr, file=file)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, file=file, width=OFF_TERMINAL_WIDTH)
