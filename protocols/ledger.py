"""Byte accounting: what every payload costs on the wire, per client per round.

Sizes are measured as Flower serializes them (the protobuf ``RecordDict`` of a
message's content), so the ledger counts exactly what travels, headers of the
records included. Methods with side channels (split learning) record their
frames through :meth:`ByteLedger.record` as well.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from flwr.app import RecordDict
from flwr.common.serde import recorddict_to_proto

__all__ = ["ByteLedger", "Direction", "LedgerEntry", "payload_bytes"]

Direction = Literal["up", "down"]


def payload_bytes(content: RecordDict) -> int:
    """Serialized size in bytes of a message's content, as Flower sends it."""
    return int(recorddict_to_proto(content).ByteSize())


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One payload: the round, the client it went to or came from, its size."""

    server_round: int
    client: str
    direction: Direction
    nbytes: int
    channel: str = "flower"


class ByteLedger:
    """An append-only record of payload sizes, with per-round totals."""

    def __init__(self) -> None:
        self._entries: list[LedgerEntry] = []

    def record(
        self,
        server_round: int,
        client: str,
        direction: Direction,
        nbytes: int,
        channel: str = "flower",
    ) -> None:
        """Add one payload.

        Raises
        ------
        ValueError
            If ``direction`` is not "up" or "down", or ``nbytes`` is negative.
        """
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._entries.append(
            LedgerEntry(server_round, client, direction, nbytes, channel)
        )

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def round_totals(self, server_round: int) -> tuple[int, int]:
        """Bytes ``(up, down)`` summed over the clients of one round."""
        up = down = 0
        for e in self._entries:
            if e.server_round == server_round:
                if e.direction == "up":
                    up += e.nbytes
                else:
                    down += e.nbytes
        return up, down

    def per_client(self, server_round: int) -> dict[str, dict[str, int]]:
        """Bytes per client of one round: ``{client: {"up": n, "down": n}}``."""
        table: dict[str, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
        for e in self._entries:
            if e.server_round == server_round:
                table[e.client][e.direction] += e.nbytes
        return dict(table)

    def to_json(self) -> str:
        """All entries as a JSON list (for checkpoints)."""
        return json.dumps(
            [
                [e.server_round, e.client, e.direction, e.nbytes, e.channel]
                for e in self._entries
            ]
        )

    @classmethod
    def from_json(cls, text: str) -> ByteLedger:
        """Rebuild a ledger written by :meth:`to_json`."""
        ledger = cls()
        for r, c, d, n, ch in json.loads(text):
            ledger.record(int(r), str(c), d, int(n), str(ch))
        return ledger
