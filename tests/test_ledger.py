"""Tests for protocols.ledger: payload sizes and the per-round byte ledger.

Communication cost is a headline number of every run; these tests check that
payload_bytes measures exactly Flower's serialized size, that it scales with
the payload, and that the ledger's totals, per-client tables and JSON round
trip are exact.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from protocols import ByteLedger, LedgerEntry, encode_tensors, payload_bytes


def _content(n: int) -> RecordDict:
    return RecordDict({"adapter": encode_tensors({"w": torch.zeros(n)})})


def test_payload_bytes_equals_flower_serialization() -> None:
    """payload_bytes must be the protobuf size Flower sends, nothing estimated."""
    for content in (
        _content(10),
        _content(1000),
        RecordDict({"c": ConfigRecord({"a": 1, "b": "text"})}),
        RecordDict(),
    ):
        assert payload_bytes(content) == recorddict_to_proto(content).ByteSize()


def test_payload_bytes_grows_with_payload() -> None:
    """A bigger tensor must cost more bytes, by about 4 bytes per float32."""
    sizes = [payload_bytes(_content(n)) for n in (1, 10, 100, 1000)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert 4 * 900 <= sizes[3] - sizes[2] <= 4 * 900 + 16


def test_thousand_float32_payload_over_4000_bytes() -> None:
    """1000 float32 values are 4000 raw bytes; the payload (with headers and the
    manifest) must be larger, never smaller (that would mean data is missing)."""
    n = payload_bytes(_content(1000))
    assert n > 4000
    assert n < 4000 + 1024


def test_round_totals_and_per_client() -> None:
    """Totals per round and per client must sum exactly the recorded entries."""
    ledger = ByteLedger()
    ledger.record(1, "a", "down", 100)
    ledger.record(1, "a", "up", 40)
    ledger.record(1, "b", "down", 100)
    ledger.record(1, "b", "up", 60)
    ledger.record(1, "a", "up", 5, channel="split")
    ledger.record(2, "a", "down", 7)
    assert len(ledger) == 6
    assert ledger.round_totals(1) == (105, 200)
    assert ledger.round_totals(2) == (0, 7)
    assert ledger.round_totals(3) == (0, 0)
    assert ledger.per_client(1) == {
        "a": {"up": 45, "down": 100},
        "b": {"up": 60, "down": 100},
    }
    assert ledger.per_client(2) == {"a": {"up": 0, "down": 7}}
    assert ledger.per_client(9) == {}
    assert list(ledger)[4] == LedgerEntry(1, "a", "up", 5, "split")


@pytest.mark.parametrize(
    ("direction", "nbytes"), [("sideways", 1), ("UP", 1), ("up", -1), ("down", -100)]
)
def test_bad_direction_or_negative_raises(direction: str, nbytes: int) -> None:
    """Unknown directions and negative sizes must be refused, and leave the
    ledger unchanged."""
    ledger = ByteLedger()
    with pytest.raises(ValueError):
        ledger.record(1, "a", direction, nbytes)  # type: ignore[arg-type]
    assert len(ledger) == 0


def test_json_round_trip() -> None:
    """A ledger saved in a checkpoint must reload with the same entries, in order."""
    ledger = ByteLedger()
    ledger.record(1, "p0001", "down", 1234)
    ledger.record(1, "p0001", "up", 0)
    ledger.record(2, "p0002", "up", 99, channel="split")
    back = ByteLedger.from_json(ledger.to_json())
    assert list(back) == list(ledger)
    assert back.round_totals(1) == ledger.round_totals(1)
    assert ByteLedger.from_json(ByteLedger().to_json()).to_json() == "[]"
