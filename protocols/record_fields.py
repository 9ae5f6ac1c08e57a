"""Reading one typed value out of a Flower record: how every decoder refuses.

The message modules (:mod:`protocols.messages`, :mod:`protocols.privacy_messages`,
:mod:`protocols.zo_messages`, :mod:`protocols.split_messages`) read each key
through :func:`get_field` and each record through :func:`get_record`, so a
missing key, a wrong type or a float beyond :data:`MAX_WIRE_FLOAT` is refused
the same way everywhere: a :class:`~protocols.errors.ProtocolError` naming the
key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flwr.app import RecordDict

from protocols.errors import ProtocolError

__all__ = ["MAX_WIRE_FLOAT", "get_field", "get_record"]

MAX_WIRE_FLOAT = 1e30
"""Largest magnitude of any float read from the wire (metrics, settings).

A loss or rate beyond it is nonsense, and the bound keeps every aggregate
finite: an example-weighted mean of values within it cannot overflow float64,
where ``1e308`` alone overflows once weighted by two examples.
"""


def get_field(record: Mapping[str, Any], key: str, kind: type) -> Any:
    """Read ``record[key]`` as ``kind``, naming the key when it is wrong.

    An int is read as a float where a float is asked for; a bool is never a
    number; a float must be finite and within :data:`MAX_WIRE_FLOAT`.

    Raises
    ------
    ProtocolError
        If the key is missing, or its value is of another type or out of bounds.
    """
    if key not in record:
        raise ProtocolError(f"record lacks key '{key}'")
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(
            f"key '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, float) and not (
        math.isfinite(value) and abs(value) <= MAX_WIRE_FLOAT
    ):
        raise ProtocolError(
            f"key '{key}' must be finite with magnitude <= {MAX_WIRE_FLOAT:g}, "
            f"got {value!r}"
        )
    return value


def get_record(content: RecordDict, key: str, kind: type) -> Any:
    """The record ``content[key]``, which must be a ``kind``.

    Raises
    ------
    ProtocolError
        If the message content lacks the record or it is of another kind.
    """
    if key not in content:
        raise ProtocolError(f"message content lacks record '{key}'")
    rec = content[key]
    if not isinstance(rec, kind):
        raise ProtocolError(f"record '{key}' must be a {kind.__name__}")
    return rec
