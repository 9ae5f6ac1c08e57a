"""A run folder's JSON object files, read strictly: size-bounded, parsed, checked.

What :class:`protocols.run_folder.RunFolder` (``status.json``, records such as
``partitions.json``) and :mod:`protocols.run_checkpoint` (``state.json``) read
through: a file that is too large, not UTF-8 JSON, nested too deeply or not a
JSON object is refused with a one-line :class:`RunFolderError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocols.run_errors import RunFolderError, one_line

__all__ = ["MAX_JSON_BYTES", "parse_json_object", "read_json_object"]

MAX_JSON_BYTES = 64 * 1024 * 1024
"""Largest JSON file of a run read (a status or checkpoint state is kilobytes)."""


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; FileNotFoundError passes through.

    Raises
    ------
    RunFolderError
        If the file is larger than :data:`MAX_JSON_BYTES`, a folder, or not a
        JSON object (:func:`parse_json_object`).
    """
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise RunFolderError(f"{path}: {size} bytes, more than a run file can hold")
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise RunFolderError(f"{path} is a folder, not a file") from None
    return parse_json_object(data, path)


def parse_json_object(data: bytes, path: Path) -> dict[str, Any]:
    """The JSON object ``data`` (read from ``path``, which errors name).

    Raises
    ------
    RunFolderError
        If ``data`` is not UTF-8 JSON, is nested too deeply, or is not an object.
    """
    try:
        value = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(
            f"{path} is damaged: not valid JSON ({one_line(exc)})"
        ) from None
    except RecursionError:
        raise RunFolderError(f"{path} is damaged: nested too deeply") from None
    if not isinstance(value, dict):
        raise RunFolderError(
            f"{path} is damaged: expected a JSON object, got {type(value).__name__}"
        )
    return value
