"""What goes wrong with a run folder's files, and how it is said: in one line.

The errors :mod:`protocols.run_folder` and :mod:`protocols.metrics_log` raise;
every message names the file (and the line or field), so a damaged file is
refused with a sentence a user can act on, never a traceback. Import them from
:mod:`protocols.run_folder`, which re-exports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "CheckpointError",
    "MetricsError",
    "RunFolderError",
    "RunFolderLocked",
    "one_line",
    "wrong_type",
]


class RunFolderError(ValueError):
    """A run folder's file is missing, damaged or of another run; names the file."""


class MetricsError(RunFolderError):
    """``metrics.jsonl`` cannot be interpreted (names the file and line)."""


class CheckpointError(RunFolderError):
    """A run folder has no usable checkpoint, or one of another spec."""


class RunFolderLocked(RunFolderError):
    """Another live process owns the run folder (the message names its pid)."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (decoders put line breaks in theirs)."""
    return " ".join(str(exc).split())


def wrong_type(record: Mapping[str, Any], types: Mapping[str, tuple[type, ...]]) -> str:
    """The first field of ``record`` whose value has the wrong type, or ``""``.

    ``types`` maps a field name to the types it may have; fields ``record``
    lacks, and fields ``types`` does not name, are not checked. ``bool`` is
    never a number here.
    """
    for key, allowed in types.items():
        if key in record:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, allowed):
                return f"{key!r} is {value!r}"
    return ""
