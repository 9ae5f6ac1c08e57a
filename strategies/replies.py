"""What every strategy does with a round's replies, in one place.

:func:`triage` sorts labelled replies into decoded updates and rejections
with reasons (error replies, duplicate replies from one node, payloads that
fail to decode), logging each rejection, so that a strategy aggregates only
what passed. :func:`weighted_loss` is the example-weighted mean every
strategy reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from flwr.app import Error, Message

from protocols import ProtocolError
from strategies.strategy import LabelledReply

__all__ = ["triage", "weighted_loss"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def triage(
    server_round: int,
    replies: Iterable[LabelledReply],
    decode: Callable[[Message], T],
    on_error: Callable[[str, Error], None] | None = None,
) -> tuple[list[tuple[str, T]], dict[str, str]]:
    """Split replies into ``(label, decoded)`` pairs sorted by label, and rejections.

    ``decode`` raises :class:`~protocols.ProtocolError` for a reply it refuses
    (a malformed payload, a non-finite or out-of-bound metric: the reason
    names it); ``on_error`` sees every error reply (e.g. to act on its code).
    Labels are unique per node (the :class:`~strategies.NodeBook` refuses a
    second claim at hello), so two replies under one label mean one node
    replied twice: both are rejected.
    """
    good: dict[str, T] = {}
    rejected: dict[str, str] = {}
    for who, reply in replies:
        if who in good or who in rejected:
            good.pop(who, None)
            rejected[who] = "the node replied more than once this round"
            continue
        if reply.has_error():
            rejected[who] = f"client error: {reply.error.reason}"
            if on_error is not None:
                on_error(who, reply.error)
            continue
        try:
            good[who] = decode(reply)
        except ProtocolError as exc:
            rejected[who] = str(exc)
    for who, reason in sorted(rejected.items()):
        log.warning("round %d: rejected update from %s: %s", server_round, who, reason)
    return sorted(good.items()), rejected


def weighted_loss(pairs: Sequence[tuple[float, int]]) -> float:
    """Example-weighted mean of ``(loss, num_examples)`` pairs (total > 0).

    Each loss is scaled by its share ``n / total`` (at most 1) before the
    sum, so the partial sums never exceed the largest ``|loss|``: finite
    inputs give a finite mean, where ``sum(loss * n) / total`` overflows for
    ``1e308`` weighted by 2. (Decoders also bound every metric by
    :data:`protocols.messages.MAX_WIRE_FLOAT`.)
    """
    total = sum(n for _, n in pairs)
    return sum(loss * (n / total) for loss, n in pairs)
