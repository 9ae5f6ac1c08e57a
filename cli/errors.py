"""Which exceptions are the user's mistake, and how the CLI reports them.

A user's mistake (a bad config value, an unreadable data file, a run folder
that is not one) ends a command with one line, ``pollinate <verb>: error:
<message>``, and exit status 2. Anything else is a bug of ours and keeps its
traceback. :data:`USER_ERRORS` is the defined set of user-facing error types;
each domain converts an ``OSError`` on a path the user named into its own
type where it reads the file, so a bare ``OSError`` is never taken for a
user error here.

The types are named by module and class, not imported: an exception can only
be an instance of a class whose module is loaded, so the check reads
``sys.modules`` and ``pollinate --help`` imports nothing for it.
"""

from __future__ import annotations

import sys

__all__ = ["USER_ERRORS", "CommandError", "one_line", "user_error"]

USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("cli.errors", "CommandError"),
    ("server.config", "ConfigError"),
    ("corpora.examples", "DatasetError"),
    ("simulation.partitioning", "PartitionError"),
    ("simulation.attacks", "AttackError"),
    ("protocols.run_folder", "RunFolderError"),
    ("protocols.methods", "UnknownMethodError"),
    ("server.processes", "DeployError"),
    ("server.export", "ExportError"),
    ("strategies.sampling", "SamplingError"),
    ("client.node", "NodeConfigError"),
    ("models.loading", "ModelLoadError"),
)
"""(module, class) of every user-facing error type; subclasses count too."""


class CommandError(ValueError):
    """A command-line argument the command cannot use (a path, a folder)."""


def user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one of the :data:`USER_ERRORS` types."""
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        kind = getattr(module, class_name, None) if module else None
        if isinstance(kind, type) and isinstance(exc, kind):
            return True
    return False


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined, indentation dropped."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
