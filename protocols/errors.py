"""Exceptions raised when a payload breaks the wire contract.

Every check in :mod:`protocols` raises :class:`ProtocolError` (or a subclass)
with a message that names the offending field, the value received and what was
expected, so a server can log a rejected reply and a client can turn a bad
instruction into an error reply without crashing.
"""

from __future__ import annotations

__all__ = [
    "OutOfSyncError",
    "PayloadTooLargeError",
    "ProtocolError",
    "SpecMismatchError",
]


class ProtocolError(ValueError):
    """A payload does not follow the wire contract (shape, dtype, key, value)."""


class PayloadTooLargeError(ProtocolError):
    """A payload exceeds the size limit the receiver accepts."""


class SpecMismatchError(ProtocolError):
    """Both sides disagree on a spec that must match bit for bit."""


class OutOfSyncError(ProtocolError):
    """The node cannot reach the target model from what it holds."""
