"""Tests for the NumPy front end of protocols.codecs (encode_arrays / decode_arrays).

An edge client without torch speaks the codec through these two functions, so
they must write and accept exactly the bytes of encode_tensors /
decode_tensors and refuse every payload those refuse, with the same message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from protocols import PayloadTooLargeError, ProtocolError, TensorLayout
from protocols.codecs import (
    MANIFEST_KEY,
    decode_arrays,
    decode_tensors,
    encode_arrays,
    encode_tensors,
)


def _arrays() -> dict[str, np.ndarray]:
    gen = np.random.default_rng(7)
    return {
        "w": gen.normal(size=(3, 4)).astype(np.float32),
        "h": gen.normal(size=5).astype(np.float16),
        "i": np.array([1, -2, 2**31 - 1], np.int32),
        "l": np.array([[2**40, -1]], np.int64),
        "q": np.array([0, 7, 255], np.uint8),
        "s": np.array(1.5, np.float32),
        "e": np.zeros((0, 2), np.float32),
    }


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, ref in want.items():
        assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, name
        assert got[name].tobytes() == ref.tobytes(), name


def test_round_trip_is_bit_exact_and_gives_fresh_writable_arrays() -> None:
    arrays = _arrays()
    nan = np.array([np.float32("nan")]).view(np.int32)
    nan[0] |= 0x1234  # a NaN payload survives bit for bit
    arrays["nan"] = nan.view(np.float32)
    record = encode_arrays(arrays)
    got = decode_arrays(record, allow_nonfinite=True)
    _same(got, arrays)
    before = record["float32"].data
    got["w"][...] = 0.0  # writable, and not a view of the message
    assert record["float32"].data == before
    assert all(a.flags.writeable and a.flags.aligned for a in got.values())


def test_both_front_ends_read_each_other() -> None:
    arrays = _arrays()
    tensors = decode_tensors(encode_arrays(arrays))
    _same({k: v.numpy() for k, v in tensors.items()}, arrays)
    _same(decode_arrays(encode_tensors(tensors)), arrays)
    assert TensorLayout.of(arrays) == TensorLayout.of(tensors)


def test_byte_order_and_memory_layout_do_not_change_the_bytes() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    big = a.astype(">f4")
    strided = np.asfortranarray(a)
    want = encode_arrays({"a": a})["float32"].data
    assert encode_arrays({"a": big})["float32"].data == want
    assert encode_arrays({"a": strided})["float32"].data == want
    assert (
        encode_tensors({"a": torch.from_numpy(a).t().contiguous().t()})["float32"].data
        == want
    )


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.zeros(2, np.float64), "float64"),
        (np.zeros(2, bool), "bool"),
        ([1.0, 2.0], "not a numpy.ndarray"),
    ],
)
def test_encode_arrays_refuses_what_the_wire_does_not_carry(
    value: object, match: str
) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode_arrays({"x": value})  # type: ignore[dict-item]


def test_bfloat16_needs_the_torch_decoder() -> None:
    record = encode_tensors({"b": torch.ones(2, dtype=torch.bfloat16)})
    with pytest.raises(ProtocolError, match="'b'.*bfloat16"):
        decode_arrays(record)
    assert torch.equal(decode_tensors(record)["b"], torch.ones(2, dtype=torch.bfloat16))


def test_nonfinite_floats_are_refused_and_integers_are_not_checked() -> None:
    record = encode_arrays(
        {"i": np.array([-1], np.int64), "h": np.array([np.inf], np.float16)}
    )
    with pytest.raises(ProtocolError, match="'h' contains NaN or Inf"):
        decode_arrays(record)
    assert np.isinf(decode_arrays(record, allow_nonfinite=True)["h"][0])


def _tampered() -> list[ArrayRecord]:
    good = encode_arrays({"a": np.ones(3, np.float32), "b": np.ones(2, np.int32)})
    out = []
    short = ArrayRecord(dict(good.items()))
    short["float32"] = Array(
        dtype="float32", shape=(2,), stype=good["float32"].stype, data=b"\0" * 8
    )
    out.append(short)
    extra = ArrayRecord(dict(good.items()))
    extra["uint8"] = good["int32"]
    out.append(extra)
    missing = ArrayRecord({k: v for k, v in good.items() if k != "int32"})
    out.append(missing)
    retag = ArrayRecord(dict(good.items()))
    retag["int32"] = Array(
        dtype="int64", shape=(2,), stype=good["int32"].stype, data=good["int32"].data
    )
    out.append(retag)
    nomanifest = ArrayRecord({k: v for k, v in good.items() if k != MANIFEST_KEY})
    out.append(nomanifest)
    return out


@pytest.mark.parametrize("index", range(5))
def test_a_tampered_record_gets_the_same_refusal_from_both(index: int) -> None:
    record = _tampered()[index]
    with pytest.raises(ProtocolError) as from_torch:
        decode_tensors(record)
    with pytest.raises(ProtocolError) as from_numpy:
        decode_arrays(record)
    assert str(from_numpy.value) == str(from_torch.value)


def test_expected_layout_and_size_limit_are_enforced() -> None:
    arrays = {"a": np.ones((2, 2), np.float32)}
    record = encode_arrays(arrays)
    other = TensorLayout.of({"a": np.ones(4, np.float32)})
    with pytest.raises(ProtocolError, match="shape"):
        decode_arrays(record, expected=other)
    assert decode_arrays(record, expected=TensorLayout.of(arrays), max_bytes=16)
    with pytest.raises(PayloadTooLargeError):
        decode_arrays(record, max_bytes=15)
